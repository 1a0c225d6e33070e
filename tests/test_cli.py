"""The `esp-run` command line, run as a real subprocess."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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
    assert set(out["timing"]) == {"ttft_s", "tpot_s", "e2e_s", "queue_s"}


@pytest.mark.parametrize("args, message", [
    (["generate"], "one of the arguments --prompt --prompt-ids is required"),
    (["generate", "--prompt", "x", "--policy", "nope"], "unknown policy 'nope'; choices: chunked, disagg, loong, replicas, static-sp"),
    (["generate", "--prompt-ids", "1,a"], "comma-separated integers"),
    (["generate", "--prompt", "x", "--temperature", "500"], "temperature must be 0 (greedy) or in"),
    (["serve", "--instances", "0"], "positive integer"),
    (["generate", "--prompt", "x", "--policy-option", "order=sjf"], "loong option order='sjf': one of hrrn, fcfs"),
    (["generate", "--prompt", "x", "--policy-option", "noequals"], "must be KEY=VALUE"),
    (["generate", "--prompt", "x", "--target-tpot-ms", "0"], "must be a positive number of milliseconds, got 0"),
    (["generate", "--prompt", "x", "--target-ttft-floor-ms", "-1"], "non-negative number of milliseconds"),
])
def test_cli_bad_flags_give_one_line_and_nonzero_exit(args, message):
    res = subprocess.run([sys.executable, "-m", "esp.cli.main", *args], capture_output=True, text=True, timeout=120)
    assert res.returncode != 0
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_serve_flag_parsing():
    from esp.cli.main import build_parser, engine_config
    from esp.cli.serve import curl_example
    from esp.engine.slo import ServiceSLO

    args = build_parser().parse_args(["serve", "--max-body-bytes", "1M", "--allowed-origins", "http://a.test/, *",
                                      "--shutdown-timeout", "2.5", "--max-waiting-requests", "none",
                                      "--log-requests", "off", "--port", "0"])
    assert (args.max_body_bytes, args.allowed_origins, args.shutdown_timeout) == (1 << 20, ("http://a.test", "*"), 2.5)
    assert args.max_waiting_requests is None and args.log_requests is False and args.port == 0
    assert engine_config(args).slo is None
    args = build_parser().parse_args(["serve", "--target-ttft-scale", "5", "--target-ttft-floor-ms", "250",
                                      "--target-tpot-ms", "100"])
    assert engine_config(args).slo == ServiceSLO(ttft_scale=5.0, ttft_floor_s=0.25, tpot_s=0.1)
    args = build_parser().parse_args(["serve", "--target-tpot-ms", "50"])
    assert engine_config(args).slo == ServiceSLO(tpot_s=0.05)
    curl = curl_example("http://0.0.0.0:8000", "secret", from_env=True)
    assert curl.startswith("curl http://127.0.0.1:8000/v1/completions ") and "Bearer $ESP_API_KEY" in curl
    assert "secret" not in curl_example("http://[::]:8000", "secret", from_env=False)


# -- startup errors: one line, before anything loads -------------------------------------------
ESP_RUN = [sys.executable, "-m", "esp.cli.main"]
SMALL = ["--instances", "2", "--threads-per-instance", "1", "--kv-tokens-per-instance", "4096"]


def esp_run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*ESP_RUN, *args], capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(res: subprocess.CompletedProcess, *fragments: str) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0, res.stderr
    assert len(lines) == 1 and lines[0].startswith("esp-run: error: "), res.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def torch_has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


@pytest.mark.skipif(torch_has_cuda(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["serve", "--port", "0"]])
def test_device_cuda_without_cuda_says_how_to_get_it(command):
    res = esp_run(*command, "--device", "cuda")
    assert_one_error_line(res, "--device cuda", "CUDA build of torch", "pip install", "--device cpu")


@pytest.mark.parametrize("make, missing", [
    (lambda tmp: tmp / "nonexistent", "no such directory"),
    (lambda tmp: tmp, "missing config.json, *.safetensors weights, tokenizer.json or tokenizer.model"),
])
def test_a_bad_model_directory_is_one_line_naming_it(tmp_path, make, missing):
    path = str(make(tmp_path))
    res = esp_run("generate", "--prompt", "x", "--model", path)
    assert_one_error_line(res, f"--model {path}", missing, "config.json", "tokenizer.json", "tokenizer.model")


def test_serve_on_a_port_in_use_fails_before_the_model_loads():
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        t0 = time.monotonic()
        res = esp_run("serve", "--port", str(port), *SMALL, timeout=60)
        elapsed = time.monotonic() - t0
    assert_one_error_line(res, str(port), "in use")
    assert elapsed < 10, f"took {elapsed:.1f} s: the port must be bound before the workers start"


def test_profile_reports_progress_on_stderr(tmp_path):
    out = tmp_path / "p.json"
    res = esp_run("profile", "--quick", "--max-len", "128", "--instances", "1", "--threads-per-instance", "1",
                  "--kv-tokens-per-instance", "4096", "--out", str(out), timeout=300)
    assert res.returncode == 0, res.stderr
    assert out.is_file() and "wrote" in res.stdout
    progress = [line for line in res.stderr.splitlines() if "esp.profiler" in line]
    assert re.search(r"\[ *\d+\.\d s\] workers ready", res.stderr), res.stderr
    assert re.search(r"\[ *\d+\.\d s\] prefill dop=1 \[1/\d+\] 16 tokens: \d", res.stderr), res.stderr
    assert any("decode dop=1" in line for line in progress) and "Traceback" not in res.stderr


# -- a running server: drain on SIGTERM / Ctrl-C ----------------------------------------------
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds worker processes in /proc")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # [state, ppid, ...]; the name may hold spaces


def session(sid: int) -> set[int]:
    """Live processes of session `sid`: the server started with `start_new_session` and all its
    workers, even those its exit would have left to init."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat(int(entry))) and fields[0] not in "ZX" and int(fields[3]) == sid:
            found.add(int(entry))
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`esp-run serve` in its own session (like a terminal's foreground job), output in files."""

    def __init__(self, tmp_path: Path, *flags: str) -> None:
        self.port = free_port()
        self.out, self.err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([*ESP_RUN, "serve", "--port", str(self.port), *SMALL, *flags],
                                         stdout=out, stderr=err, start_new_session=True)

    def wait_ready(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while f":{self.port}" not in self.out.read_text():
            assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.err.read_text()}"
            assert time.monotonic() < deadline, f"not ready in {timeout} s: {self.err.read_text()}"
            time.sleep(0.2)

    def stream(self, max_tokens: int):
        """Yield the SSE `data:` payloads of a streaming completion."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        body = {"prompt": "Return the number of", "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
                "temperature": 0}
        conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        try:
            while line := resp.readline():
                if line.startswith(b"data: "):
                    yield line[6:].strip().decode()
        finally:
            conn.close()

    def workers(self) -> set[int]:
        return session(self.proc.pid) - {self.proc.pid}

    def assert_no_process_left(self, within: float = 10) -> None:
        deadline = time.monotonic() + within
        while (left := session(self.proc.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left, f"processes left behind: {sorted(left)}"

    def kill(self) -> None:
        for pid in session(self.proc.pid):
            os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait()


@needs_proc
@pytest.mark.slow
@pytest.mark.parametrize("sig, to_group", [(signal.SIGTERM, False), (signal.SIGINT, True)], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_drains_the_server_and_exits_0(tmp_path, sig, to_group):
    """SIGTERM to the server, or SIGINT to its whole process group as Ctrl-C in a terminal does:
    the in-flight stream still ends with [DONE], the process exits 0 without a traceback, and
    no worker is left."""
    server = Server(tmp_path, "--shutdown-timeout", "2")
    try:
        server.wait_ready()
        assert len(server.workers()) >= 2  # two instances
        events = server.stream(max_tokens=3000)
        first = json.loads(next(events))
        assert first["choices"][0]["text"]
        (os.killpg if to_group else os.kill)(server.proc.pid, sig)
        rest = list(events)
        assert rest and rest[-1] == "[DONE]", rest[-3:]
        chunks = [json.loads(e) for e in rest[:-1]]
        assert "error" not in chunks[-1], chunks[-1]
        assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "abort")
        assert server.proc.wait(timeout=60) == 0, server.err.read_text()
        server.assert_no_process_left()
        log = server.err.read_text()
        assert "Traceback" not in log and "draining" in log, log
    finally:
        server.kill()


@needs_proc
@pytest.mark.slow
def test_a_second_sigterm_exits_at_once_and_leaves_no_workers(tmp_path):
    server = Server(tmp_path, "--shutdown-timeout", "120")
    try:
        server.wait_ready()
        events = server.stream(max_tokens=3000)
        next(events)
        server.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # draining: the request runs on, for up to 120 s
        assert server.proc.poll() is None
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=15) == 128 + signal.SIGTERM
        assert time.monotonic() - t0 < 10
        server.assert_no_process_left()
        log = server.err.read_text()
        assert "second SIGTERM: exiting now" in log and "Traceback" not in log, log
    finally:
        server.kill()


@needs_proc
@pytest.mark.slow
def test_ctrl_c_while_the_workers_start_stops_cleanly(tmp_path):
    """Ctrl-C reaches the workers too; while they are still importing torch they must not die
    with a KeyboardInterrupt traceback: the server starts, drains at once and exits 0."""
    server = Server(tmp_path, "--shutdown-timeout", "2")
    try:
        deadline = time.monotonic() + 60
        while not server.workers():  # the first worker (or the resource tracker) was spawned
            assert server.proc.poll() is None, server.err.read_text()
            assert time.monotonic() < deadline, "no worker started"
            time.sleep(0.01)
        time.sleep(0.3)  # the workers are importing torch now (for a second or more on 2 cores)
        os.killpg(server.proc.pid, signal.SIGINT)
        assert server.proc.wait(timeout=120) == 0, server.err.read_text()
        server.assert_no_process_left()
        log = server.err.read_text()
        assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    finally:
        server.kill()
