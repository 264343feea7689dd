"""Which idle models to stop so queued requests get a slot. Pure: no I/O, no logging."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    name: str
    last_used: float  # monotonic; 0 = never used
    ready: bool  # only a model that finished loading may be evicted (a loading one is wanted)
    busy: bool  # requests in flight: never evicted, upstream's rule too
    pinned: bool
    wanted: bool  # a queued or waiting request needs it


def plan_evictions(candidates: Iterable[Candidate], count: int) -> list[str]:
    """Up to `count` victims, least recently used first (name breaks ties, for determinism)."""
    if count <= 0:
        return []
    eligible = sorted(
        (c for c in candidates if c.ready and not c.busy and not c.pinned and not c.wanted),
        key=lambda c: (c.last_used, c.name),
    )
    return [c.name for c in eligible[:count]]
