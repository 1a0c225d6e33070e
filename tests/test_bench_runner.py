"""`esp-run bench`: the pacing/recording core, the HTTP client, and the CLI end to end."""
from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time

import pytest
from aiohttp import web
from esp.cli.bench.client import CompletionsClient
from esp.cli.bench.metrics import SLO, RequestRecord, summarize
from esp.cli.bench.runner import prompt_ids, replay
from esp.cli.bench.workload import TraceRequest

CLI = [sys.executable, "-m", "esp.cli.main"]
ENGINE = ["--kv-tokens-per-instance", "4096", "--threads-per-instance", "1"]
WORKLOAD = ["--dataset", "sharegpt", "--num-requests", "6", "--rate", "50", "--max-context", "300"]


# -- the pacing/recording core --------------------------------------------------------------
async def test_replay_paces_requests_and_records_tokens_and_failures():
    workload = [TraceRequest(0.0, 5, 3), TraceRequest(0.05, 7, 2), TraceRequest(0.1, 4, 2), TraceRequest(0.1, 4, 1)]
    prompts = [prompt_ids(0, i, r.input_len, 50) for i, r in enumerate(workload)]
    loop = asyncio.get_running_loop()
    t0, sent, done = loop.time(), [], []

    async def send(prompt, max_tokens, on_token):
        sent.append((loop.time() - t0, len(prompt)))
        if len(prompt) == 4 and max_tokens == 1:
            raise ValueError("prompt too long")
        for k in range(max_tokens):
            await asyncio.sleep(0.01)
            on_token()
        return max_tokens, ("boom" if len(prompt) == 4 else "")

    records, duration = await replay(workload, prompts, send, lambda: done.append(1))
    assert len(done) == 4 and duration >= 0.1
    assert [n for _, n in sorted(sent)] == [5, 7, 4, 4]
    for (at, _), req in zip(sorted(sent), sorted(workload, key=lambda r: r.arrival_s)):
        assert at >= req.arrival_s - 1e-3
    ok = records[0]
    assert ok.completed and ok.output_len == 3 and len(ok.token_times) == 3 and ok.arrival_s == 0.0
    assert ok.ttft_s >= 0.01 and ok.end_s >= ok.token_times[-1]
    assert records[1].completed and records[1].arrival_s == 0.05 and records[1].ttft_s < 0.05
    assert not records[2].success and records[2].error == "boom"
    assert not records[3].success and records[3].error == "prompt too long" and records[3].output_len == 0
    s = summarize(records, duration, SLO())
    assert s["completed"] == 2 and s["failed"] == 2 and s["errors"] == {"boom": 1, "prompt too long": 1}


def test_prompt_ids_are_deterministic_and_in_range():
    a = prompt_ids(7, 3, 200, 1000)
    assert a == prompt_ids(7, 3, 200, 1000) and a != prompt_ids(7, 4, 200, 1000)
    assert len(a) == 200 and all(3 <= t < 1000 and isinstance(t, int) for t in a)


