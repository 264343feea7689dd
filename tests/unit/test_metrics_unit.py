"""Metrics pieces that need no router: the child /metrics parser, lifecycle counting,
/readyz before start and during shutdown, one registry per app."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from aiohttp.test_utils import make_mocked_request
from prometheus_client import generate_latest

from llamarouter.core.states import State
from llamarouter.settings.config import RouterConfig
from llamarouter.web.api import Api
from llamarouter.web.metrics import RouterMetrics, parse_child_metrics

CHILD = """# HELP llamacpp:kv_cache_usage_ratio KV-cache usage. 1 means 100 percent usage.
# TYPE llamacpp:kv_cache_usage_ratio gauge
llamacpp:kv_cache_usage_ratio 0.25
llamacpp:requests_deferred{slot="x"} 3
llamacpp:requests_processing 1
llamacpp:broken
"""


def test_parse_child_metrics() -> None:
    assert parse_child_metrics(CHILD) == {
        "llamacpp:kv_cache_usage_ratio": 0.25,
        "llamacpp:requests_deferred": 3.0,
    }
    assert parse_child_metrics("") == {}


def sample(m: RouterMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_lifecycle_counting() -> None:
    m = RouterMetrics(1.0)
    proc: Any = SimpleNamespace(name="a", ready_at=12.0, load_started_at=10.0, stop_reason=None, sick_exit=False)
    m.on_state(proc, State.STOPPED, State.STARTING)
    m.on_state(proc, State.STARTING, State.READY)
    m.on_state(proc, State.READY, State.BACKOFF)  # crash
    assert sample(m, "llamarouter_model_request_failure_kills_total", model="a") is None
    proc.sick_exit = True  # killed because its live requests kept failing
    m.on_state(proc, State.BACKOFF, State.STARTING)
    m.on_state(proc, State.STARTING, State.READY)
    m.on_state(proc, State.READY, State.BACKOFF)
    assert sample(m, "llamarouter_model_request_failure_kills_total", model="a") == 1
    proc.sick_exit = False
    m.on_state(proc, State.BACKOFF, State.STARTING)  # restart
    m.on_state(proc, State.STARTING, State.BACKOFF)  # failed load, also a crash
    proc.stop_reason = "ttl"
    m.on_state(proc, State.BACKOFF, State.STOPPING)
    m.on_state(proc, State.STOPPING, State.STOPPED)
    assert sample(m, "llamarouter_model_loads_total", model="a", outcome="ok") == 2
    assert sample(m, "llamarouter_model_loads_total", model="a", outcome="failed") == 1
    assert sample(m, "llamarouter_model_load_duration_seconds_sum", model="a") == 4.0
    assert sample(m, "llamarouter_model_crashes_total", model="a") == 3
    assert sample(m, "llamarouter_model_restarts_total", model="a") == 2
    assert sample(m, "llamarouter_model_request_failure_kills_total", model="a") == 1
    assert sample(m, "llamarouter_model_evictions_total", model="a", reason="ttl") == 1


def test_registries_are_per_app() -> None:
    one, two = RouterMetrics(1.0), RouterMetrics(1.0)
    one.requests.labels("a", "/x", "200").inc()
    assert b'model="a"' in generate_latest(one.registry)
    assert b'model="a"' not in generate_latest(two.registry)


async def test_readyz_before_start_and_during_shutdown() -> None:
    runtime: Any = SimpleNamespace(started=False, supervisor=None, child_args=None)
    api = Api(RouterConfig(), runtime, None, RouterMetrics(1.0))  # type: ignore[arg-type]
    request = make_mocked_request("GET", "/readyz")
    assert (await api.readyz(request)).status == 503  # the runtime has not started
    sup: Any = SimpleNamespace(started=False, closing=False)
    runtime.started, runtime.supervisor = True, sup
    resp = await api.readyz(request)
    assert resp.status == 503 and b"starting" in resp.body  # type: ignore[operator]
    sup.started = True
    assert (await api.readyz(request)).status == 200
    sup.closing = True
    resp = await api.readyz(make_mocked_request("GET", "/readyz?model=a"))
    assert resp.status == 503 and b"shutting down" in resp.body  # type: ignore[operator]


def test_series_are_those_of_prometheus_clients_own_counter_and_histogram() -> None:
    """The router keeps its counters and histograms itself until the first scrape; what it
    then exposes is byte for byte what prometheus_client's Counter and Histogram give for
    the same observations (bucket edges, +Inf, _count, _sum, _created, label order)."""
    import re

    from prometheus_client import CollectorRegistry, Counter, Histogram

    m = RouterMetrics(1.0)
    ref = CollectorRegistry()
    for ours in m._own:  # in registration order, as the router registers them
        if ours.kind == "counter":
            Counter(ours.name, ours.doc, ours.labelnames, registry=ref)
        else:
            Histogram(ours.name, ours.doc, ours.labelnames, buckets=ours.bounds, registry=ref)
    theirs = {c._name: c for c in ref._collector_to_names}  # type: ignore[attr-defined]  # the registry has no public list of its collectors
    # values on, between and beyond the bucket edges; several label sets
    seen = [("a", "/v1/chat/completions", 200, 0.0), ("a", "/tokenize", 200, 0.01),
            ("b", "/v1/chat/completions", 503, 0.0100001), ("a", "/tokenize", 200, 2.5),
            ("b", "/v1/chat/completions", 503, 4000.0), ("c", "/x", 404, 1e-9)]
    for model, endpoint, code, seconds in seen:
        m.requests.labels(model, endpoint, str(code)).inc()
        theirs["llamarouter_requests"].labels(model, endpoint, str(code)).inc()
        for name in ("llamarouter_time_to_first_byte_seconds", "llamarouter_queue_wait_seconds",
                     "llamarouter_model_load_duration_seconds"):
            next(o for o in m._own if o.name == name).labels(model).observe(seconds)
            theirs[name].labels(model).observe(seconds)
    m.loads.labels("a", "ok").inc(2)
    theirs["llamarouter_model_loads"].labels("a", "ok").inc(2)

    def scrubbed(text: bytes) -> str:
        return re.sub(r"(_created\{[^}]*\}) [0-9.e+]+", r"\1 T", text.decode())

    from prometheus_client import generate_latest

    expected = scrubbed(generate_latest(ref))
    assert "llamarouter_queue_wait_seconds_bucket" in expected
    assert scrubbed(generate_latest(m.registry)) == expected


def test_prometheus_client_and_psutil_are_not_loaded_at_rest() -> None:
    """About 2 MiB of the router's resident memory: imported on first use (a scrape, the
    memory view, --memory-budget, --state-dir, a preset file), never by starting the router."""
    import subprocess
    import sys

    code = (
        "import sys, llamarouter.cli; "
        "print(sorted(m for m in ('prometheus_client', 'psutil', 'configparser') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
