"""Rules every policy decision must keep (DESIGN 5). A broken rule raises `PolicyViolation`
naming the policy and the rule, before any engine state changes."""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

from esp.policies.base import Batch, ClusterView, DecodePlan, Dispatch, KeepPlan, Migration, PolicySet


class PolicyViolation(RuntimeError):
    def __init__(self, policy: object, rule: str, request_ids=()) -> None:
        name = type(policy).__name__
        super().__init__(f"policy {name} broke a rule: {rule}")
        self.policy, self.rule, self.request_ids = name, rule, tuple(request_ids)


def _require(ok: bool, policy: object, rule: str | Callable[[], str], request_ids=()) -> None:
    """`rule` may be a function that formats it: formatted only when it is broken."""
    if not ok:
        raise PolicyViolation(policy, rule() if callable(rule) else rule, request_ids)


def check_dispatch(policy: object, view: ClusterView, d: Dispatch) -> None:
    waiting = view.waiting_by_id.keys()
    ids = d.request_ids
    _require(len(set(ids)) == len(ids), policy, "a request is dispatched twice", ids)
    _require(set(ids) <= waiting, policy, "dispatched a request that is not waiting", ids)
    _require(set(d.instances) <= view.idle, policy,
             lambda: f"dispatched onto busy instances {sorted(set(d.instances) - view.idle)}", ids)
    _require(bool(d.instances), policy, "dispatched requests onto no instance", ids)


def check_groups(policy: object, view: ClusterView, groups: list[tuple[int, ...]], ids) -> None:
    seen: set[int] = set()
    for g in groups:
        _require(len(g) > 0 and len(set(g)) == len(g), policy,
                 lambda: f"group {g} is empty or repeats an instance", ids)
        _require(set(g) <= view.idle, policy,
                 lambda: f"group {g} uses busy instances {sorted(set(g) - view.idle)}", ids)
        _require(not (seen & set(g)), policy, lambda: f"groups overlap on instances {sorted(seen & set(g))}", ids)
        seen |= set(g)


def check_prefill(p: PolicySet, view: ClusterView, d: Dispatch, plans: list[tuple[Batch, KeepPlan]]) -> None:
    """The prefill batches of a dispatch, each with its keep plan."""
    ids = d.request_ids
    covered = [rid for b, _ in plans for rid in b.request_ids]
    _require(sorted(covered) == sorted(ids), p.batching,
             "prefill batches must hold every dispatched request exactly once", ids)
    check_groups(p.batching, view, [b.group for b, _ in plans], ids)
    dispatched = set(d.instances)
    for batch, plan in plans:
        _require(set(batch.group) <= dispatched, p.batching,
                 lambda: f"prefill group {batch.group} leaves the dispatched instances {d.instances}", ids)
        check_keep_plan(p, view, batch, plan, ids)


def check_keep_plan(p: PolicySet, view: ClusterView, batch: Batch, plan: KeepPlan, ids) -> None:
    check_chunks(p.batching, view, batch, ids)
    tokens = batch.prefill_tokens(view)
    use = dict.fromkeys(range(view.num_instances), 0)
    for rid in batch.request_ids:
        parts = plan.ranges.get(rid)
        _require(parts is not None, p.scaling, lambda: f"keep plan misses request {rid}", ids)
        _require(all(n > 0 and rank in batch.group for rank, n in parts), p.scaling,
                 lambda: f"keep plan of request {rid} keeps tokens outside group {batch.group} or empty ranges", ids)
        _require(sum(n for _, n in parts) == tokens[rid], p.scaling,
                 lambda: f"keep plan of request {rid} covers {sum(n for _, n in parts)} of the "
                 f"{tokens[rid]} prompt tokens this step processes", ids)
        for rank, n in parts:
            use[rank] += n
    over = [r for r, n in use.items() if n > view.free_slots[r]]
    _require(not over, p.scaling, lambda: f"keep plan exceeds the free slots of instances {over}", ids)


