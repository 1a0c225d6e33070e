"""How a server is set up (`ServerOptions`, built by the CLI from flags) and what its app holds."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

from aiohttp import web

from esp.engine.server.metrics import Metrics


@dataclass(frozen=True)
class ServerOptions:
    """`api_key`: when set, `/v1/*` needs `Authorization: Bearer <key>`. `allowed_origins`: the
    browser origins CORS lets in (`"*"` for any); none by default. `shutdown_timeout`: seconds
    running requests get to finish once the server is told to stop."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allowed_origins: tuple[str, ...] = ()
    max_body_bytes: int = 64 << 20
    shutdown_timeout: float = 30.0

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {self.max_body_bytes}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")
        object.__setattr__(self, "allowed_origins", tuple(self.allowed_origins))


ENGINE = web.AppKey("engine", object)
OPTIONS = web.AppKey("options", ServerOptions)
METRICS = web.AppKey("metrics", Metrics)
DRAINING = web.AppKey("draining", asyncio.Event)
HANDLERS = web.AppKey("handlers", set)
CREATED = web.AppKey("created", int)
REQUEST_ID = web.RequestKey("request_id", str)
