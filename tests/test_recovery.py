"""Issue 9 on the real engine (2 CPU workers, float64): a request that breaks sampling fails
alone; a killed worker is survived (restart, recompute, no token repeated or lost); the
queue is bounded; drain ends what is left with "abort"; workers die with their parent and
listen on loopback only. The oracle is a solo greedy run on a healthy engine."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import pytest_asyncio

from esp.engine import EngineConfig, SamplingParams
from esp.engine.engine import Engine
from esp.engine.errors import EngineUnavailable, InvalidRequest, Overloaded

pytestmark = pytest.mark.slow
in_engine_loop = pytest.mark.asyncio(loop_scope="module")

CONFIG = EngineConfig(instances=2, kv_tokens_per_instance=1024, dtype="float64", threads_per_instance=1,
                      policy="static-sp", log_requests=False, max_waiting_requests=2)
PROMPT = [1, 300, 400, 500, 600, 700, 800, 900]
GREEDY = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def engine():
    async with Engine(CONFIG) as eng:
        yield eng


async def final(engine, prompt, params):
    return [o async for o in engine.generate(prompt, params)][-1]


def all_free(engine) -> bool:
    s = engine.scheduler
    return s.free_slots() == [a.num_slots for a in s.allocators] and not s.requests


@in_engine_loop
async def test_a_request_whose_sampling_fails_ends_alone_and_the_engine_keeps_serving(engine):
    solo = await final(engine, PROMPT, GREEDY)
    poisoned = SamplingParams(max_tokens=8, ignore_eos=True)
    object.__setattr__(poisoned, "temperature", 5e-324)  # past the edge's validation: defence in depth
    bad, good = await asyncio.gather(final(engine, PROMPT[:5], poisoned), final(engine, PROMPT, GREEDY))
    assert bad.finish_reason == "error" and "sampling failed" in bad.error
    assert good.finish_reason == "length" and good.token_ids == solo.token_ids
    assert engine.health().ok and engine.stats().restarts == 0
    assert all_free(engine)


@in_engine_loop
async def test_killed_worker_is_restarted_and_the_stream_continues_without_a_repeat(engine):
    solo = await final(engine, PROMPT, GREEDY)
    old = [link.process for link in engine.backend.links]
    streamed, states = [], []

    async def watch():
        while True:
            states.append(engine.health())
            await asyncio.sleep(0.02)

    watcher = asyncio.create_task(watch())
    async for out in engine.generate(PROMPT, GREEDY):
        streamed += out.new_token_ids
        if len(streamed) >= 5 and old[1].is_alive():
            os.kill(old[1].pid, signal.SIGKILL)
        last = out
    watcher.cancel()
    recovering = [h for h in states if h.status == "recovering"]
    assert recovering and all(h.retry_after >= 1 and "worker 1" in h.detail for h in recovering)
    states = [h.status for h in states]
    assert last.finish_reason == "length" and streamed == solo.token_ids == last.token_ids
    assert last.esp["recomputed"] == 1
    assert "recovering" in states and engine.health().ok
    stats = engine.stats()
    assert stats.restarts == 1 and stats.recomputed_requests >= 1
    assert all(p.exitcode is not None for p in old), "the old workers are reaped"
    assert old[1].exitcode == -signal.SIGKILL
    assert all(link.process.is_alive() for link in engine.backend.links)
    again = await final(engine, PROMPT, GREEDY)
    assert again.token_ids == solo.token_ids and all_free(engine)


@in_engine_loop
async def test_requests_that_can_never_fit_are_refused_up_front(engine):
    with pytest.raises(InvalidRequest, match="KV slots") as err:
        await final(engine, [1] * 1000, SamplingParams(max_tokens=1200))
    assert err.value.param == "max_tokens"
    assert engine.max_model_len == 2048 and all_free(engine)


@in_engine_loop
async def test_a_full_waiting_queue_answers_overloaded_with_a_drain_time(engine):
    # four requests arrive in one loop turn, before the engine plans: two fill the queue
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    outs = await asyncio.gather(*(final(engine, PROMPT, params) for _ in range(4)), return_exceptions=True)
    refused = [o for o in outs if isinstance(o, Overloaded)]
    served = [o for o in outs if not isinstance(o, Exception)]
    assert len(refused) == 2 and all(e.retry_after >= 1 and "2 requests are waiting" in str(e) for e in refused)
    assert len(served) == 2 and all(o.finish_reason == "length" and len(o.token_ids) == 30 for o in served)
    assert engine.stats().rejected_overloaded == 2
    assert all_free(engine)


@in_engine_loop
async def test_drain_lets_short_requests_finish_and_aborts_the_rest():
    async with Engine(dataclasses.replace(CONFIG, instances=1, kv_tokens_per_instance=1024)) as eng:
        short = asyncio.create_task(final(eng, PROMPT, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)))
        long = asyncio.create_task(final(eng, PROMPT, SamplingParams(max_tokens=900, temperature=0,
                                                                     ignore_eos=True)))
        await asyncio.sleep(0.3)
        aborted = await eng.drain(1.0)
        assert eng.health().status == "draining"
        with pytest.raises(EngineUnavailable, match="shutting down"):
            await final(eng, PROMPT, GREEDY)
        s, lng = await short, await long
        assert s.finish_reason == "length" and lng.finish_reason == "abort" and aborted == 1
        assert len(lng.token_ids) < 900


def test_workers_die_with_a_killed_parent_and_listen_on_loopback_only(tmp_path):
    script = textwrap.dedent("""
        import asyncio, sys
        from esp.engine import EngineConfig
        from esp.engine.engine import Engine

        async def main():
            async with Engine(EngineConfig(instances=2, kv_tokens_per_instance=256, threads_per_instance=1)) as e:
                print(" ".join(str(l.process.pid) for l in e.backend.links), flush=True)
                await asyncio.sleep(600)

        if __name__ == "__main__":
            asyncio.run(main())
    """)
    (tmp_path / "parent.py").write_text(script)
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
        listening = [addr for pid in pids for addr in _listening(pid)]
        assert listening, "the workers hold the gloo sockets"
        assert all(a in ("127.0.0.1", "::1", "::ffff:127.0.0.1") for a in listening), listening
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids)
    finally:
        parent.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _listening(pid: int) -> list[str]:
    """Addresses of the TCP sockets in LISTEN state that process `pid` holds (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, decode in (("tcp", _ipv4), ("tcp6", _ipv6)):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:
                    found.append(decode(cols[1].split(":")[0]))
    return found


def _ipv4(hexaddr: str) -> str:
    return ".".join(str(b) for b in reversed(bytes.fromhex(hexaddr)))


def _ipv6(hexaddr: str) -> str:
    import ipaddress
    raw = b"".join(bytes.fromhex(hexaddr[i:i + 8])[::-1] for i in range(0, 32, 8))
    addr = ipaddress.IPv6Address(raw)
    return str(addr.ipv4_mapped and f"::ffff:{addr.ipv4_mapped}" or addr)
