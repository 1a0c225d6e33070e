"""The request bodies as tables of fields. `parsing` checks a body against its table and
`openapi` describes the same table, so the documented bounds are the enforced ones.

Each spec checks one JSON value (returning it normalized, or raising a 400 that names the
field) and renders itself as JSON Schema (OpenAPI 3.1). A field that is absent or null takes
its default; fields not in a table are ignored.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Mapping

from esp.engine.sampling_params import MAX_INT32, MAX_STOP_CHARS, MAX_STOP_STRINGS, MAX_TEMPERATURE, MIN_TEMPERATURE
from esp.engine.server.errors import ApiError
from esp.engine.tokenizer import ROLES

INT64_MIN, INT64_MAX = -2**63, 2**63 - 1
MAX_MODEL_CHARS = 4096
_SURROGATE = re.compile("[\ud800-\udfff]")


def shown(value: Any) -> str:
    """A short rendering of a client's value for an error message; always ASCII."""
    if isinstance(value, list):
        return f"an array of {len(value)} items"
    if isinstance(value, dict):
        return "an object"
    text = json.dumps(value[:80] if isinstance(value, str) else value)
    return text if len(text) <= 80 else text[:77] + "..."


def valid_text(s: str) -> bool:
    """False for strings holding lone surrogates, which JSON escapes can carry but UTF-8 cannot."""
    return s.isascii() or _SURROGATE.search(s) is None


class Spec:
    """One kind of JSON value: `check` returns it normalized or raises; `schema` describes it."""

    what: str

    def check(self, value: Any, param: str) -> Any:
        if not self.ok(value):
            raise ApiError(400, f"{param} must be {self.what}, got {shown(value)}", param)
        return value

    def ok(self, value: Any) -> bool:
        raise NotImplementedError

    def schema(self) -> dict:
        raise NotImplementedError


@dataclass(frozen=True)
class Integer(Spec):
    lo: int
    hi: int

    @property
    def what(self) -> str:
        return f"an integer in [{self.lo}, {self.hi}]"

    def ok(self, value: Any) -> bool:
        return type(value) is int and self.lo <= value <= self.hi

    def schema(self) -> dict:
        return {"type": "integer", "minimum": self.lo, "maximum": self.hi}


@dataclass(frozen=True)
class Number(Spec):
    """A finite number in [lo, hi] (`(lo, hi]` when `open_lo`); `zero` also allows exactly 0."""

    lo: float
    hi: float
    open_lo: bool = False
    zero: bool = False

    @property
    def what(self) -> str:
        span = f"{'(' if self.open_lo else '['}{self.lo:g}, {self.hi:g}]"
        return f"0 or a number in {span}" if self.zero else f"a number in {span}"

    def ok(self, value: Any) -> bool:
        if type(value) not in (int, float) or (type(value) is float and not math.isfinite(value)):
            return False
        above = self.lo < value if self.open_lo else self.lo <= value
        return (self.zero and value == 0) or (above and value <= self.hi)

    def schema(self) -> dict:
        span = {"type": "number", "exclusiveMinimum" if self.open_lo else "minimum": self.lo, "maximum": self.hi}
        return {"anyOf": [{"type": "number", "const": 0}, span]} if self.zero else span


@dataclass(frozen=True)
class Boolean(Spec):
    what = "a boolean"

    def ok(self, value: Any) -> bool:
        return type(value) is bool

    def schema(self) -> dict:
        return {"type": "boolean"}


@dataclass(frozen=True)
class Only(Spec):
    """A field kept for compatibility whose one supported value is `value`."""

    value: Any
    what: str

    def ok(self, value: Any) -> bool:
        return type(value) is type(self.value) and value == self.value

    def schema(self) -> dict:
        kind = {bool: "boolean", int: "integer"}[type(self.value)]
        return {"type": kind, "const": self.value}


