"""A request's life in the main process: its tokens, its text, and when it ends."""
from __future__ import annotations

import enum
import time
from array import array
from dataclasses import dataclass, field
from typing import Callable

from esp.engine.outputs import RequestOutput, Timing
from esp.engine.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """Owned by the scheduler. `placement` is `{rank: array('q') of slots}` in position order, with ranks
    in the order their ranges appear in the sequence; `sampling_on` the ranks whose worker
    has its sampling parameters (they, and the holders, forget it when it is freed). Times come from `clock` (the event
    loop's, which is virtual under the simulator)."""

    id: int
    external_id: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    eos_ids: frozenset[int]
    detokenizer: object
    clock: Callable[[], float] = field(default=time.monotonic, repr=False, compare=False)
    arrival: float | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    status: Status = Status.WAITING
    placement: dict[int, array] = field(default_factory=dict)
    placement_version: int = 0
    sampling_on: set[int] = field(default_factory=set)
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    error: str | None = None
    in_flight: bool = False
    abort_requested: bool = False
    scheduled_at: float | None = None
    failures: int = 0
    recomputed: int = 0
    final_delivered: bool = False
    esp: dict = field(default_factory=lambda: {"prefill": [], "decode_groups": {}, "masters": {},
                                               "scale_events": [], "preemptions": 0})
    _sent_text: int = 0
    _sent_tokens: int = 0

    def __post_init__(self) -> None:
        if self.arrival is None:
            self.arrival = self.clock()

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        """len(all_ids), without building the list."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_kv(self) -> int:
        return sum(len(s) for s in self.placement.values())

    def append(self, token: int) -> None:
        """Add one sampled token and decide whether the request is now finished."""
        now = self.clock()
        self.first_token_at = self.first_token_at or now
        self.output_ids.append(token)
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

    def record_decode(self, group: tuple[int, ...], master: int, steps: int) -> None:
        """`steps` decode iterations on `group` with `master` (for `usage.esp`)."""
        groups, masters = self.esp["decode_groups"], self.esp["masters"]
        groups[group] = groups.get(group, 0) + steps
        masters[master] = masters.get(master, 0) + steps

    def finish(self, reason: str, error: str | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.error = error
        self.finished_at = self.clock()

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
            esp=self.esp_summary() if self.finish_reason else {})

    def timing(self) -> Timing:
        ttft = self.first_token_at - self.arrival if self.first_token_at else None
        e2e = self.finished_at - self.arrival if self.finished_at else None
        n = len(self.output_ids)
        tpot = (self.finished_at - self.first_token_at) / (n - 1) if e2e and ttft is not None and n > 1 else None
        queue = self.scheduled_at - self.arrival if self.scheduled_at is not None else None
        return Timing(ttft, tpot, e2e, queue)

    def esp_summary(self) -> dict:
        e = self.esp
        return {"prefill_group": e["prefill"][-1]["group"] if e["prefill"] else None,
                "keep_plan": e["prefill"][-1]["keep"] if e["prefill"] else None,
                "decode_groups": {",".join(map(str, g)): n for g, n in e["decode_groups"].items()},
                "masters": {str(m): n for m, n in e["masters"].items()}, "scale_events": list(e["scale_events"]),
                "preemptions": e["preemptions"], "recomputed": self.recomputed}
