"""benchmarks/chaos.py's parsing and verdict, without starting a server."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

spec = importlib.util.spec_from_file_location("chaos", Path(__file__).parents[1] / "benchmarks" / "chaos.py")
chaos = sys.modules["chaos"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(chaos)


def sse(event) -> bytes:
    return b"data: " + (event if isinstance(event, bytes) else json.dumps(event).encode()) + b"\n"


def chunk(text: str, finish: str | None = None) -> dict:
    return {"choices": [{"text": text, "finish_reason": finish}], "usage": None}


def test_stream_complete_and_error():
    s = chaos.Stream(status=200)
    for line in (sse(chunk("a")), b"\n", sse(chunk("b", "length")),
                 sse({"choices": [], "usage": {"completion_tokens": 2}}), sse(b"[DONE]")):
        s.feed(line)
    assert (s.text, s.tokens, s.finish_reason, s.done) == ("ab", 2, "length", True)
    assert s.complete(2) and not s.complete(3)

    told = chaos.Stream(status=200)
    for line in (sse(chunk("a")), sse({"error": {"message": "x"}}), sse(b"[DONE]")):
        told.feed(line)
    assert told.error and told.finish_reason is None and not told.complete(1)


def test_metrics_kv_held():
    text = ('# HELP x\nesp_num_requests_running 0.0\nesp_kv_free_slots{instance="0"} 2000.0\n'
            'esp_kv_free_slots{instance="1"} 2048.0\nesp_kv_capacity_slots{instance="0"} 2048.0\n'
            'esp_kv_capacity_slots{instance="1"} 2048.0\n')
    assert chaos.kv_held(chaos.parse_metrics(text)) == 48


def test_own_process_seen():
    assert chaos.identity(os.getpid()) == chaos.identity(os.getpid())
    assert chaos.rss_mib([os.getpid()]) > 0
    assert chaos.failures("b", {"kv_held": 0, "idle_after": True, "serves_after": True}) == []
    assert chaos.failures("b", {"kv_held": 3, "idle_after": True, "serves_after": True})
