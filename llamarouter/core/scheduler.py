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
    bytes: int = 0  # what stopping it frees of the memory budget


def plan_evictions(candidates: Iterable[Candidate], count: int, free_bytes: int = 0) -> list[str]:
    """Least recently used idle models (name breaks ties, for determinism) until at least
    `count` are chosen and they free at least `free_bytes`. When the idle models cannot free
    enough, all of them are returned: the rest comes from busy models once they go idle."""
    if count <= 0 and free_bytes <= 0:
        return []
    eligible = sorted(
        (c for c in candidates if c.ready and not c.busy and not c.pinned and not c.wanted),
        key=lambda c: (c.last_used, c.name),
    )
    chosen: list[str] = []
    freed = 0
    for c in eligible:
        if len(chosen) >= count and freed >= free_bytes:
            break
        chosen.append(c.name)
        freed += c.bytes
    return chosen
