"""A streaming client for any OpenAI-compatible ``/v1/completions`` endpoint (``esp-run bench --url``).

Requests send the prompt as token ids with ``stream: true``, ``stream_options.include_usage``,
``ignore_eos`` and ``temperature: 0``. Each SSE chunk carrying text counts as one token arrival
(a chunk may carry several tokens); the generated-token count comes from the final ``usage``.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Self

import aiohttp


class ClientError(Exception):
    """The server could not be reached or did not answer ``/v1/models`` usefully."""


def _message(body: str, status: int | None = None) -> str:
    try:
        obj = json.loads(body)
        msg = obj["error"]["message"] if isinstance(obj.get("error"), dict) else obj.get("error") or body
    except (ValueError, AttributeError, KeyError, TypeError):
        msg = body
    msg = " ".join(str(msg).split())[:300] or "empty response"
    return f"HTTP {status}: {msg}" if status is not None else msg


class CompletionsClient:
    """``async with CompletionsClient(url) as c: await c.models(); await c.complete(...)``."""

    def __init__(self, url: str, model: str | None = None, timeout_s: float | None = None) -> None:
        self.base = url.rstrip("/")
        self.base = self.base.removesuffix("/v1")
        self.model = model
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Self:
        self.session = aiohttp.ClientSession(timeout=self.timeout, connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def models(self) -> list[dict]:
        """``GET /v1/models``'s cards; ClientError if unreachable or not a model list."""
        try:
            async with self.session.get(f"{self.base}/v1/models") as resp:
                body = await resp.text()
                if resp.status != 200:
                    raise ClientError(f"GET {self.base}/v1/models: {_message(body, resp.status)}")
                data = json.loads(body).get("data")
        except (aiohttp.ClientError, OSError, ValueError, AttributeError) as err:
            raise ClientError(f"cannot reach {self.base}: {err or type(err).__name__}") from None
        if not isinstance(data, list) or not data or not all(isinstance(d, dict) for d in data):
            raise ClientError(f"GET {self.base}/v1/models lists no models")
        if self.model is None:
            self.model = str(data[0].get("id"))
        return data

    async def complete(self, prompt_ids: list[int], max_tokens: int,
                       on_token: Callable[[], None]) -> tuple[int, str]:
        """Stream one completion, calling ``on_token()`` per chunk that carries output.
        Returns (generated tokens, error message or "")."""
        body = {"model": self.model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        chunks, usage, error = 0, None, ""
        try:
            async with self.session.post(f"{self.base}/v1/completions", json=body) as resp:
                if resp.status != 200:
                    return 0, _message(await resp.text(), resp.status)
                buf = b""
                async for piece in resp.content.iter_any():
                    buf += piece
                    *lines, buf = buf.split(b"\n")
                    for line in lines:
                        line = line.strip()
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            break
                        obj = json.loads(data)
                        if obj.get("error"):
                            error = _message(json.dumps(obj))
                            continue
                        if obj.get("usage"):
                            usage = obj["usage"].get("completion_tokens")
                        choice = (obj.get("choices") or [{}])[0]
                        if choice.get("text") or (choice.get("finish_reason") and not chunks):
                            on_token()
                            chunks += 1
        except (aiohttp.ClientError, OSError, ValueError) as err:
            return chunks if usage is None else usage, f"{type(err).__name__}: {err}"
        return (chunks if usage is None else int(usage)), error
