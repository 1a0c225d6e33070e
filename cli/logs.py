"""Logging for `esp-run`: one compact stderr format, set up once per process.

The engine logs its startup summary and worker progress on `esp.engine`, one line per
finished request on `esp.requests`, the server on `esp.server`; the CLI only chooses where
those lines go and from which level on.
"""
from __future__ import annotations

import logging
import sys

LEVELS = ("debug", "info", "warning", "error")
FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"


# loggers shown from `--log-level` on; every other library's only from WARNING (torch, for one,
# logs cache statistics at INFO on exit)
OURS = ("esp", "aiohttp.access")


def setup_logging(level: str = "info") -> None:
    """Send records to stderr as `2025-01-31 12:00:00 INFO    esp.engine: message`: ours (and the
    HTTP access log) from `level` on, other libraries' from WARNING (or `level`, if higher).
    Replaces handlers set up before."""
    value = logging.getLevelName(level.upper())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(max(value, logging.WARNING))
    for name in OURS:
        logging.getLogger(name).setLevel(value)
    logging.captureWarnings(True)
