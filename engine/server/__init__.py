"""The OpenAI-compatible HTTP surface (DESIGN 9), see docs/server.md."""
from __future__ import annotations

from esp.engine.server.app import create_app, serve
from esp.engine.server.options import ServerOptions

__all__ = ["ServerOptions", "create_app", "serve"]
