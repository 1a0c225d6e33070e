"""The example plug-in installs from its own folder and serves (DESIGN 6)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "esp-policy-example"


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(EXAMPLE)], check=True, timeout=300)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(target), os.environ.get("PYTHONPATH")]))}


def esp_run(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "esp.cli.main", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_policies_lists_the_plugin(plugin_env):
    out = esp_run(plugin_env, "policies").stdout
    assert "example" in out and "esp_policy_example:example" in out
    assert "shortest-first" in out


def test_generate_with_the_plugin_matches_loong(plugin_env):
    args = ["generate", "--prompt-ids", "1,300,400,500", "--max-tokens", "6", "--ignore-eos", "--json",
            "--kv-tokens-per-instance", "256"]
    plugin = esp_run(plugin_env, *args, "--policy", "example")
    assert plugin.returncode == 0, plugin.stderr
    builtin = esp_run(plugin_env, *args, "--policy", "loong", "--scheduling", "shortest-first")
    assert builtin.returncode == 0, builtin.stderr
    assert json.loads(plugin.stdout)["token_ids"] == json.loads(builtin.stdout)["token_ids"]
    assert len(json.loads(plugin.stdout)["token_ids"]) == 6


def test_shortest_prompt_first_dispatches_short_requests_first():
    sys.path.insert(0, str(EXAMPLE))
    try:
        from esp_policy_example import ShortestPromptFirst
    finally:
        sys.path.remove(str(EXAMPLE))
    from esp.policies import ClusterView, PolicyOptions, RequestView

    waiting = (RequestView(1, 0.0, 500, 0, 8), RequestView(2, 1.0, 20, 0, 8), RequestView(3, 2.0, 90, 0, 8))
    view = ClusterView(3.0, (1000,), (560,), frozenset({0}), waiting, ())
    assert ShortestPromptFirst(PolicyOptions()).dispatch(view).request_ids == (2, 3)
    late = ClusterView(9.0, (1000,), (560,), frozenset({0}), waiting, ())
    assert ShortestPromptFirst(PolicyOptions()).dispatch(late).request_ids[0] == 1
