"""OpenAI's response objects (`text_completion`, `chat.completion`, their stream chunks) and
server-sent events."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from esp.engine.outputs import RequestOutput

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE = b"data: [DONE]\n\n"


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse(obj: Any) -> bytes:
    return f"data: {dumps(obj)}\n\n".encode()


def usage(out: RequestOutput) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens, "esp": out.esp}


@dataclass(frozen=True)
class Shape:
    """Builds the objects of one request."""

    chat: bool
    include_usage: bool
    id: str
    model: str
    created: int

    def chunk(self, text: str, finish_reason: str | None, first: bool) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": text} if first else {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        obj = {**self._head(streamed=True), "choices": [choice]}
        return {**obj, "usage": None} if self.include_usage else obj

    def usage_chunk(self, out: RequestOutput) -> dict:
        return {**self._head(streamed=True), "choices": [], "usage": usage(out)}

    def full(self, out: RequestOutput) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out.text}, "logprobs": None,
                      "finish_reason": out.finish_reason}
        else:
            choice = {"index": 0, "text": out.text, "logprobs": None, "finish_reason": out.finish_reason}
        return {**self._head(streamed=False), "choices": [choice], "usage": usage(out)}

    def _head(self, streamed: bool) -> dict:
        kind = ("chat.completion.chunk" if streamed else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}
