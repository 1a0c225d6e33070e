"""How a refusal leaves the server: OpenAI's error body, one status per kind of failure.

`ENGINE_ERRORS` is the one table from the engine's errors (`esp.engine.errors`) to HTTP;
`REASONS` names each status for the rejection counter.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from aiohttp import web

from esp.engine.errors import EngineError, EngineUnavailable, InvalidRequest, Overloaded


@dataclass(frozen=True)
class Rejection:
    """The HTTP face of one kind of engine error; `reason` labels the rejection counter."""

    status: int
    type: str
    code: str | None
    reason: str


ENGINE_ERRORS: dict[type[EngineError], Rejection] = {
    InvalidRequest: Rejection(400, "invalid_request_error", None, "invalid"),
    Overloaded: Rejection(503, "server_error", "overloaded", "overloaded"),
    EngineUnavailable: Rejection(503, "server_error", "unavailable", "unavailable"),
}

REASONS: dict[int, str] = {
    400: "invalid", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
    413: "too_large", 415: "unsupported_media_type", 500: "internal", 503: "unavailable",
}


class ApiError(Exception):
    """An HTTP error with OpenAI's body `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None,
                 reason: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers or {}
        self.reason = reason or REASONS.get(status, str(status))

    @classmethod
    def of_engine(cls, err: EngineError, param: str | None = None) -> ApiError:
        """The response for an error the engine raised on purpose; `param` replaces the engine's."""
        rejection = next((ENGINE_ERRORS[c] for c in type(err).__mro__ if c in ENGINE_ERRORS), None)
        if rejection is None:
            return internal()
        return cls(rejection.status, str(err), param, rejection.code, rejection.type,
                   retry_after(getattr(err, "retry_after", None)), rejection.reason)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> web.Response:
        """ASCII JSON, so text echoed from the request (even a lone surrogate) always encodes."""
        return web.Response(text=json.dumps(self.body()), status=self.status, headers=self.headers,
                            content_type="application/json")


def retry_after(seconds: float | None) -> dict[str, str]:
    """The `Retry-After` header for a wait of `seconds` (none when waiting will not help)."""
    return {} if seconds is None else {"Retry-After": str(max(0, math.ceil(seconds)))}


def internal(request_id: str | None = None) -> ApiError:
    """A 500 that says nothing about the cause (that goes to the log, under `request_id`)."""
    where = f" (request id {request_id})" if request_id else ""
    return ApiError(500, f"The server had an error while processing your request{where}.")
