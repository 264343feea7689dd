"""The dashboard's in-memory timeline (llamarouter/web/history.py), on a fake clock."""

from __future__ import annotations

import pytest

from llamarouter.web.history import History, percentile
from llamarouter.web.metrics import predicted_tokens


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_percentile_nearest_rank() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.95) == 3.0
    values = [float(i) for i in range(1, 101)]  # 1..100
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.95) == 95.0
    assert percentile(list(reversed(values)), 0.95) == 95.0


def test_requests_land_in_buckets_per_model() -> None:
    clock = Clock(1000.0)
    h = History(span=60, step=5, clock=clock)
    h.request("a", ok=True, ttft=0.1, tokens=10)
    h.request("a", ok=False, ttft=None, tokens=None)
    h.request("b", ok=True, ttft=0.3, tokens=4)
    clock.now = 1007.0  # next bucket
    h.request("a", ok=True, ttft=0.2, tokens=6)
    snap = h.snapshot()
    assert [b["t"] for b in snap["buckets"]] == [1000.0, 1005.0]
    first, second = snap["buckets"]
    assert first["requests"] == 3 and first["tokens"] == 14
    assert first["models"]["a"] == {"requests": 2, "errors": 1, "tokens": 10, "ttft_p50": 0.1, "ttft_p95": 0.1}
    assert first["models"]["b"]["ttft_p50"] == 0.3
    assert first["ttft_p50"] == 0.1 and first["ttft_p95"] == 0.3
    assert second["models"] == {"a": {"requests": 1, "errors": 0, "tokens": 6, "ttft_p50": 0.2, "ttft_p95": 0.2}}
    assert snap["step"] == 5 and snap["span"] == 60 and snap["now"] == 1007.0


def test_old_buckets_and_marks_fall_out_of_the_span() -> None:
    clock = Clock(0.0)
    h = History(span=30, step=10, clock=clock)
    h.request("a", ok=True, ttft=None, tokens=None)
    h.mark("a", "load")
    clock.now = 25.0
    h.memory("a", 100)
    h.memory("a", 50)  # the bucket keeps the highest reading
    assert len(h.snapshot()["buckets"]) == 2
    assert h.snapshot()["marks"] == [{"t": 0.0, "model": "a", "kind": "load"}]
    clock.now = 45.0  # the first bucket [0, 10) ended more than 30 s ago
    snap = h.snapshot()
    assert [b["t"] for b in snap["buckets"]] == [20.0]
    assert snap["buckets"][0]["models"]["a"]["memory_bytes"] == 100
    assert snap["marks"] == []


def test_memory_is_bounded_whatever_the_traffic() -> None:
    clock = Clock(0.0)
    h = History(span=20, step=5, clock=clock)
    for i in range(1000):
        clock.now = float(i)
        h.request("a", ok=True, ttft=0.01, tokens=1)
        h.mark("a", "load")
    assert len(h._buckets) == 4  # span / step
    assert len(h._marks) <= 64


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        History(span=10, step=0)
    with pytest.raises(ValueError):
        History(span=1, step=5)


def test_predicted_tokens_from_the_childs_timings() -> None:
    last_event = b'data: {"choices":[],"timings":{"prompt_n":5,"predicted_n":24,"predicted_ms":3.1}}\n\n'
    assert predicted_tokens(last_event) == 24
    assert predicted_tokens(b'{"timings": {"predicted_n": 7}}') == 7
    assert predicted_tokens(b'"predicted_n":3,"x":1,"predicted_n":9}') == 9  # the last one
    assert predicted_tokens(b"data: [DONE]") is None
    assert predicted_tokens(b'"predicted_n":12') is None  # cut off: the number may go on
