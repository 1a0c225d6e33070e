"""The project's shipped traces (JSONL, DESIGN section 8); see ``README.md`` in this folder.

Built by ``scripts/build_traces.py``; importable as ``esp.traces``.
"""

from __future__ import annotations

from pathlib import Path

_DIR = Path(__file__).resolve().parent


def names() -> list[str]:
    """Names of the shipped datasets (file stems of ``*.jsonl``), sorted."""
    return sorted(p.stem for p in _DIR.glob("*.jsonl"))


def path(name: str) -> Path:
    """Path of the shipped dataset ``name``; ValueError listing the choices if unknown."""
    p = _DIR / f"{name}.jsonl"
    if not p.is_file():
        raise ValueError(f"unknown trace {name!r}; choices: {', '.join(names())}")
    return p
