"""Messages between the main process and the workers (DESIGN 3).

Small picklable dataclasses holding lists and `array('q')` columns, never tensors. One
message type per step kind. Messages carry deltas: a request's prompt and sampling
parameters travel once (with its prefill, or the first time a master decodes it), a decode
row is a handful of integers, and the requests the main process has forgotten ride on the
next step an instance receives (`released`) instead of a message of their own.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from esp.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class SampleSpec:
    """Everything a master needs to draw output token number `index` of a request."""

    params: SamplingParams
    seed: int
    index: int


@dataclass(frozen=True)
class KeepRange:
    """Tokens at global positions `[start, end)` of a request stay on `rank`, in `slots`."""

    rank: int
    start: int
    end: int
    slots: Sequence[int]


@dataclass(frozen=True)
class DecodeSeq:
    """One decode row, as the scheduler plans it: `master` embeds `token_id` at `position` and
    stores its KV in `slot`; `holders` are the ranks (master included) that hold KV of the
    request after the store; `index` is the number of the output token it samples. Iteration
    k > 0 of a multi-step round stores into `next_slots[k - 1]`."""

    request_id: int
    token_id: int
    position: int
    master: int
    slot: int
    holders: tuple[int, ...]
    index: int = 0
    next_slots: tuple[int, ...] = ()


def _q(values=()) -> array:
    return array("q", values)


@dataclass(frozen=True)
class DecodeRows:
    """Decode rows as columns (one `array('q')` each; they pickle as bytes). `holders` is a
    bit mask of ranks; `next_slots` holds `steps - 1` slots per row, row after row."""

    request_ids: array = field(default_factory=_q)
    token_ids: array = field(default_factory=_q)
    positions: array = field(default_factory=_q)
    masters: array = field(default_factory=_q)
    slots: array = field(default_factory=_q)
    holders: array = field(default_factory=_q)
    indices: array = field(default_factory=_q)
    next_slots: array = field(default_factory=_q)

    def append(self, seq: DecodeSeq) -> None:
        self.add(seq.request_id, seq.token_id, seq.position, seq.master, seq.slot,
                 sum(1 << r for r in seq.holders), seq.index, seq.next_slots)

    def add(self, request_id: int, token_id: int, position: int, master: int, slot: int, holders: int,
            index: int, next_slots: Sequence[int] = ()) -> None:
        """`append` of the row's fields, `holders` already a bit mask."""
        self.request_ids.append(request_id)
        self.token_ids.append(token_id)
        self.positions.append(position)
        self.masters.append(master)
        self.slots.append(slot)
        self.holders.append(holders)
        self.indices.append(index)
        self.next_slots.extend(next_slots)

    @classmethod
    def of(cls, seqs: Sequence[DecodeSeq]) -> DecodeRows:
        rows = cls()
        for s in seqs:
            rows.append(s)
        return rows

    def __len__(self) -> int:
        return len(self.request_ids)

    def seq(self, i: int, steps: int = 1) -> DecodeSeq:
        mask = self.holders[i]
        return DecodeSeq(self.request_ids[i], self.token_ids[i], self.positions[i], self.masters[i],
                         self.slots[i], tuple(r for r in range(mask.bit_length()) if mask >> r & 1),
                         self.indices[i], tuple(self.next_slots[i * (steps - 1): (i + 1) * (steps - 1)]))

    def kv_tokens(self) -> int:
        """Keys attended in the first iteration: every row's position + 1."""
        return sum(self.positions) + len(self)


Released = Mapping[int, tuple[int, ...]]
"""`{rank: request ids}`: requests whose state that member of the group drops before the step
(the main process already freed their slots)."""


@dataclass(frozen=True)
class PrefillSeq:
    """Prompt tokens at global positions `[start, start + len(token_ids))` of a request.

    `start > 0` is a chunk over KV the instance already holds (`MixedBatch` only); `sample` is
    None for a chunk that does not end the prompt.
    """

    request_id: int
    token_ids: Sequence[int]
    keep: tuple[KeepRange, ...]
    sample: SampleSpec | None
    start: int = 0


@dataclass(frozen=True)
class PrefillBatch:
    """Striped prefill of whole prompts `seqs` on `group`: global token g lives on
    `group[g % len(group)]`. Every member learns each request's sampling parameters."""

    step_id: int
    group: tuple[int, ...]
    seqs: tuple[PrefillSeq, ...]
    released: Released = field(default_factory=dict)


@dataclass(frozen=True)
class MixedBatch:
    """Prompt chunks over cached KV plus decode riders in one forward pass on one instance
    (chunked prefill, Sarathi / SplitFuse style)."""

    step_id: int
    group: tuple[int, ...]
    seqs: tuple[PrefillSeq, ...]
    decode: DecodeRows = field(default_factory=DecodeRows)
    sampling: Mapping[int, tuple[SamplingParams, int]] = field(default_factory=dict)
    released: Released = field(default_factory=dict)


@dataclass(frozen=True)
class DecodeBatch:
    """`steps` decode iterations in one round trip (a round): masters feed each sampled token
    back, stream every iteration's tokens but the last as `DecodeTokens`, and answer with the
    last in `StepDone`. The group's first member (its leader) ends the round early, after the
    iteration in progress, when the main process sends `EndRound`; it tells the others.
    `sampling` gives `(params, seed)` of the requests a master has not decoded or prefilled."""

    step_id: int
    group: tuple[int, ...]
    rows: DecodeRows
    steps: int = 1
    sampling: Mapping[int, tuple[SamplingParams, int]] = field(default_factory=dict)
    released: Released = field(default_factory=dict)

    @property
    def seqs(self) -> tuple[DecodeSeq, ...]:
        """The rows as `DecodeSeq`s (for tests and tools; the worker reads the columns)."""
        return tuple(self.rows.seq(i, self.steps) for i in range(len(self.rows)))


@dataclass(frozen=True)
class MigrateKV:
    """Move the KV in `src_slots` (the last tokens `src` holds of a request) into `dst_slots`
    on `dst`, `chunk` tokens per transfer. The group is `(src, dst)`."""

    step_id: int
    request_id: int
    src: int
    dst: int
    src_slots: Sequence[int]
    dst_slots: Sequence[int]
    chunk: int = 4096
    released: Released = field(default_factory=dict)

    @property
    def group(self) -> tuple[int, ...]:
        return (self.src, self.dst)


@dataclass(frozen=True)
class EndRound:
    """Sent to the leader of a multi-step round: stop after the iteration in progress."""

    step_id: int


@dataclass(frozen=True)
class Shutdown:
    pass


@dataclass(frozen=True)
class Ready:
    rank: int
    kv_slots: int
    device: str
    dtype: str


@dataclass(frozen=True)
class DecodeTokens:
    """A master's tokens of one iteration of a round, streamed before the round ends."""

    step_id: int
    rank: int
    sampled: dict[int, int]


@dataclass(frozen=True)
class StepDone:
    """One group member's part of a step: the tokens it sampled (in a round: of its last
    iteration), how many iterations ran, and where its time went."""

    step_id: int
    rank: int
    sampled: dict[int, int]
    compute_s: float
    comm_s: float = 0.0
    failed: dict[int, str] = field(default_factory=dict)
    iterations: int = 1


@dataclass(frozen=True)
class WorkerFailed:
    rank: int
    step_id: int | None
    message: str
    traceback: str = ""


Step = PrefillBatch | MixedBatch | DecodeBatch | MigrateKV
