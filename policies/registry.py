"""Discovery of installed policies through entry points (DESIGN 6)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from importlib.metadata import entry_points

from esp.policies.base import (BatchingPolicy, PolicyOptions, PolicySet, ScalingPolicy,
                               SchedulingPolicy)

LABELS = {"scheduling": "scheduling policy", "batching": "batching policy", "scaling": "scaling policy",
          "policies": "policy"}
GROUPS = {
    "scheduling": ("esp.scheduling", SchedulingPolicy),
    "batching": ("esp.batching", BatchingPolicy),
    "scaling": ("esp.scaling", ScalingPolicy),
    "policies": ("esp.policies", None),
}


class PolicyError(ValueError):
    pass


@dataclass(frozen=True)
class Registered:
    name: str
    kind: str
    target: str


def _entries(kind: str) -> dict[str, object]:
    group = GROUPS[kind][0]
    found: dict[str, object] = {}
    for ep in entry_points(group=group):
        if ep.name in found and found[ep.name].value != ep.value:
            raise PolicyError(f"two installed packages register {LABELS[kind]} {ep.name!r}: "
                              f"{found[ep.name].value} and {ep.value}")
        found[ep.name] = ep
    return found


def available() -> list[Registered]:
    """Everything installed, by kind then name."""
    return [Registered(name, kind, ep.value) for kind in GROUPS
            for name, ep in sorted(_entries(kind).items())]


def _load(kind: str, name: str):
    entries = _entries(kind)
    if name not in entries:
        choices = ", ".join(sorted(entries)) or "none installed"
        raise PolicyError(f"unknown {LABELS[kind]} {name!r}; choices: {choices}")
    return entries[name].load()


def load_policy_set(name: str, options: PolicyOptions | None = None, *, scheduling: str | None = None,
                    batching: str | None = None, scaling: str | None = None) -> PolicySet:
    """Build bundle `name`, replacing any kind named by an override with that component."""
    options = options or PolicyOptions()
    bundle = _load("policies", name)(options)
    if not isinstance(bundle, PolicySet):
        raise PolicyError(f"policy bundle {name!r} returned {type(bundle).__name__}, not a PolicySet")
    overrides = {"scheduling": scheduling, "batching": batching, "scaling": scaling}
    parts = {}
    for kind, component in overrides.items():
        if component is None:
            continue
        cls = _load(kind, component)
        base = GROUPS[kind][1]
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PolicyError(f"{LABELS[kind]} {component!r} is not a subclass of {base.__name__}")
        parts[kind] = cls(options)
    return replace(bundle, **parts) if parts else bundle
