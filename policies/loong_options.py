"""The `loong` bundle's knobs, read once from `PolicyOptions.extra` (`--policy-option KEY=VALUE`)."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Mapping

from esp.policies.registry import PolicyError

ORDERS = ("hrrn", "fcfs")
ZERO_ALLOWED = ("lookahead", "keep_free", "keep_free_patience", "pause_miss_share", "slo_urgency")
PREEMPTS = ("tolerable", "always", "never")


@dataclass(frozen=True)
class LoongOptions:
    """- `max_prefill_s`: the tipping point, the longest predicted prefill batch dispatch builds
      (None: the predicted time of `max_prefill_tokens` on one instance);
    - `order`: `hrrn` (highest response ratio next, see `dispatch_order`) or `fcfs` (the paper's);
    - `lookahead`: requests that do not fit in memory a later one may overtake;
    - `max_overtaken_s`: a request waiting longer than this is not overtaken for lack of memory;
    - `preempt`: when no idle instance is free of decodes, a prefill takes a decoding one if its
      decodes tolerate the pause (`tolerable`), whenever (`always`, the paper's prefill-first) or
      only for memory (`never`);
    - `urgent_ratio`: with `tolerable`, a waiting prompt whose response ratio (see
      `dispatch_order`) reaches this takes a decoding instance anyway (its TTFT is at stake; off
      by default: in the simulator 5 raises L-Eval's share within the project's SLO from 53% to
      88% at 2.3 req/s but lowers Mixed's and LV-Eval's, `docs/loong.md`);
    - `slo_urgency`: with `tolerable`, a waiting prompt with a TTFT target (`slo.ttft_ms`) that
      will have used this share of it when its prefill alone ends takes a decoding instance anyway
      (0: off);
    - `pause_miss_share`: the share of an instance's decodes a tolerated pause may push past their
      TPOT target (0: none);
    - `keep_free`, `keep_free_after_s`: a prefill predicted to take longer than the latter leaves
      the former number of decode-free instances out, for work that arrives meanwhile (0: off;
      from 2 s rather than 1 s, the 90%-attainment capacity rose 1.5-10% on Mixed, L-Eval,
      LV-Eval and Zipf-1.2 and held on Zipf-1.4, `docs/loong.md`);
    - `keep_free_solo_after_s`: a prefill on one instance predicted to take longer than this
      does not take the last `keep_free` idle instances that hold no decode (on a cluster of more
      than `keep_free` instances): its prompts wait as above (inf: never; on Mixed, 150K-token
      prompts there otherwise block the chat prompts that arrive during their prefill,
      `docs/loong.md`). Long prompts wait only while a step is in flight or a decode runs: on an
      idle cluster nothing would end the wait;
    - `keep_free_patience`: when the room cannot be kept (the prompt's KV needs every idle
      instance), prompts whose prefill alone would take longer than `keep_free_after_s` wait, and
      the batch goes on with the others, until one of them has waited this many times its
      prefill alone on one instance, or, with a TTFT target, until the `slo_urgency` share of the
      target less that prefill, if sooner (0: they never wait);
    - `tpot_target_s`: the decode step time (TPOT) pauses, consolidation and KV spreading aim to
      keep; a request's own `slo.tpot_ms` replaces it for that request;
    - `consolidate`: migrate decodes off lightly loaded instances (see `consolidate`);
    - `spread_kv`: keep a long request's KV on enough of its prefill group that its decode step
      meets the TPOT target (decode scale-up for KV bandwidth);
    - `scale_up`: add idle instances to full decode batches (false: Fig. 13's ablation);
    - `max_batch_per_master`: decode requests per master before compute-pressure scale-up."""

    max_prefill_s: float | None = None
    order: str = "hrrn"
    lookahead: int = 4
    max_overtaken_s: float = 10.0
    preempt: str = "tolerable"
    pause_miss_share: float = 0.0
    urgent_ratio: float = math.inf
    slo_urgency: float = 0.8
    keep_free: int = 1
    keep_free_after_s: float = 2.0
    keep_free_solo_after_s: float = 5.0
    keep_free_patience: float = 2.0
    tpot_target_s: float = 0.05
    consolidate: bool = True
    spread_kv: bool = True
    scale_up: bool = True
    max_batch_per_master: int = 128

    @classmethod
    def of(cls, extra: Mapping) -> LoongOptions:
        """Parse and check the options this bundle knows (others belong to other policies)."""
        values = {}
        for f in fields(cls):
            if f.name not in extra or extra[f.name] is None:
                continue
            value = extra[f.name]
            kind = f.type.split(" ")[0]
            try:
                if kind == "bool":
                    if not isinstance(value, bool) and str(value).lower() not in ("true", "false", "1", "0"):
                        raise ValueError
                    value = value if isinstance(value, bool) else str(value).lower() in ("true", "1")
                elif kind in ("int", "float"):
                    value = int(value) if kind == "int" else float(value)
                    if value < 0 or (value == 0 and f.name not in ZERO_ALLOWED):
                        raise ValueError
                else:
                    value = str(value)
            except (TypeError, ValueError):
                raise PolicyError(f"loong option {f.name}={extra[f.name]!r}: expected a "
                                  f"{'positive ' if kind in ('int', 'float') else ''}{kind}") from None
            values[f.name] = value
        opts = cls(**values)
        for name, allowed in (("order", ORDERS), ("preempt", PREEMPTS)):
            if getattr(opts, name) not in allowed:
                raise PolicyError(f"loong option {name}={getattr(opts, name)!r}: one of {', '.join(allowed)}")
        return opts
