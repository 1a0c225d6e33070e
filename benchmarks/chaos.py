"""Chaos benchmark: a 2-instance `esp-run serve` on 127.0.0.1 under overload, mass client
disconnects, SIGKILL of a worker and SIGTERM of the server. Each scenario starts its own server.

    .venv/bin/python benchmarks/chaos.py --json docs/results/chaos.json
    .venv/bin/python benchmarks/chaos.py --scenarios a,c --overload-seconds 10

(a) overload: measure the service rate closed-loop, offer 2x that open-loop (Poisson) with a
    small `--max-waiting-requests`; every accepted request must finish with exactly its
    `max_tokens`, the rest get 503 (ideally with `Retry-After`); server RSS is sampled.
(b) disconnects: 100 streams are dropped once they have tokens; no KV slot may stay held.
(c) kill -9 of a worker (float64): every stream either matches its greedy oracle text or was
    told of an error; /health must be 200 again within the workers' start time + 5 s.
(d) SIGTERM: streams end with "length" or "abort" then [DONE]; exit 0 in time, no orphans.

Goals (exit 1 otherwise): 0 lost, 0 leaked, 0 duplicated, recovery in time.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

HOST = "127.0.0.1"
SERVER_FLAGS = ("--instances", "2", "--threads-per-instance", "1", "--kv-tokens-per-instance", "2048",
                "--log-requests", "off", "--host", HOST)
VOCAB_LOW, VOCAB_HIGH = 3, 4000
RECOVERY_SLACK_S = 5.0
ORPHAN_GRACE_S = 5.0
START_TIMEOUT_S = 180.0


def esp_run() -> str:
    local = Path(sys.executable).with_name("esp-run")
    return str(local) if local.exists() else (shutil.which("esp-run") or "esp-run")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def now() -> float:
    return time.monotonic()


# -- processes ---------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    out: list[int] = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            out += [int(c) for c in f.read_text().split()]
        except OSError:
            pass
    return sorted(set(out))


def descendants(pid: int) -> list[int]:
    found, todo = [], children(pid)
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children(p)
    return sorted(found)


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def identity(pid: int) -> tuple[int, str] | None:
    """(pid, start time): tells a process from a later one that reuses its pid."""
    try:
        return pid, Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return None


def rss_mib(pids: list[int]) -> float:
    kib = 0
    for pid in pids:
        try:
            m = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
        except OSError:
            continue
        kib += int(m.group(1)) if m else 0
    return kib / 1024


class Server:
    """`esp-run serve` as a subprocess in its own session, logging to a temporary file."""

    def __init__(self, *flags: str) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        fd, path = tempfile.mkstemp(prefix="esp-chaos-", suffix=".log")
        os.close(fd)
        self.log_path = Path(path)
        self.cmd = [esp_run(), "serve", *SERVER_FLAGS, "--port", str(self.port), *flags]
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0
        self.ready_log_s: float | None = None

    async def __aenter__(self) -> Server:
        t0 = now()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            await self.wait_healthy(t0)
        except BaseException:
            await self.__aexit__()
            raise
        self.startup_s = now() - t0
        m = re.search(r"ready in ([\d.]+) s", self.log_text())
        self.ready_log_s = float(m.group(1)) if m else None
        return self

    async def __aexit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                await asyncio.to_thread(self.proc.wait, 30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        for pid in session_members(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.log_path.unlink(missing_ok=True)

    async def wait_healthy(self, t0: float) -> None:
        async with client() as session:
            while (await health(session, self.url))[0] != 200:
                if self.proc.poll() is not None or now() - t0 > START_TIMEOUT_S:
                    raise RuntimeError(f"server did not start (exit {self.proc.poll()}):\n{self.log_tail()}")
                await asyncio.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def workers(self) -> list[int]:
        return [p for p in children(self.pid) if "resource_tracker" not in cmdline(p)]

    def rss_mib(self) -> float:
        return rss_mib([self.pid, *descendants(self.pid)])

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def session_members(sid: int) -> list[int]:
    """Processes in the session `sid` (the server's, which it leads): what it may have left behind."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int(d.joinpath("stat").read_text().rsplit(")", 1)[1].split()[4]) == sid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


# -- HTTP ---------------------------------------------------------------------------------
def client() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, force_close=True),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120))


