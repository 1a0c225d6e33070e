"""The asyncio engine: `generate()` streams a request's outputs; one loop runs
schedule -> execute -> update, each group's step as its own task (DESIGN 3, 5)."""
from __future__ import annotations

import asyncio
import bisect
import gc
import itertools
import logging
import random
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator

from esp.engine.admission import EncodedPrompt, Limits, check_fits, check_queue
from esp.engine.backend import Backend, BackendError, create_backend
from esp.engine.config import EngineConfig, dtype_name, dtype_of
from esp.engine.errors import EngineStartError, EngineUnavailable, InvalidRequest, Overloaded
from esp.engine.model_config import ModelConfig
from esp.engine.outputs import RequestOutput
from esp.engine.protocol import MigrateKV, MixedBatch, PrefillBatch, Step
from esp.engine.request import Request
from esp.engine.sampling_params import SamplingParams
from esp.engine.scheduler import Scheduler
from esp.engine.slo import LatencySLO
from esp.engine.sim import SyntheticPrompt
from esp.engine.generation_defaults import defaults_of
from esp.engine.status import SCHEDULE_BUCKETS, EngineStats, Health
from esp.policies import PolicyOptions, PolicySet, load_policy_set
from esp.costs.cost_model import CostModel
from esp.costs.presets import load_profile

log = logging.getLogger("esp.engine")


@dataclass(frozen=True)
class StepStat:
    """One finished step: its kind, group, tokens processed, and where the time went; `start_s`
    is the loop's clock when it was sent."""

    kind: str
    group: tuple[int, ...]
    tokens: int
    compute_s: float
    comm_s: float
    wall_s: float
    start_s: float = 0.0
    iterations: int = 1

    @classmethod
    def of(cls, step: Step, result, wall_s: float, start_s: float = 0.0) -> StepStat:
        if isinstance(step, PrefillBatch):
            kind, tokens = "prefill", sum(len(s.token_ids) for s in step.seqs)
        elif isinstance(step, MixedBatch):
            kind, tokens = "mixed", sum(len(s.token_ids) for s in step.seqs) + len(step.decode)
        elif isinstance(step, MigrateKV):
            kind, tokens = "migrate", len(step.src_slots)
        else:
            kind, tokens = "decode", len(step.rows)
        return cls(kind, step.group, tokens, result.compute_s, result.comm_s, wall_s, start_s, result.iterations)
_LONG_TEXT = 8192
_MAX_STEP_FAILURES = 2
requests_log = logging.getLogger("esp.requests")