@dataclass(frozen=True)
class Text(Spec):
    min_len: int = 0
    max_len: int | None = None

    @property
    def what(self) -> str:
        if self.max_len is None:
            return "a non-empty string" if self.min_len else "a string"
        return f"a string of {self.min_len} to {self.max_len} characters"

    def check(self, value: Any, param: str) -> Any:
        value = super().check(value, param)
        if not valid_text(value):
            raise ApiError(400, f"{param} is not valid Unicode (it holds a lone surrogate)", param)
        return value

    def ok(self, value: Any) -> bool:
        return (isinstance(value, str) and len(value) >= self.min_len
                and (self.max_len is None or len(value) <= self.max_len))

    def schema(self) -> dict:
        out = {"type": "string", "minLength": self.min_len}
        return out if self.max_len is None else {**out, "maxLength": self.max_len}


STOP_STRING = Text(1, MAX_STOP_CHARS)


@dataclass(frozen=True)
class Stop(Spec):
    """A stop string or a list of them; normalized to a tuple."""

    what = f"a string of 1 to {MAX_STOP_CHARS} characters or a list of at most {MAX_STOP_STRINGS} such strings"

    def check(self, value: Any, param: str) -> tuple[str, ...]:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or len(items) > MAX_STOP_STRINGS or not all(map(STOP_STRING.ok, items)):
            raise ApiError(400, f"{param} must be {self.what}, got {shown(value)}", param)
        return tuple(STOP_STRING.check(s, param) for s in items)

    def schema(self) -> dict:
        one = STOP_STRING.schema()
        return {"anyOf": [one, {"type": "array", "items": one, "maxItems": MAX_STOP_STRINGS}]}


TOKEN_ID = {"type": "integer", "minimum": 0, "description": "below the model's vocabulary size"}


@dataclass(frozen=True)
class Prompt(Spec):
    """A string, a list of token ids, or a one-element list of either; normalized to the one prompt."""

    what = "a non-empty string or a non-empty list of token ids (integers >= 0)"

    def check(self, value: Any, param: str) -> str | list[int]:
        if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
            if len(value) > 1:
                raise ApiError(400, "only one prompt per request is supported", param)
            value = value[0]
        if isinstance(value, str) and value:
            return Text(1).check(value, param)
        if isinstance(value, list) and value and all(type(t) is int and t >= 0 for t in value):
            return value
        raise ApiError(400, f"{param} must be {self.what}, got {shown(value)}", param)

    def schema(self) -> dict:
        ids = {"type": "array", "items": TOKEN_ID, "minItems": 1}
        text = {"type": "string", "minLength": 1}
        one = {"minItems": 1, "maxItems": 1}
        return {"anyOf": [text, ids, {"type": "array", "items": text, **one},
                          {"type": "array", "items": ids, **one}]}