def check_chunks(policy: object, view: ClusterView, batch: Batch, ids) -> None:
    """Chunks and decode riders: sizes within the prompt, on the one instance holding the prefix."""
    by_id = view.waiting_by_id
    _require(set(batch.chunk_tokens) <= set(batch.request_ids), policy,
             "chunk sizes are given for requests outside the batch", ids)
    for rid, n in batch.chunk_tokens.items():
        _require(0 < n <= by_id[rid].remaining_prompt, policy,
                 lambda: f"chunk of {n} tokens for request {rid}, which has {by_id[rid].remaining_prompt} left", ids)
    partial = [rid for rid in batch.request_ids if by_id[rid].kv_tokens]
    if batch.chunk_tokens or batch.decode_ids or partial:
        _require(len(batch.group) == 1, policy,
                 lambda: f"chunked prefill and decode riders need a one-instance group, got {batch.group}", ids)
    for rid in partial:
        _require(set(by_id[rid].kv_tokens) == set(batch.group), policy,
                 lambda: f"request {rid} continues its prompt on {batch.group} but its KV is on "
                 f"{sorted(by_id[rid].kv_tokens)}", ids)


def check_riders(policy: object, view: ClusterView, batches: list[Batch]) -> None:
    riders = [rid for b in batches for rid in b.decode_ids]
    running = view.running_by_id.keys()
    _require(len(set(riders)) == len(riders) and set(riders) <= running, policy,
             "decode riders name a request twice or one that is not running", riders)


def check_decode_batches(policy: object, view: ClusterView, batches: list[Batch]) -> None:
    ids = [rid for b in batches for rid in b.request_ids]
    running = view.running_by_id.keys()
    _require(len(set(ids)) == len(ids) and set(ids) <= running, policy,
             "decode batches name a request twice or one that is not running", ids)
    check_groups(policy, view, [b.group for b in batches], ids)


def check_decode(p: PolicySet, view: ClusterView, batch: Batch, plan: DecodePlan, fixed_group: bool = False) -> None:
    """One batch's plan, against the view it was planned on (earlier batches' groups busy).
    Decode riders of a prefill step keep its group (`fixed_group`)."""
    ids = batch.request_ids
    running = view.running_by_id
    if fixed_group:
        _require(set(plan.group) == set(batch.group), p.scaling,
                 lambda: f"decode riders must stay on their prefill group {batch.group}, not {plan.group}", ids)
        view = replace(view, idle=view.idle | set(batch.group))
    _require(set(batch.group) <= set(plan.group), p.scaling, "decode plan drops instances of the batch", ids)
    check_groups(p.scaling, view, [plan.group], ids)
    _require(set(plan.masters) <= set(ids), p.scaling, "a master is given to a request outside the batch", ids)
    need = dict.fromkeys(range(view.num_instances), 0)
    for rid, master in plan.masters.items():
        _require(master in plan.group, p.scaling, lambda: f"master {master} of request {rid} is outside the group", ids)
        _require(set(running[rid].kv_tokens) <= set(plan.group), p.scaling,
                 lambda: f"request {rid} has KV outside decode group {plan.group}", ids)
        need[master] += 1
    over = [r for r, n in need.items() if n > view.free_slots[r]]
    _require(not over, p.scaling, lambda: f"masters exceed the free slots of instances {over}", ids)


def check_migrations(policy: object, view: ClusterView, moves: list[Migration]) -> None:
    running = view.running_by_id
    ids = [m.request_id for m in moves]
    _require(len(set(ids)) == len(ids), policy, "a request is migrated twice in one plan", ids)
    check_groups(policy, view, [(m.src, m.dst) for m in moves], ids)
    for m in moves:
        req = running.get(m.request_id)
        _require(req is not None, policy, lambda: f"migration of request {m.request_id}, which is not running", ids)
        held = req.kv_tokens.get(m.src, 0)
        _require(0 < m.tokens <= held, policy,
                 lambda: f"migration moves {m.tokens} tokens of request {m.request_id} but instance {m.src} "
                         f"holds {held}", ids)
        _require(m.tokens <= view.free_slots[m.dst], policy,
                 lambda: f"migration needs {m.tokens} slots on instance {m.dst}, "
                         f"{view.free_slots[m.dst]} are free", ids)