# -- the HTTP client against a fake server ------------------------------------------------
async def test_client_counts_chunks_usage_and_turns_errors_into_messages():
    async def completions(request):
        body = await request.json()
        if body["max_tokens"] == 99:
            return web.json_response({"error": {"message": "too long", "type": "invalid_request_error"}},
                                     status=400)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for text in ("a", "bc"):  # the second chunk carries two tokens
            await resp.write(f'data: {json.dumps({"choices": [{"text": text, "finish_reason": None}]})}\n\n'.encode())
        if body["max_tokens"] == 5:
            await resp.write(b'data: {"error": {"message": "engine died"}}\n\n')
        else:
            await resp.write(b'data: {"choices": [{"text": "", "finish_reason": "length"}]}\n\n')
            await resp.write(b'data: {"choices": [], "usage": {"completion_tokens": 3}}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        return resp

    async def models(request):
        return web.json_response({"data": [{"id": "m0", "max_model_len": 128}]})

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with CompletionsClient(f"http://127.0.0.1:{port}/v1") as client:
            assert (await client.models())[0]["max_model_len"] == 128 and client.model == "m0"
            ticks = []
            assert await client.complete([3, 4], 3, lambda: ticks.append(1)) == (3, "")
            assert len(ticks) == 2
            n, err = await client.complete([3, 4], 5, lambda: None)
            assert n == 2 and err == "engine died"
            n, err = await client.complete([3, 4], 99, lambda: None)
            assert n == 0 and err == "HTTP 400: too long"
    finally:
        await runner.cleanup()


# -- the CLI ------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--dataset", "nope"], "unknown trace 'nope'"),
    (["--trace", "/nonexistent/trace.jsonl"], "No such file"),
    (["--dataset", "sharegpt", "--rate", "1", "--rates", "1,2"], "not allowed with argument"),
    (["--dataset", "sharegpt", "--rates", "1,-2"], "rates must be positive"),
    (["--dataset", "sharegpt", "--rate", "0"], "rates must be positive"),
    (["--dataset", "sharegpt", "--rates", "1,x"], "comma-separated numbers"),
    (["--dataset", "sharegpt", "--plot", "x.png"], "--plot needs --rate"),
    (["--rate", "1"], "one of the arguments --trace --dataset --suite is required"),
    (["--dataset", "sharegpt", "--url", "http://127.0.0.1:9"], "cannot reach http://127.0.0.1:9"),
])
def test_bench_bad_flags_give_one_line_and_exit_2(args, message, tmp_path):
    res = subprocess.run([*CLI, "bench", *args], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, check=False)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def _bench(tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    res = subprocess.run([*CLI, "bench", *WORKLOAD, "--no-progress", "--json", str(out), *args],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)
    assert res.returncode == 0, res.stderr
    return json.loads(out.read_text()), res.stdout


@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    return _bench(tmp_path_factory.mktemp("real"), "real", "--backend", "real", *ENGINE)


@pytest.mark.slow
def test_bench_real_backend_reports_every_metric(real_run):
    data, stdout = real_run
    assert data["config"]["dataset"] == "sharegpt" and data["config"]["backend"] == "real"
    summary = data["results"]["loong"]["50.0"]
    expected = set(summarize([], 1.0, SLO()))
    assert expected <= set(summary)
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert summary["output_token_throughput"] > 0 and summary["ttft_s"]["p99"] is not None
    assert data["sweep"]["loong"]["rates"] == [50.0]
    assert "loong" in stdout and "capacity loong" in stdout


@pytest.mark.slow
def test_bench_url_against_a_served_engine_matches_the_in_process_run(real_run, tmp_path):
    server = subprocess.Popen([*CLI, "serve", "--port", "0", *ENGINE], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    try:
        deadline, url = time.monotonic() + 60, None
        while url is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line and server.poll() is not None:
                pytest.fail("esp-run serve exited before it was ready")
            if m := re.search(r" at (http://\S+)$", line.strip()):
                url = m.group(1)
        assert url, "esp-run serve did not get ready"
        data, stdout = _bench(tmp_path, "url", "--url", url)
    finally:
        server.terminate()
        server.wait(timeout=30)
    remote = data["results"]["remote"]["50.0"]
    local = real_run[0]["results"]["loong"]["50.0"]
    assert remote["completed"] == 6 and remote["failed"] == 0
    assert remote["total_output_tokens"] == local["total_output_tokens"] > 0
    assert remote["total_input_tokens"] == local["total_input_tokens"]
    assert "capacity remote" in stdout


SIM = ["--backend", "sim", "--instances", "2", "--kv-tokens-per-instance", "65536", "--no-progress"]


def _run_ok(tmp_path, *args):
    res = subprocess.run([*CLI, "bench", *args], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         check=False)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_bench_sim_sweeps_policies_and_rates_on_the_virtual_clock(tmp_path):
    stdout = _run_ok(tmp_path, *SIM, "--dataset", "sharegpt", "--num-requests", "20", "--rates", "8,2",
                     "--policies", "loong,replicas", "--json", "sim.json", "--plot", "sim.png")
    data = json.loads((tmp_path / "sim.json").read_text())
    assert set(data["results"]) == {"loong", "replicas"}
    for policy in ("loong", "replicas"):
        assert list(data["results"][policy]) == ["2.0", "8.0"]
        assert all(s["completed"] == 20 for s in data["results"][policy].values())
        assert data["sweep"][policy]["rates"] == [2.0, 8.0]
        assert f"capacity {policy}" in stdout
        # per-request records: anyone can recompute any metric from them
        for summary in data["results"][policy].values():
            recs = [RequestRecord.from_dict(r) for r in summary["records"]]
            assert len(recs) == 20 and all(r.completed for r in recs)
            assert summarize(recs, summary["duration_s"], SLO())["e2e_s"]["mean"] == \
                pytest.approx(summary["e2e_s"]["mean"], rel=1e-4)
    assert (tmp_path / "sim.png").stat().st_size > 0


def test_bench_without_a_rate_replays_the_trace_timestamps(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"arrival_s": 0.5 * i, "input_len": 100 + i, "output_len": 4}) + "\n"
                             for i in range(5)))
    _run_ok(tmp_path, *SIM, "--trace", str(trace), "--num-requests", "5", "--json", "replay.json")
    data = json.loads((tmp_path / "replay.json").read_text())
    s = data["results"]["loong"]["trace"]
    assert s["completed"] == 5 and s["total_output_tokens"] == 20 and s["total_input_tokens"] == 510
    assert s["duration_s"] >= 2.0 and data["sweep"] == {}
