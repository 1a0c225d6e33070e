"""A request's life in the main process: its tokens, its text, its KV placement, and when it ends.

`status` is its one lifecycle field: WAITING (queued; a chunked prompt may already hold KV)
-> PREFILLING (in a prefill or chunk step) -> WAITING again after a chunk, or RUNNING ->
DECODING (in a decode round, as a rider, or having its KV moved) -> RUNNING ... -> FINISHED.
Every change the policies can see (status, tokens, placement) goes through a method here,
which bumps `version` (and the epoch of the waiting queue it is in, `queue`), so the
scheduler's cached views are rebuilt exactly when needed. Requests compare by identity.
"""
from __future__ import annotations

import enum
import time
from array import array
from dataclasses import dataclass, field
from typing import Callable

from esp.engine.esp_record import EspRecord
from esp.engine.outputs import RequestOutput, Timing
from esp.engine.sampling_params import SamplingParams
from esp.engine.slo import LatencySLO


class Status(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    DECODING = "decoding"
    FINISHED = "finished"


IN_STEP = frozenset({Status.PREFILLING, Status.DECODING})


@dataclass(eq=False)
class Request:
    """Owned by the scheduler. `placement` is `{rank: array('q') of slots}` in position order, with
    ranks in the order their ranges appear in the sequence; `sampling_on` the ranks whose worker
    has its sampling parameters (they, and the holders, forget it when it is freed). Times come
    from `clock` (the event loop's, which is virtual under the simulator)."""

    id: int
    external_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    eos_ids: frozenset[int]
    detokenizer: object
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)
    arrival: float | None = None
    slo: LatencySLO | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    status: Status = Status.WAITING
    placement: dict[int, array] = field(default_factory=dict)
    version: int = 0
    sampling_on: set[int] = field(default_factory=set)
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    scheduled_at: float | None = None
    failures: int = 0
    recomputed: int = 0
    final_delivered: bool = False
    esp: EspRecord = field(default_factory=EspRecord)
    queue: object = field(default=None, repr=False)
    _sent_text: int = 0
    _sent_tokens: int = 0

    def __post_init__(self) -> None:
        if self.arrival is None:
            self.arrival = self.clock()

    def token_slice(self, start: int, end: int):
        """Tokens `[start, end)` of the prompt followed by the output, without joining the two
        (a prompt may be 500K tokens)."""
        prompt = self.prompt_ids
        if end <= len(prompt):
            return prompt[start:end]
        if start >= len(prompt):
            return self.output_ids[start - len(prompt):end - len(prompt)]
        return prompt[start:] + self.output_ids[:end - len(prompt)]

    @property
    def num_tokens(self) -> int:
        """Prompt plus output tokens."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_kv(self) -> int:
        return sum(len(s) for s in self.placement.values())

    @property
    def in_step(self) -> bool:
        return self.status in IN_STEP

    def _changed(self) -> None:
        self.version += 1
        if self.queue is not None:
            self.queue.changed()

    # -- lifecycle ----------------------------------------------------------------------
    def enter_step(self) -> None:
        """Into a step: a waiting request is prefilled, a running one decodes or moves KV."""
        if self.status is Status.WAITING:
            self.status = Status.PREFILLING
        elif self.status is Status.RUNNING:
            self.status = Status.DECODING
        else:
            raise RuntimeError(f"request {self.id} cannot enter a step while {self.status.value}")
        self._changed()

    def leave_step(self, sampled: bool) -> None:
        """Out of a step: a decoding request is RUNNING again; a prefilling one is RUNNING when
        the step `sampled` its next token (its prompt is all in KV), else WAITING for its next
        chunk. (A KV count cannot tell: a chunk may end one token before the prompt does.)"""
        self.status = Status.RUNNING if self.status is Status.DECODING or sampled else Status.WAITING
        self._changed()

    def requeue(self) -> None:
        """Back to WAITING, holding nothing (preempted, failed or reset)."""
        self.status = Status.WAITING
        self._changed()

    def finish(self, reason: str, error: str | None = None) -> None:
        """Decide the outcome now; in a step, the request stays in it until the step returns."""
        self.finish_reason = reason
        self.error = error
        self.finished_at = self.clock()
        if not self.in_step:
            self.status = Status.FINISHED
        self._changed()

    # -- placement ----------------------------------------------------------------------
    def add_slots(self, rank: int, slots) -> None:
        """Slots for the next positions, on `rank` (which becomes the last range)."""
        held = self.placement.pop(rank, None)
        if held is None:
            held = array("q")
        held.extend(slots)
        self.placement[rank] = held
        self._changed()

    def drop_last(self, rank: int, n: int) -> array:
        """Remove and return the last `n` slots `rank` holds."""
        held = self.placement[rank]
        out = held[len(held) - n:]
        del held[len(held) - n:]
        if not held:
            del self.placement[rank]
        self._changed()
        return out

    def take_placement(self) -> dict[int, array]:
        """Everything it holds, which it no longer does."""
        out, self.placement = self.placement, {}
        self.sampling_on = set()
        self._changed()
        return out

    # -- tokens -------------------------------------------------------------------------
    def append(self, token: int) -> None:
        """Add one sampled token and decide whether the request is now finished."""
        now = self.clock()
        self.first_token_at = self.first_token_at or now
        self.output_ids.append(token)
        self._changed()
        if token in self.eos_ids and not self.params.ignore_eos:
            self.text += self.detokenizer.flush()
            self.finish("stop")
            return
        before = len(self.text)
        self.text += self.detokenizer.step([token])
        for stop in self.params.stop:
            cut = self.text.find(stop, max(0, before - len(stop) + 1))
            if cut >= 0:
                self.text = self.text[:cut]
                self.finish("stop")
                return
        if len(self.output_ids) >= self.params.max_tokens:
            self.text += self.detokenizer.flush()
            self.finish("length")

    def extend(self, tokens: list[int]) -> None:
        """`append` each of `tokens` until the request finishes; with no stop string and no EOS
        among them, in one go (a simulated round brings many)."""
        if self.finish_reason:
            return
        params = self.params
        if len(tokens) == 1 or params.stop or not (params.ignore_eos or self.eos_ids.isdisjoint(tokens)):
            for token in tokens:
                self.append(token)
                if self.finish_reason:
                    return
            return
        now = self.clock()
        self.first_token_at = self.first_token_at or now
        take = tokens[:params.max_tokens - len(self.output_ids)]
        self.output_ids.extend(take)
        self._changed()
        self.text += self.detokenizer.step(take)
        if len(self.output_ids) >= params.max_tokens:
            self.text += self.detokenizer.flush()
            self.finish("length")

    def take_output(self) -> RequestOutput:
        """The delta since the last call. While running, text that could still become a stop
        string is held back."""
        hold = 0 if self.finish_reason else max((len(s) - 1 for s in self.params.stop), default=0)
        upto = max(self._sent_text, len(self.text) - hold)
        new_text = self.text[self._sent_text: upto]
        self._sent_text = upto
        new_ids = self.output_ids[self._sent_tokens:]
        self._sent_tokens = len(self.output_ids)
        self.final_delivered = self.finish_reason is not None
        return RequestOutput(
            request_id=self.external_id, new_token_ids=new_ids, new_text=new_text,
            token_ids=list(self.output_ids), text=self.text[:upto], prompt_tokens=len(self.prompt_ids),
            finish_reason=self.finish_reason, error=self.error, timing=self.timing(),
            esp=self._esp_summary() if self.finish_reason else {})

    def _esp_summary(self) -> dict:
        summary = self.esp.summary(self.recomputed)
        return summary | {"slo": self.slo.report(self.timing())} if self.slo else summary

    def timing(self) -> Timing:
        ttft = self.first_token_at - self.arrival if self.first_token_at else None
        e2e = self.finished_at - self.arrival if self.finished_at else None
        n = len(self.output_ids)
        tpot = (self.finished_at - self.first_token_at) / (n - 1) if e2e and ttft is not None and n > 1 else None
        queue = self.scheduled_at - self.arrival if self.scheduled_at is not None else None
        return Timing(ttft, tpot, e2e, queue)