async def health(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    try:
        async with session.get(url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return resp.status, await resp.text()
    except (aiohttp.ClientError, asyncio.TimeoutError) as err:
        return 0, type(err).__name__


def parse_metrics(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as resp:
        return parse_metrics(await resp.text())


def kv_held(m: dict[str, float]) -> int:
    """KV slots in use summed over instances: capacity minus free."""
    held = 0
    for name, cap in m.items():
        if name.startswith("esp_kv_capacity_slots{"):
            held += int(cap - m[name.replace("esp_kv_capacity_slots", "esp_kv_free_slots")])
    return held


async def wait_idle(session: aiohttp.ClientSession, url: str, timeout: float) -> tuple[bool, dict[str, float]]:
    deadline = now() + timeout
    while True:
        m = await metrics(session, url)
        idle = m.get("esp_num_requests_running", 0) == 0 and m.get("esp_num_requests_waiting", 0) == 0
        if idle or now() > deadline:
            return idle, m
        await asyncio.sleep(0.2)


@dataclass
class Stream:
    """What one streamed completion delivered."""

    status: int = 0
    retry_after: str | None = None
    text: str = ""
    tokens: int = 0
    finish_reason: str | None = None
    usage: dict | None = None
    error: dict | None = None
    done: bool = False
    exception: str | None = None
    after_done: int = 0
    first: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def feed(self, line: bytes) -> None:
        line = line.strip()
        if not line.startswith(b"data:"):
            return
        payload = line[5:].strip()
        if self.done:
            self.after_done += 1
        elif payload == b"[DONE]":
            self.done = True
        else:
            event = json.loads(payload)
            if "error" in event:
                self.error = event["error"]
            for choice in event.get("choices") or ():
                if choice.get("text"):
                    self.text += choice["text"]
                    self.tokens += 1
                    self.first.set()
                self.finish_reason = choice.get("finish_reason") or self.finish_reason
            self.usage = event.get("usage") or self.usage

    def complete(self, max_tokens: int) -> bool:
        """Finished by length with exactly `max_tokens` tokens, usage included, then [DONE]."""
        return (self.status == 200 and self.done and self.error is None and self.finish_reason == "length"
                and (self.usage or {}).get("completion_tokens") == max_tokens and not self.after_done)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("first")
        d["text"] = d["text"][:80]
        return d


def completion_body(prompt: list[int], max_tokens: int, **extra) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, **extra}


async def stream(session: aiohttp.ClientSession, url: str, body: dict, s: Stream | None = None,
                 drop: asyncio.Event | None = None) -> Stream:
    """POST a streaming completion; with `drop`, close the connection once it is set and the
    stream has a token (or has ended)."""
    s = s or Stream()
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    try:
        async with session.post(url + "/v1/completions", json=body) as resp:
            s.status, s.retry_after = resp.status, resp.headers.get("Retry-After")
            if resp.status != 200:
                await resp.read()
                return s
            async for line in resp.content:
                s.feed(line)
                if drop is not None and s.first.is_set():
                    await drop.wait()
                    resp.close()
                    return s
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as err:
        s.exception = f"{type(err).__name__}: {err}"
    finally:
        s.first.set()
    return s


def random_prompt(rng: random.Random, length: int) -> list[int]:
    return [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(length)]


async def all_first(streams: list[Stream], timeout: float, quiet: float | None = None) -> bool:
    """Wait until every stream has its first token or has ended; with `quiet`, stop waiting
    once that many seconds pass without a new first token (the rest wait for KV)."""
    deadline = now() + timeout
    seen, since = -1, now()
    while (n := sum(s.first.is_set() for s in streams)) < len(streams) and now() < deadline:
        if n != seen:
            seen, since = n, now()
        elif quiet is not None and now() - since >= quiet:
            break
        await asyncio.sleep(0.05)
    return n == len(streams)


# -- scenarios ----------------------------------------------------------------------------
async def service_rate(session: aiohttp.ClientSession, url: str, concurrency: int, seconds: float,
                       max_tokens: int) -> float:
    """Completions per second of a closed loop, counted after a warm-up fifth of `seconds`."""
    rng = random.Random(0)
    t0 = now()
    start, end = t0 + seconds / 5, t0 + seconds
    done = 0

    async def loop() -> None:
        nonlocal done
        while now() < end:
            s = await stream(session, url, completion_body(random_prompt(rng, rng.randint(8, 64)), max_tokens))
            done += s.complete(max_tokens) and start <= now() <= end

    await asyncio.gather(*(loop() for _ in range(concurrency)))
    return done / (end - start)


async def overload(args: argparse.Namespace) -> dict:
    max_tokens = 32
    async with Server("--max-waiting-requests", str(args.max_waiting_requests), *args.server_flag) as srv, \
            client() as session:
        rate = await service_rate(session, srv.url, args.calibrate_concurrency, args.calibrate_seconds, max_tokens)
        offered_rate = 2 * rate
        refused_before = (await metrics(session, srv.url)).get("esp_engine_rejected_overloaded_total", 0)
        rng = random.Random(1)
        mem = {"start": srv.rss_mib()}
        tasks: list[asyncio.Task] = []
        t0 = next_at = now()
        while next_at < t0 + args.overload_seconds:
            await asyncio.sleep(max(0.0, next_at - now()))
            body = completion_body(random_prompt(rng, rng.randint(8, 64)), max_tokens)
            tasks.append(asyncio.create_task(stream(session, srv.url, body)))
            if "middle" not in mem and now() - t0 >= args.overload_seconds / 2:
                mem["middle"] = srv.rss_mib()
            next_at += rng.expovariate(offered_rate)
        mem["end"] = srv.rss_mib()
        offered_s = now() - t0
        results = await asyncio.gather(*tasks)
        m = await metrics(session, srv.url)
    accepted = [s for s in results if s.status == 200]
    refused = [s for s in results if s.status == 503]
    hinted = [float(s.retry_after) for s in refused if s.retry_after is not None]
    return {
        "max_waiting_requests": args.max_waiting_requests, "max_tokens": max_tokens,
        "calibrate_concurrency": args.calibrate_concurrency, "service_rate_rps": round(rate, 2),
        "offered_rate_rps": round(offered_rate, 2),
        "offered_seconds": round(offered_s, 1), "offered": len(results), "accepted": len(accepted),
        "accepted_incomplete": sum(not s.complete(max_tokens) for s in accepted),
        "refused_503": len(refused), "retry_after_share": round(len(hinted) / len(refused), 3) if refused else None,
        "retry_after_median_s": statistics.median(hinted) if hinted else None,
        "other_errors": len(results) - len(accepted) - len(refused),
        "accepted_rate_rps": round(len(accepted) / offered_s, 2),
        "engine_rejected_overloaded": m.get("esp_engine_rejected_overloaded_total", 0) - refused_before,
        "rss_mib": {k: round(v, 1) for k, v in mem.items()},
        "rss_growth_mib": round(mem["end"] - mem["start"], 1),
        "examples": [s.summary() for s in results if s.status not in (200, 503) or
                     (s.status == 200 and not s.complete(max_tokens))][:3],
    }


async def disconnects(args: argparse.Namespace) -> dict:
    """Streams that wait for KV get their first token only once others have gone, so the
    connections are dropped in waves: all that have a token once no new one got its first."""
    n, max_tokens = 100, 200
    rng = random.Random(2)
    async with Server(*args.server_flag) as srv, client() as session:
        streams = [Stream() for _ in range(n)]
        drops = [asyncio.Event() for _ in range(n)]
        bodies = [completion_body(random_prompt(rng, rng.randint(8, 64)), max_tokens) for _ in range(n)]
        tasks = [asyncio.create_task(stream(session, srv.url, b, s, d)) for b, s, d in zip(bodies, streams, drops)]
        waves = await drop_in_waves(streams, drops, 60)
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        idle, m = await wait_idle(session, srv.url, 30)
        after = await stream(session, srv.url, completion_body([5, 6, 7], 8))
    return {
        "streams": n, "max_tokens": max_tokens, "waves": waves,
        "dropped_with_token": sum(s.tokens > 0 and not s.done for s in streams),
        "completed_before_drop": sum(s.done for s in streams), "failed": sum(s.status != 200 for s in streams),
        "idle_after": idle, "running": m.get("esp_num_requests_running"),
        "waiting": m.get("esp_num_requests_waiting"),
        "kv_held": kv_held(m), "serves_after": after.complete(8),
    }


async def drop_in_waves(streams: list[Stream], drops: list[asyncio.Event], timeout: float) -> list[int]:
    pending, waves, last = set(range(len(streams))), [], -1
    deadline = now() + timeout
    while pending and now() < deadline:
        await asyncio.sleep(0.5)
        ready = {i for i in pending if streams[i].first.is_set()}
        if ready and len(ready) in (len(pending), last):
            for i in ready:
                drops[i].set()
            pending -= ready
            waves.append(len(ready))
            ready = set()
        last = len(ready)
    for i in pending:
        drops[i].set()
    return waves


async def worker_kill(args: argparse.Namespace) -> dict:
    k, max_tokens = 8, 48
    rng = random.Random(3)
    prompts = [random_prompt(rng, n) for n in (5, 12, 23, 40, 64, 97, 150, 230)[:k]]
    async with Server("--dtype", "float64", *args.server_flag) as srv, client() as session:
        oracle = []
        for p in prompts:
            async with session.post(srv.url + "/v1/completions",
                                    json=completion_body(p, max_tokens, temperature=0)) as resp:
                oracle.append((await resp.json())["choices"][0]["text"])
        streams = [Stream() for _ in prompts]
        tasks = [asyncio.create_task(stream(session, srv.url, completion_body(p, max_tokens, temperature=0), s))
                 for p, s in zip(prompts, streams)]
        await all_first(streams, 30)
        workers = srv.workers()
        victim = workers[0]
        os.kill(victim, signal.SIGKILL)
        t_kill = now()
        in_flight = sum(not s.done for s in streams)
        recovery_s, left_ok = await recovery_time(session, srv.url, t_kill, srv.startup_s + 60)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        idle, m = await wait_idle(session, srv.url, 30)
        workers_after = srv.workers()
    lost = sum(s.finish_reason is None and s.error is None for s in streams)
    told = sum(s.error is not None for s in streams)
    duplicated = sum(s.finish_reason is not None and s.error is None and s.text != o for s, o in zip(streams, oracle))
    return {
        "streams": k, "max_tokens": max_tokens, "in_flight_at_kill": in_flight, "killed_pid": victim,
        "workers_before": workers, "workers_after": workers_after,
        "recovery_s": None if recovery_s is None else round(recovery_s, 2), "left_ok": left_ok,
        "startup_s": round(srv.startup_s, 2), "ready_log_s": srv.ready_log_s,
        "recovery_limit_s": round((srv.ready_log_s or srv.startup_s) + RECOVERY_SLACK_S, 2),
        "matched": sum(s.error is None and s.text == o for s, o in zip(streams, oracle)),
        "told": told, "lost": lost, "duplicated": duplicated,
        "restarts": m.get("esp_worker_restarts_total"), "recomputed": m.get("esp_recomputed_requests_total"),
        "idle_after": idle, "kv_held": kv_held(m),
        "examples": [{"stream": s.summary(), "oracle": o[:80]} for s, o in zip(streams, oracle)
                     if s.error is not None or s.text != o][:3],
    }


async def recovery_time(session: aiohttp.ClientSession, url: str, t_kill: float,
                        timeout: float) -> tuple[float | None, bool]:
    """Seconds from the kill to /health 200 after it had left 200 (polled every 50 ms)."""
    left_ok = False
    while now() - t_kill < timeout:
        status, _ = await health(session, url)
        if status != 200:
            left_ok = True
        elif left_ok:
            return now() - t_kill, True
        await asyncio.sleep(0.05)
    return None, left_ok


async def sigterm(args: argparse.Namespace) -> dict:
    shutdown_s = 3.0
    rng = random.Random(4)
    lengths = [8, 2000] * 8
    async with Server("--shutdown-timeout", str(shutdown_s), *args.server_flag) as srv, client() as session:
        procs = {p: (identity(p), cmdline(p)) for p in descendants(srv.pid)}
        streams = [Stream() for _ in lengths]
        bodies = [completion_body(random_prompt(rng, rng.randint(8, 64)), n) for n in lengths]
        tasks = [asyncio.create_task(stream(session, srv.url, b, s)) for b, s in zip(bodies, streams)]
        all_had_token = await all_first(streams, 10, quiet=1.0)
        with_token = sum(s.tokens > 0 for s in streams)
        t_term = now()
        srv.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(asyncio.gather(*tasks), shutdown_s + 30)
        streams_end_s = now() - t_term
        try:
            code = await asyncio.to_thread(srv.proc.wait, shutdown_s + 10)
        except subprocess.TimeoutExpired:
            code = None
        exit_s = now() - t_term
        at_exit = survivors(procs)
        left = await wait_gone(procs, ORPHAN_GRACE_S)
        log_tail = srv.log_tail(8)
    completed = sum(s.status == 200 and s.done and s.finish_reason == "length" and s.error is None for s in streams)
    aborted = sum(s.status == 200 and s.done and s.finish_reason == "abort" and s.error is None for s in streams)
    return {
        "streams": len(streams), "shutdown_timeout_s": shutdown_s, "with_token_at_term": with_token,
        "all_had_token": all_had_token, "completed": completed, "aborted": aborted,
        "bad": len(streams) - completed - aborted, "streams_end_s": round(streams_end_s, 2),
        "exit_code": code, "exit_s": round(exit_s, 2), "exit_limit_s": shutdown_s + 10,
        "processes_before": {p: c[:100] for p, (_, c) in procs.items()},
        "alive_at_exit": at_exit, "orphans": left, "orphan_grace_s": ORPHAN_GRACE_S,
        "examples": [s.summary() for s in streams if s.finish_reason not in ("length", "abort") or not s.done][:3],
        "log_tail": log_tail.splitlines() if code != 0 else [],
    }


def survivors(procs: dict[int, tuple]) -> dict[int, str]:
    """Recorded processes still in /proc (zombies included), with their state."""
    return {p: proc_state(p) for p, (ident, _) in procs.items() if ident and identity(p) == ident}


async def wait_gone(procs: dict[int, tuple], timeout: float) -> dict[int, str]:
    deadline = now() + timeout
    while (left := survivors(procs)) and now() < deadline:
        await asyncio.sleep(0.1)
    return left


SCENARIOS = {"a": ("overload", overload), "b": ("disconnects", disconnects), "c": ("worker kill -9", worker_kill),
             "d": ("SIGTERM", sigterm)}


# -- verdict ------------------------------------------------------------------------------
def failures(key: str, r: dict) -> list[str]:
    if "exception" in r:
        return [f"{key}: {r['exception']}"]
    checks = {
        "a": [("lost (accepted but incomplete)", r.get("accepted_incomplete"), 0),
              ("other errors", r.get("other_errors"), 0)],
        "b": [("leaked KV slots", r.get("kv_held"), 0), ("not idle after", not r.get("idle_after"), False),
              ("serves after", r.get("serves_after"), True)],
        "c": [("lost", r.get("lost"), 0), ("duplicated", r.get("duplicated"), 0),
              ("leaked KV slots", r.get("kv_held"), 0), ("kill went unnoticed", not r.get("restarts"), False)],
        "d": [("bad streams", r.get("bad"), 0), ("exit code", r.get("exit_code"), 0),
              ("orphans", len(r.get("orphans", [])), 0)],
    }[key]
    out = [f"{key}: {name} = {got}" for name, got, want in checks if got != want]
    if key == "c" and (r["recovery_s"] is None or r["recovery_s"] > r["recovery_limit_s"]):
        out.append(f"c: recovery {r['recovery_s']} s over {r['recovery_limit_s']} s")
    if key == "d" and r["exit_s"] > r["exit_limit_s"]:
        out.append(f"d: exit after {r['exit_s']} s over {r['exit_limit_s']} s")
    return out


def line(key: str, r: dict) -> str:
    if "exception" in r:
        return f"({key}) {SCENARIOS[key][0]}: ERROR {r['exception']}"
    if key == "a":
        return (f"(a) overload: service {r['service_rate_rps']} req/s (closed loop x{r['calibrate_concurrency']}), "
                f"offered {r['offered']} at {r['offered_rate_rps']} req/s for {r['offered_seconds']} s "
                f"(max waiting {r['max_waiting_requests']}): "
                f"accepted {r['accepted']} (incomplete {r['accepted_incomplete']}), 503 {r['refused_503']} "
                f"(Retry-After {r['retry_after_share']}, median {r['retry_after_median_s']} s), "
                f"other {r['other_errors']}; RSS {r['rss_mib']['start']}->{r['rss_mib'].get('middle')}->"
                f"{r['rss_mib']['end']} MiB (+{r['rss_growth_mib']})")
    if key == "b":
        return (f"(b) disconnects: {r['streams']} streams dropped in waves {r['waves']}, {r['dropped_with_token']} "
                f"mid-stream, {r['completed_before_drop']} done before, {r['failed']} refused; idle after "
                f"{r['idle_after']}; KV held {r['kv_held']}; serves after {r['serves_after']}")
    if key == "c":
        return (f"(c) kill -9: {r['in_flight_at_kill']}/{r['streams']} in flight; matched {r['matched']}, "
                f"told {r['told']}, lost {r['lost']}, duplicated {r['duplicated']}; recovery {r['recovery_s']} s "
                f"(limit {r['recovery_limit_s']} s: workers' start {r['ready_log_s']} s + {RECOVERY_SLACK_S:g}); "
                f"restarts {r['restarts']}, recomputed {r['recomputed']}; KV held {r['kv_held']}")
    return (f"(d) SIGTERM: {r['streams']} streams ({r['with_token_at_term']} with tokens): completed {r['completed']}, "
            f"aborted {r['aborted']}, bad {r['bad']}; exit {r['exit_code']} after {r['exit_s']} s "
            f"(limit {r['exit_limit_s']} s); children left at exit {len(r['alive_at_exit'])}, "
            f"{ORPHAN_GRACE_S:g} s later {len(r['orphans'])} of {len(r['processes_before'])}")


async def run(args: argparse.Namespace) -> dict:
    results = {}
    for key in args.scenarios:
        t0 = now()
        try:
            results[key] = await SCENARIOS[key][1](args)
        except Exception as err:
            results[key] = {"exception": f"{type(err).__name__}: {err}"}
        results[key]["seconds"] = round(now() - t0, 1)
        print(line(key, results[key]), flush=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", default="a,b,c,d", type=lambda t: [s.strip() for s in t.split(",") if s.strip()])
    ap.add_argument("--overload-seconds", type=float, default=60.0)
    ap.add_argument("--calibrate-seconds", type=float, default=10.0)
    ap.add_argument("--calibrate-concurrency", type=int, default=32,
                    help="closed-loop streams measuring the service rate in (a); 8 is latency-bound, not saturated")
    ap.add_argument("--max-waiting-requests", type=int, default=16, help="the server's queue limit in (a)")
    ap.add_argument("--server-flag", action="append", default=[], metavar="FLAG",
                    help="extra `esp-run serve` flag for every server (repeat; e.g. --server-flag=--log-level=warning)")
    ap.add_argument("--json", type=Path, metavar="OUT")
    args = ap.parse_args()
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenarios {sorted(unknown)}; choose from a,b,c,d")
    t0 = now()
    results = asyncio.run(run(args))
    fails = [f for key, r in results.items() for f in failures(key, r)]
    print(f"{'PASS' if not fails else 'FAIL'} in {now() - t0:.0f} s" + "".join(f"\n  {f}" for f in fails))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"scenarios": results, "failures": fails, "pass": not fails}, indent=1) + "\n")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
