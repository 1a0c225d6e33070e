"""Point-to-point exchange between the instances of one group (torch.distributed).

All instances of a job share one default process group; a step only talks to members of
its own group, and an instance is in at most one group at a time, so the traffic of
different groups never interleaves (DESIGN 3).

Peers are named by instance. With `--tp N` an instance is N processes (process rank
`instance * N + tp_rank`) and each talks to the processes of the same tp rank in other
instances, holding the same heads: `PeerComm` translates. `start(..., processes=True)` names
process ranks directly (the round flag reaches every process of a group).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class Exchange:
    """In-flight sends and receives; `wait()` returns the received tensors by peer rank."""

    works: list
    comm: PeerComm

    def wait(self) -> None:
        t0 = time.perf_counter()
        for w in self.works:
            w.wait()
        self.comm.wait_s += time.perf_counter() - t0


@dataclass
class PeerComm:
    """Starts P2P exchanges and accounts the time spent blocked on them. `rank` is the instance;
    `tp` and `tp_rank` place this process inside it."""

    rank: int
    tp: int = 1
    tp_rank: int = 0
    wait_s: float = 0.0
    bytes_sent: int = 0
    _send_keepalive: list = field(default_factory=list)

    def process(self, instance: int, tp_rank: int | None = None) -> int:
        """The process rank of `tp_rank` (default: this process's) of `instance`."""
        return instance * self.tp + (self.tp_rank if tp_rank is None else tp_rank)

    def start(self, sends: list[tuple[int, torch.Tensor]],
              recvs: list[tuple[int, torch.Tensor]], processes: bool = False) -> Exchange:
        """Post `(peer, tensor)` sends and receives into preallocated buffers; empty tensors are skipped.
        Peers are instances (this process's tp rank in each), or process ranks with `processes`.

        Between two peers, tensors are matched in the order both sides list them.
        """
        to = (lambda peer: peer) if processes or self.tp == 1 else self.process
        ops = []
        for peer, buf in recvs:
            if buf.numel():
                ops.append(dist.P2POp(dist.irecv, buf, to(peer)))
        for peer, t in sends:
            if t.numel():
                t = t.contiguous()
                self._send_keepalive.append(t)
                self.bytes_sent += t.numel() * t.element_size()
                ops.append(dist.P2POp(dist.isend, t, to(peer)))
        works = dist.batch_isend_irecv(ops) if ops else []
        return Exchange(works, self)

    def end_step(self) -> float:
        """Time blocked on communication since the last call; releases send buffers."""
        spent, self.wait_s = self.wait_s, 0.0
        self._send_keepalive.clear()
        return spent
