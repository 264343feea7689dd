"""The last minutes of the router's activity, in memory, for the dashboard's timeline.

Fed from `RouterMetrics` (each finished proxied request, each lifecycle transition) and from
a memory reading per loaded model on each sample tick; nothing on the request path beyond
appending to the current bucket. Time is cut into fixed buckets (`step` seconds); at most
`span / step` buckets are kept, so memory use is bounded whatever the load.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1) by the nearest-rank method; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


@dataclass
class _Bucket:
    start: float  # wall-clock seconds, a multiple of the step
    requests: dict[str, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    ttft: dict[str, list[float]] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Mark:
    at: float
    model: str
    kind: str  # "load", "loaded", "evicted", "unloaded", "crash", "failed", ...


class History:
    def __init__(self, span: float, step: float, clock: Callable[[], float] = time.time) -> None:
        if step <= 0 or span < step:
            raise ValueError("history needs 0 < step <= span")
        self.span = span
        self.step = step
        self._clock = clock
        self._buckets: deque[_Bucket] = deque(maxlen=int(span // step))
        # Marks are rarer than requests but still bounded: a flapping model cannot grow this.
        self._marks: deque[Mark] = deque(maxlen=max(64, int(span // step) * 4))

    def _bucket(self) -> _Bucket:
        now = self._clock()
        start = now - (now % self.step)
        if not self._buckets or self._buckets[-1].start < start:
            self._buckets.append(_Bucket(start))
        return self._buckets[-1]

    def request(self, model: str, ok: bool, ttft: float | None, tokens: int | None) -> None:
        b = self._bucket()
        b.requests[model] = b.requests.get(model, 0) + 1
        if not ok:
            b.errors[model] = b.errors.get(model, 0) + 1
        if ttft is not None:
            b.ttft.setdefault(model, []).append(ttft)
        if tokens:
            b.tokens[model] = b.tokens.get(model, 0) + tokens

    def memory(self, model: str, nbytes: int) -> None:
        b = self._bucket()
        b.memory[model] = max(nbytes, b.memory.get(model, 0))

    def mark(self, model: str, kind: str) -> None:
        self._marks.append(Mark(self._clock(), model, kind))

    def snapshot(self) -> dict[str, Any]:
        """JSON for GET /dashboard/history: one entry per bucket that saw anything."""
        now = self._clock()
        since = now - self.span
        buckets = []
        for b in self._buckets:
            if b.start + self.step <= since:
                continue
            models = set(b.requests) | set(b.memory) | set(b.tokens)
            per_model = {}
            for m in sorted(models):
                ttft = b.ttft.get(m, [])
                entry: dict[str, Any] = {
                    "requests": b.requests.get(m, 0),
                    "errors": b.errors.get(m, 0),
                    "tokens": b.tokens.get(m, 0),
                }
                if ttft:
                    entry["ttft_p50"] = percentile(ttft, 0.5)
                    entry["ttft_p95"] = percentile(ttft, 0.95)
                if m in b.memory:
                    entry["memory_bytes"] = b.memory[m]
                per_model[m] = entry
            all_ttft = [t for values in b.ttft.values() for t in values]
            buckets.append({
                "t": b.start,
                "requests": sum(b.requests.values()),
                "tokens": sum(b.tokens.values()),
                "ttft_p50": percentile(all_ttft, 0.5),
                "ttft_p95": percentile(all_ttft, 0.95),
                "models": per_model,
            })
        marks = [{"t": m.at, "model": m.model, "kind": m.kind} for m in self._marks if m.at >= since]
        return {"now": now, "span": self.span, "step": self.step, "buckets": buckets, "marks": marks}
