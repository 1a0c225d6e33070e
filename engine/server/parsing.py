"""From request bytes to a `Job`: JSON decoding with limits, then the field tables of `fields`."""
from __future__ import annotations

import asyncio
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Collection

from esp.engine.errors import InvalidRequest
from esp.engine.generation_defaults import GenerationDefaults
from esp.engine.sampling_params import SamplingParams
from esp.engine.server.errors import ApiError
from esp.engine.slo import LatencySLO
from esp.engine.server.fields import CHAT, COMPLETION

MAX_DEPTH = 64
COMPLETION_DEFAULT_MAX_TOKENS = 16
CHAT_TEMPLATE_OFF_LOOP_CHARS = 8192
_CONTAINERS = (list, dict)


@dataclass(frozen=True)
class Job:
    """One valid request. Completions carry `prompt` (text or token ids), chat carries `messages`;
    `max_tokens is None` means the endpoint's default (16 for completions, the rest of the
    context for chat). `max_param` is the field the client used for it."""

    chat: bool
    prompt: str | list[int] | None
    messages: tuple[dict, ...] | None
    params: SamplingParams
    max_tokens: int | None
    max_param: str
    stream: bool
    include_usage: bool
    slo: LatencySLO | None = None

    @property
    def prompt_param(self) -> str:
        return "messages" if self.chat else "prompt"

    def param(self, engine_param: str | None) -> str | None:
        """The request field an engine error's `param` stands for."""
        return {None: self.prompt_param, "prompt": self.prompt_param,
                "max_tokens": self.max_param}.get(engine_param, engine_param)

    def with_max_tokens(self, prompt_tokens: int, max_model_len: int) -> SamplingParams:
        if self.max_tokens is not None:
            return self.params
        default = max(1, max_model_len - prompt_tokens) if self.chat else COMPLETION_DEFAULT_MAX_TOKENS
        return dataclasses.replace(self.params, max_tokens=default)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number")


def decode_json(raw: bytes) -> Any:
    """The JSON value of a body: strict UTF-8, no NaN/Infinity, at most `MAX_DEPTH` levels."""
    try:
        value = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, f"the request body is nested more than {MAX_DEPTH} levels deep") from None
    except (UnicodeDecodeError, ValueError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {str(err)[:200]}") from None
    if _depth_exceeds(value, MAX_DEPTH):
        raise ApiError(400, f"the request body is nested more than {MAX_DEPTH} levels deep")
    return value


def _depth_exceeds(value: Any, limit: int) -> bool:
    level = [value] if isinstance(value, _CONTAINERS) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            return True
        level = [v for c in level for v in (c.values() if isinstance(c, dict) else c) if isinstance(v, _CONTAINERS)]
    return False


def parse_job(body: Any, chat: bool, served_models: Collection[str],
              defaults: GenerationDefaults = GenerationDefaults()) -> Job:
    """Check a decoded body against its endpoint's table; raises `ApiError` (400, or 404 for a
    model this server does not serve) naming the offending field. Sampling fields the body
    leaves out take the model's `defaults`."""
    v = (CHAT if chat else COMPLETION).check(body, None)
    if v["model"] is not None and v["model"] not in served_models:
        raise ApiError(404, f"The model `{v['model']}` does not exist.", "model", "model_not_found")
    if v["stream_options"] is not None and not v["stream"]:
        raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
    max_param = "max_completion_tokens" if chat and v.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = v[max_param]
    try:
        params = defaults.sampling_params(max_tokens=max_tokens or 1, temperature=v["temperature"], top_p=v["top_p"],
                                          top_k=v["top_k"], seed=v["seed"], ignore_eos=v["ignore_eos"],
                                          stop=v["stop"])
    except InvalidRequest as err:
        param = max_param if err.param == "max_tokens" else err.param
        raise ApiError(400, str(err).replace("max_tokens", max_param), param) from None
    return Job(chat, None if chat else v["prompt"], v["messages"] if chat else None, params, max_tokens,
               max_param, v["stream"], bool(v["stream_options"] and v["stream_options"]["include_usage"]),
               LatencySLO.from_ms(**v["slo"]) if v["slo"] else None)


async def chat_prompt(tokenizer, messages: tuple[dict, ...]) -> str:
    """The prompt text of a conversation; long ones are rendered off the event loop."""
    try:
        if sum(len(m["content"]) for m in messages) > CHAT_TEMPLATE_OFF_LOOP_CHARS:
            return await asyncio.get_running_loop().run_in_executor(
                None, tokenizer.apply_chat_template, list(messages))
        return tokenizer.apply_chat_template(list(messages))
    except ValueError as err:
        raise ApiError(400, str(err), "messages") from None