@dataclass(frozen=True)
class Messages(Spec):
    """Chat messages; normalized to `{"role", "content"}` dicts with text parts joined."""

    what = "a non-empty list of messages"

    def check(self, value: Any, param: str) -> tuple[dict, ...]:
        if not isinstance(value, list) or not value:
            raise ApiError(400, f"{param} must be {self.what}, got {shown(value)}", param)
        return tuple(self._message(m, f"{param}[{k}]", param) for k, m in enumerate(value))

    @staticmethod
    def _message(m: Any, where: str, param: str) -> dict:
        if not isinstance(m, dict):
            raise ApiError(400, f"{where} must be an object with role and content, got {shown(m)}", param)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}, got {shown(role)}", param)
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"{where}.content must be a string or a list of text parts "
                                f"({{\"type\": \"text\", \"text\": ...}}), got {shown(content)}", param)
        if not valid_text(content):
            raise ApiError(400, f"{where}.content is not valid Unicode (it holds a lone surrogate)", param)
        return {"role": role, "content": content}

    def schema(self) -> dict:
        part = {"type": "object", "required": ["type", "text"],
                "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
        content = {"anyOf": [{"type": "string"}, {"type": "array", "items": part}]}
        message = {"type": "object", "required": ["role", "content"],
                   "properties": {"role": {"enum": list(ROLES)}, "content": content}}
        return {"type": "array", "items": message, "minItems": 1}


@dataclass(frozen=True)
class Field:
    spec: Spec
    doc: str
    default: Any = None
    required: bool = False


@dataclass(frozen=True)
class Object(Spec):
    """An object of named fields; `check` returns every field's value (its default when absent)."""

    fields: Mapping[str, Field]
    what = "a JSON object"

    def check(self, value: Any, param: str | None) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise ApiError(400, f"{param or 'the request body'} must be {self.what}, got {shown(value)}", param)
        out = {}
        for name, f in self.fields.items():
            v = value.get(name)
            if v is None and f.required:
                raise ApiError(400, f"{name} is required", name)
            out[name] = f.default if v is None else f.spec.check(v, f"{param}.{name}" if param else name)
        return out

    def schema(self) -> dict:
        props = {name: {**(f.spec.schema() if f.required else {"anyOf": [f.spec.schema(), {"type": "null"}]}),
                        "description": f.doc, **({"default": f.default} if f.default is not None else {})}
                 for name, f in self.fields.items()}
        required = [name for name, f in self.fields.items() if f.required]
        return {"type": "object", "properties": props, **({"required": required} if required else {})}


MODEL_DEFAULT = "when absent, the model's generation_config.json value, else {}"
STREAM_OPTIONS = Object({"include_usage": Field(Boolean(), "send a last chunk with the usage", False)})
MIN_SLO_MS = 1e-3  # one microsecond: smaller targets underflow seconds and mean nothing
MAX_SLO_MS = 1e9
SLO = Object({
    "ttft_ms": Field(Number(MIN_SLO_MS, MAX_SLO_MS), "target time to first token, milliseconds"),
    "tpot_ms": Field(Number(MIN_SLO_MS, MAX_SLO_MS), "target time per output token, milliseconds"),
})

COMMON: dict[str, Field] = {
    "model": Field(Text(1, MAX_MODEL_CHARS), "the served model's name (see /v1/models); another name is 404"),
    "max_tokens": Field(Integer(1, MAX_INT32), "most tokens to generate (completions: 16 when absent; "
                                               "chat: the rest of the context)"),
    "temperature": Field(Number(MIN_TEMPERATURE, MAX_TEMPERATURE, zero=True),
                         f"0 is greedy; {MODEL_DEFAULT.format(1)}"),
    "top_p": Field(Number(0, 1, open_lo=True), f"nucleus sampling mass; {MODEL_DEFAULT.format(1)}"),
    "top_k": Field(Integer(-1, MAX_INT32),
                   f"sample from the k likeliest tokens; <= 0 disables; {MODEL_DEFAULT.format(0)}"),
    "seed": Field(Integer(INT64_MIN, INT64_MAX), "makes sampling reproducible"),
    "stop": Field(Stop(), "generation ends before any of these strings", ()),
    "ignore_eos": Field(Boolean(), "keep generating past end-of-sequence tokens", False),
    "stream": Field(Boolean(), "answer with server-sent events", False),
    "stream_options": Field(STREAM_OPTIONS, "only with stream: true"),
    "slo": Field(SLO, "esp-serve: this request's latency targets; the loong scheduler orders and places work "
                      "by them, and usage.esp.slo reports them with whether each was met"),
    "n": Field(Only(1, "1 (one choice per request)"), "choices per request; only 1", 1),
    "logprobs": Field(Only(False, "false (logprobs are not supported)"), "not supported", False),
}

COMPLETION = Object({
    "prompt": Field(Prompt(), "a string, a list of token ids, or a one-element list of either", required=True),
    **COMMON,
    "echo": Field(Only(False, "false (echo is not supported)"), "not supported", False),
    "best_of": Field(Only(1, "1 (best_of is not supported)"), "only 1", 1),
})

CHAT = Object({
    "messages": Field(Messages(), "the conversation, rendered by the model's chat template", required=True),
    **COMMON,
    "max_completion_tokens": Field(Integer(1, MAX_INT32), "like max_tokens, which it overrides"),
})
