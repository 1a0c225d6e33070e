"""The `esp-run` command line, run as a real subprocess."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_cli_generate_json_is_greedy_and_matches_the_engine():
    cmd = [sys.executable, "-m", "esp.cli.main", "generate", "--prompt-ids", "1,300,400,500,600",
           "--max-tokens", "8", "--ignore-eos", "--dtype", "float64", "--kv-tokens-per-instance", "512", "--json"]
    runs = [json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=300).stdout)
            for _ in range(2)]
    assert runs[0]["token_ids"] == runs[1]["token_ids"] and len(runs[0]["token_ids"]) == 8
    out = runs[0]
    assert out["usage"] == {"prompt_tokens": 5, "completion_tokens": 8}
    assert out["finish_reason"] == "length" and out["esp"]["prefill_group"] == [0]
    assert set(out["timing"]) == {"ttft_s", "tpot_s", "e2e_s"}


@pytest.mark.parametrize("args, message", [
    (["generate"], "one of the arguments --prompt --prompt-ids is required"),
    (["generate", "--prompt", "x", "--policy", "nope"], "unknown policy 'nope'; choices: chunked, disagg, loong, replicas, static-sp"),
    (["generate", "--prompt-ids", "1,a"], "comma-separated integers"),
    (["serve", "--instances", "0"], "positive integer"),
])
def test_cli_bad_flags_give_one_line_and_nonzero_exit(args, message):
    res = subprocess.run([sys.executable, "-m", "esp.cli.main", *args], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1
