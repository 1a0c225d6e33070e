"""Messages between the main process and the workers (DESIGN 3).

Small picklable dataclasses holding lists, never tensors. A request's prompt travels once,
with its prefill; decode steps carry one token id and one slot per request.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

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
    """One decode token: `master` embeds `token_id` at `position`, stores its KV in `slot`.

    `holders` are the ranks (master included) that hold KV of this request after the store.
    In a multi-step batch, iteration k > 0 feeds back the token the master sampled and stores
    into `next_slots[k - 1]` on the master.
    """

    request_id: int
    token_id: int
    position: int
    master: int
    slot: int
    holders: tuple[int, ...]
    sample: SampleSpec
    next_slots: tuple[int, ...] = ()

    def advance(self, k: int, token_id: int) -> DecodeSeq:
        """This sequence at iteration `k` of a multi-step batch, fed `token_id`."""
        s = self.sample
        return replace(self, token_id=token_id, position=self.position + k, slot=self.next_slots[k - 1],
                       sample=SampleSpec(s.params, s.seed, s.index + k), next_slots=())


@dataclass(frozen=True)
class PrefillSeq:
    """Prompt tokens at global positions `[start, start + len(token_ids))` of a request.

    `start > 0` is a chunk over KV the group already holds (chunked prefill, one-instance groups);
    `sample` is None for a chunk that does not end the prompt.
    """

    request_id: int
    token_ids: list[int]
    keep: tuple[KeepRange, ...]
    sample: SampleSpec | None
    start: int = 0


@dataclass(frozen=True)
class PrefillBatch:
    """Striped prefill of `seqs` on `group`: global token g lives on `group[g % len(group)]`.

    `decode` rides along in the same forward pass (chunked prefill mixed into decode, Sarathi
    style); like chunks over cached KV it needs a one-instance group.
    """

    step_id: int
    group: tuple[int, ...]
    seqs: tuple[PrefillSeq, ...]
    decode: tuple[DecodeSeq, ...] = ()

    @property
    def mixed(self) -> bool:
        """Chunks or decode riders: the step runs as `MixedStep` on its one instance."""
        return bool(self.decode) or any(s.start or s.sample is None for s in self.seqs)


@dataclass(frozen=True)
class DecodeBatch:
    """`steps` decode iterations in one round trip (multi-step scheduling): the masters feed
    each sampled token back; the step returns a list of `steps` tokens per request."""

    step_id: int
    group: tuple[int, ...]
    seqs: tuple[DecodeSeq, ...]
    steps: int = 1


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

    @property
    def group(self) -> tuple[int, ...]:
        return (self.src, self.dst)

    @property
    def seqs(self) -> tuple:
        return ()


@dataclass(frozen=True)
class Release:
    """Forget these requests' local slot lists (the main process already freed the slots)."""

    request_ids: tuple[int, ...]


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
class StepDone:
    """One group member's part of a step: the tokens it sampled, and where its time went."""

    step_id: int
    rank: int
    sampled: dict[int, int | list[int]]
    compute_s: float
    comm_s: float = 0.0
    failed: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerFailed:
    rank: int
    step_id: int | None
    message: str
    traceback: str = ""


Step = PrefillBatch | DecodeBatch | MigrateKV
