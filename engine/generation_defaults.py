"""Sampling defaults a checkpoint ships in `generation_config.json`, used for the fields a request
leaves out."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from esp.engine.errors import InvalidRequest
from esp.engine.sampling_params import SamplingParams

__all__ = ["GenerationDefaults", "defaults_of"]


@dataclass(frozen=True)
class GenerationDefaults:
    """`temperature`, `top_p` and `top_k` from `generation_config.json`; None where it sets none.

    Precedence for each field: the request's value, else this default, else `SamplingParams`'s.
    As in vLLM, `do_sample` is not read (a checkpoint that names a temperature samples with it),
    and keys `SamplingParams` has no field for (`repetition_penalty`, `min_p`, ...) are ignored.
    """

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                try:
                    SamplingParams(**{f.name: value})
                except InvalidRequest as err:
                    raise ValueError(str(err)) from None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: str = "generation_config.json") -> GenerationDefaults:
        """The defaults in a parsed `generation_config.json`; `ValueError` naming `source` and the
        field for a value `SamplingParams` would refuse."""
        values = {f.name: config.get(f.name) for f in fields(cls)}
        try:
            return cls(**values)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def sampling_params(self, **given: Any) -> SamplingParams:
        """`SamplingParams(**given)`, where each of temperature, top_p and top_k that `given` leaves
        out or sets to None takes this default (or `SamplingParams`'s, where this has none)."""
        for f in fields(self):
            if given.get(f.name) is None:
                given.pop(f.name, None)
                if getattr(self, f.name) is not None:
                    given[f.name] = getattr(self, f.name)
        return SamplingParams(**given)


def defaults_of(tokenizer: object) -> GenerationDefaults:
    """The defaults a loaded tokenizer carries; none for one without (the simulator's)."""
    return getattr(tokenizer, "generation_defaults", None) or GenerationDefaults()