class Engine:
    """Use as `async with Engine(config) as engine:`; then `async for out in engine.generate(...)`.

    States (`health()`): starting -> ok; ok -> recovering -> ok when a worker fails (running
    requests are recomputed from their prompt plus the tokens they already streamed); -> down
    when restarts keep failing; -> draining on `drain()` (shutdown)."""

    def __init__(self, config: EngineConfig, policies: PolicySet | None = None) -> None:
        """`policies` overrides the bundle named in `config` (for tests and embedding)."""
        self.config = config
        self.model_config = ModelConfig.from_dir(config.model_dir)
        self.policies = policies or load_policy_set(
            config.policy, PolicyOptions(config.max_prefill_tokens, config.max_batch_size, config.policy_options),
            scheduling=config.scheduling, batching=config.batching, scaling=config.scaling)
        self.tokenizer = None
        self.backend: Backend | None = None
        self.cost_model: CostModel | None = None
        self.scheduler: Scheduler | None = None
        self.limits: Limits | None = None
        self._queues: dict[int, asyncio.Queue] = {}
        self._ids: dict[str, int] = {}
        self._counter = itertools.count(1)
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None
        self._recovery: asyncio.Task | None = None
        self._state, self._detail = "starting", None
        self._since = 0.0
        self._start_s = 30.0
        self._restarts = self._overloaded = 0
        self._schedule_s = 0.0
        self._schedule_hist = [0] * (len(SCHEDULE_BUCKETS) + 1)
        self.step_stats: deque[StepStat] = deque(maxlen=10000)

    @property
    def model_name(self) -> str:
        return self.config.model_dir.name

    @property
    def started(self) -> bool:
        return self.scheduler is not None

    @property
    def max_model_len(self) -> int:
        """The longest prompt plus output a request may have: the context, or the KV of every
        instance together when that is smaller."""
        if self.limits is None:
            return self.model_config.max_position_embeddings
        return self.limits.max_model_len

    async def start(self) -> Engine:
        """Load the model on the workers; raises `EngineStartError` with one line saying what to do."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        self.cost_model = load_profile(self.config.profile) if self.config.profile else self.default_cost_model()
        self._check_profile_tp()
        self._log_plan()
        self.backend = create_backend(self.config, self.model_config, self.cost_model)
        try:
            await self.backend.start()
        except BackendError as err:
            raise EngineStartError(f"the workers failed to start: {err}") from None
        self.backend.on_failure = self._on_backend_failure
        self.backend.on_tokens = self._on_tokens
        self.tokenizer = self.backend.tokenizer
        slots = list(self.backend.kv_slots)
        waiting_tokens = self.config.max_waiting_tokens or 4 * sum(slots)
        self.limits = Limits(self.backend.max_model_len, sum(slots), self.config.max_waiting_requests, waiting_tokens)
        self.scheduler = Scheduler(self.policies, slots, clock=loop.time, cost_model=self.cost_model,
                                   decode_steps=self.config.decode_steps)
        self._start_s = loop.time() - t0
        self._state = "ok"
        log.info("ready in %.1f s: KV slots per instance %s, max model length %d tokens, policy %s",
                 self._start_s, slots, self.max_model_len, self.policies.name)
        self._loop_task = asyncio.create_task(self._run(), name="esp-engine-loop")
        return self

    def _check_profile_tp(self) -> None:
        """The profile times instances of `cost_model.tp` devices: under the simulator that is
        the instance (`--tp` must agree when given); on real workers a mismatch only misleads
        the policies."""
        model_tp, tp = self.cost_model.tp, self.config.tp
        if model_tp == tp or (self.config.backend == "sim" and tp == 1):
            return
        message = (f"--tp {tp}, but profile {self.cost_model.name} times instances of {model_tp} device(s): "
                   f"choose a profile for tp {tp} (e.g. a800-lwm7b-tp{tp})")
        if self.config.backend == "sim":
            raise EngineStartError(message)
        log.warning("%s; the policies' predictions will be off", message)

    def _log_plan(self) -> None:
        c, m = self.config, self.model_config
        log.info("model %s: %d layers, hidden %d, vocabulary %d, context %d tokens", c.model_dir,
                 m.num_hidden_layers, m.hidden_size, m.vocab_size, m.max_position_embeddings)
        log.info("backend %s on %s: %d instance(s) x %d process(es) (tp) x %d thread(s), dtype %s, "
                 "KV slots per instance %s", c.backend, c.device, c.instances, c.tp, c.threads,
                 dtype_name(c.dtype, c.device),
                 c.kv_tokens_per_instance or "from free memory")

    async def stop(self) -> None:
        for task in (self._recovery, self._loop_task):
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._end_all("abort", "engine stopped")
        if self.backend:
            await self.backend.shutdown()
        self._state, self._detail = "down", "engine stopped"

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests, let running ones finish for up to `timeout_s`, then abort the rest
        (their streams end with finish_reason "abort"). Returns how many were aborted."""
        if self._state != "down":
            self._state, self._detail = "draining", "the server is shutting down"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.scheduler and self.scheduler.requests and loop.time() < deadline:
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        return self._end_all("abort", "the server is shutting down")

    def _end_all(self, reason: str, detail: str) -> int:
        if not self.scheduler:
            return 0
        ended = [self.scheduler.end(rid, reason, detail if reason == "error" else None)
                 for rid in list(self.scheduler.requests)]
        self._deliver(ended)
        return len(ended)

    async def __aenter__(self) -> Engine:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def health(self) -> Health:
        if self._state == "starting":
            return Health("starting", "the engine is loading the model", self._start_s)
        if self._state == "recovering":
            left = self._start_s + 5.0 - (asyncio.get_running_loop().time() - self._since)
            return Health("recovering", self._detail, max(1.0, left))
        return Health(self._state, self._detail)

    def stats(self) -> EngineStats:
        s = self.scheduler
        if s is None:
            return EngineStats(0, 0, 0, (), (), 0, 0, 0, 0.0)
        waiting = len(s.waiting)
        return EngineStats(len(s.requests) - waiting, waiting, s.waiting.tokens,
                           tuple(a.num_slots for a in s.allocators), tuple(a.num_free for a in s.allocators),
                           self._restarts, s.recomputed_total, self._overloaded,
                           self._schedule_s, tuple(self._schedule_hist))

    # -- requests -----------------------------------------------------------------------
    async def generate(self, prompt: str | list[int] | EncodedPrompt, params: SamplingParams | None = None,
                       request_id: str | None = None, slo: LatencySLO | None = None) -> AsyncIterator[RequestOutput]:
        """Stream outputs until the request finishes. `slo`: the client's latency targets, in place
        of the service's (`EngineConfig.slo`) field by field (the scheduler may use them; the last
        output reports them in `esp["slo"]`). The first step raises `InvalidRequest`, `Overloaded`
        or `EngineUnavailable`; closing the iterator early aborts the request."""
        params = params or defaults_of(self.tokenizer).sampling_params()
        ids = prompt.ids if isinstance(prompt, EncodedPrompt) else (await self.encode(prompt)).ids
        req = self._admit(ids, params, request_id)
        req.slo = self.config.slo.for_request(len(ids), self._solo_prefill, slo) if self.config.slo else slo
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[req.id] = queue
        self._ids[req.external_id] = req.id
        self.scheduler.add(req)
        self.backend.new_work()
        self._wake.set()
        try:
            while True:
                out: RequestOutput = await queue.get()
                yield out
                if out.finished:
                    return
        finally:
            if req.finish_reason is None:
                self.abort(req.external_id)
            self._forget(req)

    def _solo_prefill(self, prompt_len: int) -> float:
        return self.cost_model.prefill_time([prompt_len], 1)

    async def encode(self, prompt: str | list[int]) -> EncodedPrompt:
        """Checked token ids of a prompt (a `SyntheticPrompt` is taken as it is: a length only)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("prompt is empty", "prompt")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as err:
                raise InvalidRequest(f"prompt is not valid Unicode (a lone surrogate at index {err.start})",
                                     "prompt") from None
            if self.tokenizer is None:
                raise self._unavailable()
            if len(prompt) > _LONG_TEXT:
                ids = await asyncio.get_running_loop().run_in_executor(None, self.tokenizer.encode, prompt)
            else:
                ids = self.tokenizer.encode(prompt)
            return EncodedPrompt(ids)
        if isinstance(prompt, SyntheticPrompt):
            return EncodedPrompt(prompt)
        if not isinstance(prompt, list) or not prompt:
            raise InvalidRequest("prompt must be a non-empty string or a non-empty list of token ids", "prompt")
        vocab = self.model_config.vocab_size
        if set(map(type, prompt)) != {int} or min(prompt) < 0 or max(prompt) >= vocab:
            raise InvalidRequest(f"token ids must be integers in [0, {vocab})", "prompt")
        return EncodedPrompt(list(prompt))

    def abort(self, request_id: str) -> bool:
        rid = self._ids.get(request_id)
        if rid is None or self.scheduler is None:
            return False
        req = self.scheduler.abort(rid)
        if req is not None:
            self._deliver([req])
            if req.in_step:
                self.backend.new_work()  # its round ends, so its row stops
        self._wake.set()
        return True

    def _unavailable(self) -> EngineUnavailable:
        h = self.health()
        return EngineUnavailable(f"the engine is {h.status}" + (f": {h.detail}" if h.detail else ""), h.retry_after)

    def _admit(self, ids, params: SamplingParams, request_id: str | None) -> Request:
        if self._state not in ("ok", "recovering"):
            raise self._unavailable()
        check_fits(self.limits, len(ids), params)
        external = request_id or f"cmpl-{uuid.uuid4().hex}"
        if external in self._ids:
            raise InvalidRequest(f"request id {external!r} is already in use")
        if self.limits.waiting_requests is not None or self.limits.waiting_tokens is not None:
            try:
                waiting = self.scheduler.waiting
                check_queue(self.limits, len(waiting), waiting.tokens, len(ids),
                            lambda: [r.num_tokens for r in waiting], self.cost_model, self.config.instances)
            except Overloaded:
                self._overloaded += 1
                raise
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        return Request(next(self._counter), external, ids, params, seed, self.tokenizer.eos_token_ids,
                       self.tokenizer.detokenizer(ids), clock=asyncio.get_running_loop().time)

    def _forget(self, req: Request) -> None:
        self._queues.pop(req.id, None)
        self._ids.pop(req.external_id, None)

    # -- loop ---------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            await self._loop()
        except Exception as err:
            self._control_plane_failed(err)
            raise

    def _control_plane_failed(self, err: Exception) -> None:
        """A bug in the control plane: tell every request, refuse new ones."""
        log.exception("engine loop failed")
        self._state, self._detail = "down", f"engine loop failed: {type(err).__name__}: {err}"
        self._end_all("error", self._detail)

    async def _loop(self) -> None:
        while True:
            self._plan()
            await self._wake.wait()
            self._wake.clear()

    def _plan(self) -> None:
        """schedule -> launch: each step runs in a task of its own."""
        if self._state == "recovering":
            return
        collect = gc.isenabled()  # no collection while instances wait for their steps
        gc.disable()
        try:
            t0 = time.perf_counter()
            steps, failed = self.scheduler.schedule()
            spent = time.perf_counter() - t0
            self._schedule_s += spent
            self._schedule_hist[bisect.bisect_left(SCHEDULE_BUCKETS, spent)] += 1
            delay = spent if self.config.charge_scheduler else 0.0
            for step in steps:
                task = asyncio.create_task(self._execute(step, delay))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        finally:
            if collect:  # once the tasks just created have sent their steps (the loop runs callbacks in order)
                asyncio.get_running_loop().call_soon(gc.enable)
        self._deliver(failed)

    async def _execute(self, step: Step, delay: float = 0.0) -> None:
        """Run a step; `delay`: the scheduler's planning time, charged on a simulated clock."""
        clock = asyncio.get_running_loop().time
        if delay:
            await asyncio.sleep(delay)
        t0 = clock()
        try:
            result = await self.backend.run(step)
            self.step_stats.append(StepStat.of(step, result, clock() - t0, t0))
            touched = self.scheduler.complete(step.step_id, result.sampled, result.failed)
        except BackendError as err:
            log.error("step %d on %s failed: %s", step.step_id, step.group, err)
            touched = self.scheduler.fail(step.step_id, str(err), _MAX_STEP_FAILURES)
        except Exception as err:  # a bug: the step's requests end with it, the engine goes on
            log.exception("step %d on %s failed", step.step_id, step.group)
            touched = self.scheduler.fail(step.step_id, f"internal error: {type(err).__name__}: {err}", 1) \
                if step.step_id in self.scheduler.in_flight else []
        try:
            self._plan()  # the next steps start before this one's outputs are streamed
        except Exception as err:
            self._control_plane_failed(err)
            return
        self._deliver(touched)

    def _on_tokens(self, step_id: int, sampled: dict[int, int]) -> None:
        """Tokens of a round's iteration: stream them; a request that ended ends the round."""
        touched = self.scheduler.apply_tokens(step_id, sampled)
        if any(r.finish_reason for r in touched):
            self.backend.end_round(step_id)
        self._deliver(touched)

    # -- recovery -----------------------------------------------------------------------
    def _on_backend_failure(self, reason: str) -> None:
        if self._state in ("ok", "draining") and self._recovery is None:
            self._recovery = asyncio.create_task(self._recover(reason), name="esp-engine-recovery")

    async def _recover(self, reason: str) -> None:
        """Wait for the failed steps to come back, restart the workers, recompute every request."""
        draining = self._state == "draining"
        self._state, self._detail = "recovering", f"restarting the workers after: {reason}"
        self._since = asyncio.get_running_loop().time()
        log.error("backend failed (%s); restarting the workers", reason)
        try:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
            for attempt in range(1, self.config.max_restarts + 1):
                try:
                    await self.backend.restart()
                    break
                except BackendError as err:
                    log.error("restart %d of %d failed: %s", attempt, self.config.max_restarts, err)
                    await asyncio.sleep(min(8.0, 0.5 * 2 ** attempt))
            else:
                self._state, self._detail = "down", f"the workers could not be restarted after: {reason}"
                self._end_all("error", self._detail)
                return
            self.scheduler.reset(list(self.backend.kv_slots))
            self._restarts += 1
            self._state, self._detail = ("draining", "the server is shutting down") if draining else ("ok", None)
            log.info("workers restarted in %.1f s; %d request(s) to recompute",
                     asyncio.get_running_loop().time() - self._since, len(self.scheduler.requests))
        finally:
            self._recovery = None
            self._wake.set()

    def _deliver(self, requests: list[Request]) -> None:
        for req in requests:
            if req.final_delivered:
                continue
            queue = self._queues.get(req.id)
            out = req.take_output()
            if queue is not None:
                queue.put_nowait(out)
            if out.finished and self.config.log_requests:
                t = out.timing
                requests_log.info("%s prompt=%d output=%d ttft=%s e2e=%s prefill_group=%s finish=%s%s",
                                  req.external_id, out.prompt_tokens, out.completion_tokens, _secs(t.ttft_s),
                                  _secs(t.e2e_s), (out.esp or {}).get("prefill_group"), out.finish_reason,
                                  f" error={out.error!r}" if out.error else "")

    def default_cost_model(self) -> CostModel:
        """A roofline from the model's shape: about 20 GFLOP/s per CPU thread, or H100-class
        numbers per CUDA device, times the `tp` processes of an instance (profiles measured by
        `esp-run profile` replace it)."""
        cfg = self.model_config
        cuda, tp = self.config.device == "cuda", self.config.tp
        return CostModel.roofline(
            num_layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, heads=cfg.num_attention_heads,
            kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, intermediate=cfg.intermediate_size,
            vocab=cfg.vocab_size, dtype_bytes=dtype_of(self.config.dtype, self.config.device).itemsize,
            flops_per_s=tp * (989e12 if cuda else 20e9 * self.config.threads),
            mem_bytes_per_s=tp * (3.35e12 if cuda else 10e9), link_bytes_per_s=tp * (450e9 if cuda else 5e9),
            max_dop=self.config.instances, tp=tp, name="roofline-cuda" if cuda else "roofline-cpu")


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}s"
