"""What the engine tells its callers when it will not take a request (DESIGN 9).

Each maps to one HTTP status in the server and to one line from the CLI; nothing here is a
built-in `ValueError`/`RuntimeError` that a caller has to guess the meaning of.
"""
from __future__ import annotations


class EngineError(Exception):
    """Base of the errors the engine raises on purpose."""


class InvalidRequest(EngineError, ValueError):
    """The request can never be served as asked (HTTP 400). `param` names the field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class Overloaded(EngineError):
    """The waiting queue is full (HTTP 503); `retry_after` seconds is the predicted drain time."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineUnavailable(EngineError):
    """The engine cannot take work now (HTTP 503): starting, recovering from a worker failure,
    draining for shutdown, or down. `retry_after` is None when waiting will not help."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineStartError(EngineError):
    """The engine could not start (a worker failed to load the model, no CUDA, ...): one line
    that says what to do; the details are in the log."""
