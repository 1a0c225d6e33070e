"""`esp-run serve`: the HTTP server's flags, the ready banner, and shutdown on signals.

The first SIGTERM or SIGINT (Ctrl-C) drains: the server stops taking requests, running ones
get `--shutdown-timeout` seconds to finish, the rest end with `finish_reason: "abort"`, the
workers stop, and the process exits 0. A second signal exits at once (130 for SIGINT, 143
for SIGTERM), killing the worker processes instead of waiting for them.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import multiprocessing
import os
import signal
import sys

from esp.cli.main import flag_type
from esp.engine.config import EngineConfig

log = logging.getLogger("esp.cli")

API_KEY_ENV = "ESP_API_KEY"
# what the bundled esp-tiny continues with real (docstring-like) text under greedy decoding
QUICKSTART_PROMPT = "Return the number of"
_SIZE_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def byte_size(text: str) -> int:
    """`67108864`, `64M`, `64MiB`, `1g`: a positive number of bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    scale = _SIZE_SUFFIXES.get(t[-1:], 1)
    try:
        value = int(float(t[:-1] if scale > 1 else t) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of bytes such as 67108864 or 64M, got {text}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


port_number = flag_type(int, lambda v: 0 <= v <= 65535, "a port number 0..65535 (0: any free port)")
seconds = flag_type(float, lambda v: v >= 0, "a non-negative number of seconds")


def origins(text: str) -> tuple[str, ...]:
    return tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())


def add_serve_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    g.add_argument("--port", type=port_number, default=8000, help="TCP port (default 8000; 0: any free port)")
    g.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None,
                   help=f"require `Authorization: Bearer KEY` on /v1 routes (default: ${API_KEY_ENV}, else none)")
    g.add_argument("--allowed-origins", type=origins, default=(), metavar="ORIGIN,...",
                   help="browser origins allowed by CORS, comma-separated (default: none)")
    g.add_argument("--max-body-bytes", type=byte_size, default=64 << 20, metavar="N",
                   help="largest request body, e.g. 64M (default 64 MiB)")
    g.add_argument("--shutdown-timeout", type=seconds, default=30.0, metavar="S",
                   help="on SIGTERM/Ctrl-C, seconds running requests get to finish (default 30)")


def server_options(args: argparse.Namespace):
    from esp.engine.server import ServerOptions

    return ServerOptions(host=args.host, port=args.port, api_key=args.api_key,
                         allowed_origins=tuple(args.allowed_origins), max_body_bytes=args.max_body_bytes,
                         shutdown_timeout=args.shutdown_timeout)


def curl_example(url: str, api_key: str | None, from_env: bool) -> str:
    """A command that works from this machine: a wildcard bind address is reached on loopback."""
    url = url.replace("://0.0.0.0:", "://127.0.0.1:").replace("://[::]:", "://[::1]:")
    auth = ""
    if api_key:
        auth = f" -H \"Authorization: Bearer ${API_KEY_ENV}\"" if from_env else " -H 'Authorization: Bearer <api key>'"
    return (f"curl {url}/v1/completions -H 'Content-Type: application/json'{auth} "
            f"-d '{{\"prompt\": \"{QUICKSTART_PROMPT}\", \"max_tokens\": 32, \"stream\": true}}'")


class Shutdown:
    """Signal handlers on the event loop: the first SIGTERM/SIGINT sets `stop`, a second
    exits the process at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, stop: asyncio.Event, drain_s: float) -> None:
        self.stop, self.drain_s = stop, drain_s
        self.serving = False  # set once the server takes requests

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in self.SIGNALS:
            loop.add_signal_handler(sig, self.on_signal, sig)

    def on_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if not self.stop.is_set():
            if self.serving:
                log.warning("%s: draining: no new requests; running ones get up to %g s, then are aborted "
                            "(%s again to exit now)", name, self.drain_s, name)
            else:
                log.warning("%s: stopping once the workers have started (%s again to exit now)", name, name)
            self.stop.set()
            return
        print(f"esp-run: second {name}: exiting now without draining", file=sys.stderr, flush=True)
        for child in multiprocessing.active_children():  # the workers: do not leave them behind
            child.kill()
        os._exit(128 + sig)


def cmd_serve(args: argparse.Namespace, config: EngineConfig) -> int:
    """Import and build everything first, so that the event loop starts with the signal handlers
    installed at once (a Ctrl-C before that is a plain KeyboardInterrupt: nothing runs yet)."""
    from esp.cli.main import run_async
    from esp.engine.engine import Engine

    options = server_options(args)
    engine = Engine(config)  # started by serve() once the port is bound, stopped by it at the end
    return run_async(serve_until_stopped(engine, options, args.api_key))


async def serve_until_stopped(engine, options, api_key: str | None) -> int:
    from esp.engine.server import serve

    stop = asyncio.Event()
    shutdown = Shutdown(stop, options.shutdown_timeout)
    shutdown.install(asyncio.get_running_loop())
    key_from_env = bool(api_key) and api_key == os.environ.get(API_KEY_ENV)

    def ready(url: str) -> None:
        shutdown.serving = True
        if stop.is_set():  # interrupted while starting: serve() drains and returns at once
            return
        n = engine.config.instances
        # the first line ends with the URL: scripts (and tests) take it from there
        print(f"esp-serve: serving {engine.model_name} with policy {engine.policies.name} on {n} "
              f"instance{'s' if n != 1 else ''} at {url}", flush=True)
        print(f"try: {curl_example(url, options.api_key, key_from_env)}", flush=True)
        print(f"stop: Ctrl-C or SIGTERM (running requests get up to {options.shutdown_timeout:g} s to finish)",
              flush=True)

    await serve(engine, options, on_ready=ready, stop=stop)
    log.info("stopped")
    return 0
