"""Prometheus metrics for the router itself (GET /metrics without ?model=).

One `CollectorRegistry` per app, never prometheus_client's global default registry, so two
routers in one process (tests) and re-created apps never share or clash on series.

Cost model: the request path pays one counter increment and two histogram observations
(children cached per label set, so no label-tuple building per request); everything that
can be read off the supervisor (state, in flight, queued, loaded count) is computed only
when /metrics is scraped, by a custom collector. Children's own /metrics are fetched at
scrape time too, in parallel with a short timeout, never on the request path.

prometheus_client is imported at the first scrape, not before: it and what it imports
(its HTTP and WSGI servers among them) are about 1 MiB of the router's resident memory,
which a router nobody scrapes never needs. Until then the counters and histograms below
keep their values in plain dicts (what prometheus_client's would hold, without its locks:
the router updates them from its one event-loop thread); a scrape turns them into
prometheus_client's metric families, so the text exposed is what its own Counter and
Histogram would expose, `_created` series included.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..core.childclient import ChildClient
from ..core.states import State
from .history import History

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.metrics_core import Metric

    from ..core.kvcache import KvCache
    from ..core.process import ModelProcess
    from ..core.supervisor import Supervisor

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The llama.cpp series the Gateway API Inference Extension maps to its model-server
# protocol's TotalQueuedRequests and KVCacheUtilization.
CHILD_DEFERRED = "llamacpp:requests_deferred"
CHILD_KV_USAGE = "llamacpp:kv_cache_usage_ratio"

# Latencies of LLM requests run from milliseconds (tokenize) to many minutes (long
# generations); loads from under a second to minutes for large models on slow disks.
_REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
# Waiting for a slot: none at all for most requests, up to a swap or several under contention.
_WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
_LOAD_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)

# Transitions that mean the child ended without being asked to (see process.py `_run`).
_RUNNING = frozenset({State.STARTING, State.READY})
_CRASH_TARGETS = frozenset({State.BACKOFF, State.FAILED, State.STOPPED})


# llama-server ends each completion (the last event of a stream, or the whole JSON answer)
# with `"timings":{..."predicted_n":N,...}`: the tokens it generated.
PREDICTED_MARK = b'"predicted_n":'


def predicted_tokens(data: bytes) -> int | None:
    """N from the last `"predicted_n":N` in data (None when absent or cut off)."""
    at = data.rfind(PREDICTED_MARK)
    if at < 0:
        return None
    start = at + len(PREDICTED_MARK)
    end = start
    while end < len(data) and data[end] in b" 0123456789":
        end += 1
    digits = data[start:end].strip()
    return int(digits) if digits and end < len(data) else None


class RequestTiming:
    """Filled in by the proxy when the child's response headers arrive (time to first
    byte as the client sees it, queueing and loading included)."""

    __slots__ = ("headers_at", "start", "tokens")

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.headers_at = 0.0
        self.tokens = 0  # generated tokens, as the child reported them (see predicted_tokens)


class _CounterChild:
    __slots__ = ("created", "value")

    def __init__(self) -> None:
        self.value = 0.0
        self.created = time.time()

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class _HistogramChild:
    __slots__ = ("bounds", "counts", "created", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0.0] * len(bounds)
        self.sum = 0.0
        self.created = time.time()

    def observe(self, value: float) -> None:
        # The first bucket whose upper bound is >= value (le), as prometheus_client counts.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1.0
        self.sum += value


_C = TypeVar("_C", "_CounterChild", "_HistogramChild")


class _Labelled(Generic[_C]):
    """A labelled counter or histogram: one child per label values, made on first use."""

    kind = ""

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...], registry: list[_Labelled[Any]]) -> None:
        self.name = name
        self.doc = doc
        self.labelnames = labelnames
        self.children: dict[tuple[str, ...], _C] = {}
        registry.append(self)

    def _child(self) -> _C:
        raise NotImplementedError

    def labels(self, *values: str) -> _C:
        child = self.children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: {len(self.labelnames)} label values expected")
            child = self.children[values] = self._child()
        return child

    def _samples(self, metric: Metric, labels: dict[str, str], child: _C) -> None:
        raise NotImplementedError

    def family(self, with_created: bool) -> Metric:
        """The samples prometheus_client's own Counter or Histogram would give, in its order."""
        from prometheus_client.metrics_core import Metric

        metric = Metric(self.name, self.doc, self.kind)
        for values, child in self.children.items():
            labels = dict(zip(self.labelnames, values, strict=True))
            self._samples(metric, labels, child)
            if with_created:
                metric.add_sample(self.name + "_created", labels, child.created)
        return metric


class _Counter(_Labelled[_CounterChild]):
    kind = "counter"

    def _child(self) -> _CounterChild:
        return _CounterChild()

    def _samples(self, metric: Metric, labels: dict[str, str], child: _CounterChild) -> None:
        metric.add_sample(self.name + "_total", labels, child.value)


class _Histogram(_Labelled[_HistogramChild]):
    kind = "histogram"

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...], buckets: tuple[float, ...],
                 registry: list[_Labelled[Any]]) -> None:
        super().__init__(name, doc, labelnames, registry)
        self.bounds = (*buckets, float("inf"))

    def _child(self) -> _HistogramChild:
        return _HistogramChild(self.bounds)

    def _samples(self, metric: Metric, labels: dict[str, str], child: _HistogramChild) -> None:
        from prometheus_client.utils import floatToGoString

        acc = 0.0
        for bound, count in zip(self.bounds, child.counts, strict=True):
            acc += count
            metric.add_sample(self.name + "_bucket", {**labels, "le": floatToGoString(bound)}, acc)  # type: ignore[no-untyped-call]  # the library leaves this helper untyped
        metric.add_sample(self.name + "_count", labels, acc)
        metric.add_sample(self.name + "_sum", labels, child.sum)


class _OwnCollector:
    def __init__(self, metrics: list[_Labelled[Any]]) -> None:
        self._metrics = metrics

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from prometheus_client import metrics

        # PROMETHEUS_DISABLE_CREATED_SERIES, read by the library at import, as for its own metrics
        with_created = bool(getattr(metrics, "_use_created", True))
        for m in self._metrics:
            yield m.family(with_created)


class RouterMetrics:
    def __init__(self, scrape_timeout: float, history: History | None = None) -> None:
        self.history = history
        self._registry: CollectorRegistry | None = None
        self._own: list[_Labelled[Any]] = []
        self._scrape_timeout = scrape_timeout
        r = self._own

        self.requests = _Counter(
            "llamarouter_requests", "Proxied requests by model, route path and HTTP status.",
            ("model", "endpoint", "code"), registry=r,
        )
        self.ttfb = _Histogram(
            "llamarouter_time_to_first_byte_seconds",
            "Time from a request's arrival to the child's response headers (queue and load included).",
            ("model",), buckets=_REQUEST_BUCKETS, registry=r,
        )
        self.duration = _Histogram(
            "llamarouter_request_duration_seconds",
            "Time from a request's arrival to the end of its response (whole stream).",
            ("model",), buckets=_REQUEST_BUCKETS, registry=r,
        )
        self.load_duration = _Histogram(
            "llamarouter_model_load_duration_seconds",
            "Time from spawning a child to its first successful /health.",
            ("model",), buckets=_LOAD_BUCKETS, registry=r,
        )
        self.loads = _Counter(
            "llamarouter_model_loads", "Load attempts by outcome (ok, failed).",
            ("model", "outcome"), registry=r,
        )
        self.evictions = _Counter(
            "llamarouter_model_evictions",
            "Children asked to stop, by reason (evicted, ttl, unloaded, reload, shutdown).",
            ("model", "reason"), registry=r,
        )
        self.restarts = _Counter(
            "llamarouter_model_restarts", "Automatic restarts after a crash.", ("model",), registry=r,
        )
        self.crashes = _Counter(
            "llamarouter_model_crashes",
            "Children that exited or were killed without being asked to stop.",
            ("model",), registry=r,
        )
        self.request_kills = _Counter(
            "llamarouter_model_request_failure_kills",
            "Children killed and replaced because live requests kept failing by their doing "
            "(--request-failures).",
            ("model",), registry=r,
        )
        self.queue_wait = _Histogram(
            "llamarouter_queue_wait_seconds",
            "Time a request waited for its model to be granted (0 when it was loaded and free "
            "to take it; queueing, swaps and loads included otherwise).",
            ("model",), buckets=_WAIT_BUCKETS, registry=r,
        )
        self.drains = _Counter(
            "llamarouter_model_drains",
            "Busy models drained to give way to a request past --drain-after.",
            ("model",), registry=r,
        )
        self._wait_children: dict[str, _HistogramChild] = {}
        self._request_children: dict[tuple[str, str, int], _CounterChild] = {}
        self._latency_children: dict[str, tuple[_HistogramChild, _HistogramChild]] = {}
        self._state = _SupervisorCollector()
        self._collectors: list[_EndpointPickerCollector | _KvCacheCollector] = [_EndpointPickerCollector(self._state)]

    def add_kv_cache(self, kv: Callable[[], KvCache | None]) -> None:
        """Saved slot caches (keep-cache), read off the store `kv()` at scrape time (none
        before the runtime has started)."""
        collector = _KvCacheCollector(kv)
        self._collectors.append(collector)
        if self._registry is not None:
            self._registry.register(collector)

    @property
    def registry(self) -> CollectorRegistry:
        """The prometheus_client registry, made (and the library imported) on first use:
        the counters and histograms first, then the gauges read off the supervisor."""
        if self._registry is None:
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry(auto_describe=True)
            registry.register(_OwnCollector(self._own))
            registry.register(self._state)
            for collector in self._collectors:
                registry.register(collector)
            self._registry = registry
        return self._registry

    # ----------------------------------------------------------------- hot path
    def observe_request(self, model: str, endpoint: str, code: int, timing: RequestTiming) -> None:
        now = time.monotonic()
        key = (model, endpoint, code)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self.requests.labels(model, endpoint, str(code))
        counter.inc()
        hists = self._latency_children.get(model)
        if hists is None:
            hists = self._latency_children[model] = (self.duration.labels(model), self.ttfb.labels(model))
        hists[0].observe(now - timing.start)
        if timing.headers_at:
            hists[1].observe(timing.headers_at - timing.start)
        if self.history is not None:
            ttft = timing.headers_at - timing.start if timing.headers_at else None
            self.history.request(model, code < 400, ttft, timing.tokens or None)

    # ----------------------------------------------------------------- scheduling (SchedulingWatch)
    def waited(self, model: str, seconds: float) -> None:
        hist = self._wait_children.get(model)
        if hist is None:
            hist = self._wait_children[model] = self.queue_wait.labels(model)
        hist.observe(seconds)

    def drained(self, model: str) -> None:
        self.drains.labels(model).inc()
        if self.history is not None:
            self.history.mark(model, "drain")

    # ----------------------------------------------------------------- lifecycle events
    def on_state(self, proc: ModelProcess, old: State, new: State) -> None:
        name = proc.name
        if new == State.READY and old == State.STARTING:
            self.loads.labels(name, "ok").inc()
            if proc.ready_at is not None and proc.load_started_at is not None:
                self.load_duration.labels(name).observe(proc.ready_at - proc.load_started_at)
        elif old == State.STARTING and new in _CRASH_TARGETS:
            self.loads.labels(name, "failed").inc()
        if old in _RUNNING and new in _CRASH_TARGETS:
            self.crashes.labels(name).inc()
            if proc.sick_exit:
                self.request_kills.labels(name).inc()
        elif old == State.BACKOFF and new == State.STARTING:
            self.restarts.labels(name).inc()
        elif new == State.STOPPING:
            self.evictions.labels(name, proc.stop_reason or "unknown").inc()
        if self.history is not None:
            self._history_mark(proc, old, new)

    def _history_mark(self, proc: ModelProcess, old: State, new: State) -> None:
        assert self.history is not None
        if new == State.STARTING:
            self.history.mark(proc.name, "load")
        elif new == State.READY and old == State.STARTING:
            self.history.mark(proc.name, "loaded")
            if proc.measured_bytes is not None:
                self.history.memory(proc.name, proc.measured_bytes)
        elif new == State.STOPPING:
            self.history.mark(proc.name, proc.stop_reason or "stop")
        elif old in _RUNNING and new in _CRASH_TARGETS:
            self.history.mark(proc.name, "crash")

    def history_snapshot(self, sup: Supervisor) -> dict[str, object]:
        """The timeline, after sampling the memory of every running model (so memory is
        recorded while the dashboard watches, and at each load)."""
        if self.history is None:
            return {"buckets": [], "marks": []}
        for proc in sup.models.values():
            if proc.state == State.READY:
                nbytes = proc.measured_bytes or sup.rss_of(proc)
                if nbytes:
                    self.history.memory(proc.name, nbytes)
        return self.history.snapshot()

    # ----------------------------------------------------------------- scrape
    async def render(self, sup: Supervisor, client: ChildClient) -> bytes:
        procs = list(sup.models.values())
        children = await asyncio.gather(
            *(self._scrape_child(p, client) for p in procs if _scrapeable(p))
        )
        self._state.snapshot = _Snapshot(sup, procs, dict(children))
        try:
            from prometheus_client import generate_latest

            return generate_latest(self.registry)
        finally:
            self._state.snapshot = None

    async def _scrape_child(
        self, proc: ModelProcess, children: ChildClient
    ) -> tuple[str, dict[str, float]]:
        port = proc.port
        text = await children.metrics(port, self._scrape_timeout) if port is not None else None
        return proc.name, parse_child_metrics(text) if text is not None else {}


def _scrapeable(proc: ModelProcess) -> bool:
    # llama-server answers /metrics only when started with --metrics (else 501).
    return proc.state == State.READY and proc.port is not None and "--metrics" in proc.argv


def parse_child_metrics(text: str) -> dict[str, float]:
    """The two llama.cpp gauges we re-export, from Prometheus text (unlabelled samples)."""
    wanted = (CHILD_DEFERRED, CHILD_KV_USAGE)
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("llamacpp:"):
            continue
        name, _, rest = line.partition(" ")
        name = name.split("{", 1)[0]
        if name in wanted:
            try:
                out[name] = float(rest.split()[0])
            except (IndexError, ValueError):
                continue
    return out


class _Snapshot:
    __slots__ = ("children", "procs", "sup")

    def __init__(
        self, sup: Supervisor, procs: list[ModelProcess], children: dict[str, dict[str, float]]
    ) -> None:
        self.sup = sup
        self.procs = procs
        self.children = children


class _SupervisorCollector:
    """Gauges read off the supervisor at scrape time (zero cost between scrapes)."""

    def __init__(self) -> None:
        self.snapshot: _Snapshot | None = None

    def describe(self) -> list[GaugeMetricFamily]:
        return []  # dynamic: registering must not call collect() before the app runs

    def collect(self) -> Iterator[GaugeMetricFamily]:
        snap = self.snapshot
        if snap is None:
            return
        yield from _model_gauges(snap)
        yield from _replica_gauges(snap)
        yield from _router_gauges(snap)


# Per-model gauges: attribute -> (name, help). A table, read once per scrape.
_MODEL_GAUGES = {
    "state": (
        "llamarouter_model_state", "1 for the model's current lifecycle state, 0 for the others.",
    ),
    "in_flight": (
        "llamarouter_model_in_flight_requests", "Requests being proxied to the model's child.",
    ),
    "queued": (
        "llamarouter_model_queued_requests",
        "Requests waiting in the router for the model to load (admission queue + load waiters).",
    ),
    "total_queued": (
        "llamarouter_model_total_queued_requests",
        "Inference Extension TotalQueuedRequests: router queue plus the child's "
        "llamacpp:requests_deferred (when the child runs with --metrics).",
    ),
    "kv": (
        "llamarouter_model_kv_cache_usage_ratio",
        "Inference Extension KVCacheUtilization: the child's llamacpp:kv_cache_usage_ratio "
        "(0-1; absent when the child does not run with --metrics).",
    ),
    "estimated": (
        "llamarouter_model_estimated_bytes",
        "Memory the model needs by the GGUF estimate (with --memory-budget).",
    ),
    "measured": (
        "llamarouter_model_measured_bytes",
        "Memory the loaded child reported for its buffers (model + KV + compute).",
    ),
}


def _model_gauges(snap: _Snapshot) -> Iterator[GaugeMetricFamily]:
    from prometheus_client.core import GaugeMetricFamily

    g = {
        key: GaugeMetricFamily(name, doc, labels=("model", "state") if key == "state" else ("model",))
        for key, (name, doc) in _MODEL_GAUGES.items()
    }
    sup = snap.sup
    for proc in snap.procs:
        est = sup.estimate_of(proc)
        if est is not None:
            g["estimated"].add_metric((proc.name,), est.total)
        if proc.measured_bytes is not None and proc.state == State.READY:
            g["measured"].add_metric((proc.name,), proc.measured_bytes)
        name = proc.name
        for s in State:
            g["state"].add_metric((name, s.value), 1.0 if proc.state == s else 0.0)
        g["in_flight"].add_metric((name,), proc.in_flight)
        ours = sup.queued_for(proc)
        g["queued"].add_metric((name,), ours)
        child = snap.children.get(name, {})
        g["total_queued"].add_metric((name,), ours + child.get(CHILD_DEFERRED, 0.0))
        if CHILD_KV_USAGE in child:
            g["kv"].add_metric((name,), child[CHILD_KV_USAGE])
    yield from g.values()


def _replica_gauges(snap: _Snapshot) -> Iterator[GaugeMetricFamily]:
    """Each child of a model with `replicas = N`, by a `replica` label (1 = its first)."""
    from prometheus_client.core import GaugeMetricFamily

    ready = GaugeMetricFamily(
        "llamarouter_replica_ready", "1 while the replica's child is ready to serve.", labels=("model", "replica"),
    )
    in_flight = GaugeMetricFamily(
        "llamarouter_replica_in_flight_requests", "Requests being proxied to the replica's child.",
        labels=("model", "replica"),
    )
    restarts = GaugeMetricFamily(
        "llamarouter_replica_restarts", "Restarts of the replica's child after a crash.",
        labels=("model", "replica"),
    )
    for proc in snap.procs:
        if proc.spec.replicas <= 1:
            continue
        for child in snap.sup.table.replicas(proc):
            labels = (proc.name, str(child.replica + 1))
            ready.add_metric(labels, 1.0 if child.state == State.READY else 0.0)
            in_flight.add_metric(labels, child.in_flight)
            restarts.add_metric(labels, child.restarts)
    yield from (ready, in_flight, restarts)


def _router_gauges(snap: _Snapshot) -> Iterator[GaugeMetricFamily]:
    from prometheus_client.core import GaugeMetricFamily

    sup = snap.sup
    memory = sup.memory
    if memory is not None:
        yield GaugeMetricFamily(
            "llamarouter_memory_budget_bytes", "The --memory-budget in bytes.", value=memory.budget
        )
        yield GaugeMetricFamily(
            "llamarouter_memory_used_bytes",
            "Budget held by loading and loaded models (measured, else estimated).",
            value=memory.used(sup.all_processes()),  # replicas and models still stopping too
        )
    loaded = sum(1 for proc in snap.procs if proc.state == State.READY)
    yield GaugeMetricFamily(
        "llamarouter_models_loaded", "Models whose child is ready to serve.", value=loaded
    )
    yield GaugeMetricFamily(
        "llamarouter_models_max", "The --models-max limit (0 = unlimited).",
        value=sup.config.limits.models_max,
    )
    yield GaugeMetricFamily(
        "llamarouter_waiting_requests", "Requests waiting for any model to be granted.",
        value=sup.waiting,
    )


class _KvCacheCollector:
    def __init__(self, kv: Callable[[], KvCache | None]) -> None:
        self._kv = kv

    def describe(self) -> list[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        kv = self._kv()
        if kv is None:
            return
        tokens = GaugeMetricFamily(
            "llamarouter_saved_cache_tokens",
            "Tokens of each slot cache saved by keep-cache, restored when the model loads.",
            labels=("model", "slot"),
        )
        size = GaugeMetricFamily(
            "llamarouter_saved_cache_bytes",
            "Disk used by each slot cache saved by keep-cache.",
            labels=("model", "slot"),
        )
        for saved in kv.saved():
            labels = (saved.model, str(saved.slot))
            tokens.add_metric(labels, saved.tokens)
            size.add_metric(labels, saved.bytes)
        yield tokens
        yield size
        ops = CounterMetricFamily(
            "llamarouter_keep_cache_operations",
            "Keep-cache slot saves and restores done, and those that failed or timed out.",
            labels=("operation",),
        )
        ops.add_metric(("save",), kv.saves)
        ops.add_metric(("restore",), kv.restores)
        ops.add_metric(("failure",), kv.failures)
        yield ops


# ------------------------------------------------------------------------ endpoint picker
# Pod-level gauges with the semantics of the Gateway API Inference Extension's model-server
# protocol (docs/metrics.md). Its endpoint picker scores whole pods: it reads one value per
# pod for each metric, and the adapter lists of one info series. The router's models play
# the adapters' part, so the picker's adapter affinity sends a model's requests to the
# pod that already has it loaded.
ADAPTERS_INFO = "llamarouter_loaded_models_info"
# The label names are fixed by the protocol (only the metric name is configurable there).
RUNNING_LABEL = "running_lora_adapters"
WAITING_LABEL = "waiting_lora_adapters"
MAX_LABEL = "max_lora"


def adapter_lists(
    sup: Supervisor, procs: list[ModelProcess]
) -> tuple[list[str], list[str], int]:
    """(loaded, queued for load, capacity) as the protocol's adapter labels carry them.

    Loading models and models with requests waiting for a slot are both "waiting": each
    holds or is about to take a slot, which is what the picker counts against max_lora.
    Names with a comma cannot be told apart in a comma-separated label, so they are left
    out (the picker then sees that model as not loaded anywhere, and balances by queue).
    """
    running: list[str] = []
    waiting: list[str] = []
    for proc in procs:
        if "," in proc.name:
            continue
        if proc.state == State.READY:
            running.append(proc.name)
        elif proc.state == State.STARTING or sup.queued_for(proc) > 0:
            waiting.append(proc.name)
    limit = sup.config.limits.models_max
    # 0 = unlimited: every known model fits, so the catalogue size is the capacity (a picker
    # reading 0 would think no model can ever be loaded here).
    capacity = limit if limit > 0 else len(procs)
    return sorted(running), sorted(waiting), capacity


class _EndpointPickerCollector:
    """Reads the same scrape-time snapshot as the per-model gauges."""

    def __init__(self, state: _SupervisorCollector) -> None:
        self._state = state

    def describe(self) -> list[GaugeMetricFamily]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from prometheus_client.core import GaugeMetricFamily

        snap = self._state.snapshot
        if snap is None:
            return
        sup = snap.sup
        queued = 0.0
        running = 0.0
        kv: float | None = None
        for proc in snap.procs:
            child = snap.children.get(proc.name, {})
            deferred = child.get(CHILD_DEFERRED, 0.0)
            queued += sup.queued_for(proc) + deferred
            # in_flight counts what the child deferred too; without --metrics the split is
            # unknown and every proxied request counts as running.
            running += max(0.0, proc.in_flight - deferred)
            if CHILD_KV_USAGE in child:
                # The fullest child: a request for it is the one that would wait for cache.
                kv = max(kv or 0.0, child[CHILD_KV_USAGE])
        yield GaugeMetricFamily(
            "llamarouter_total_queued_requests",
            "Requests waiting in this router and its children (protocol TotalQueuedRequests).",
            value=queued,
        )
        yield GaugeMetricFamily(
            "llamarouter_total_running_requests",
            "Requests being served by this router's children (protocol TotalRunningRequests).",
            value=running,
        )
        yield GaugeMetricFamily(
            "llamarouter_kv_cache_usage_ratio",
            "Highest KV-cache usage (0-1) among children run with --metrics, 0 without any "
            "(protocol KVCacheUtilization).",
            value=kv or 0.0,
        )
        loaded, waiting, capacity = adapter_lists(sup, snap.procs)
        info = GaugeMetricFamily(
            ADAPTERS_INFO,
            "Models loaded, models queued for load and --models-max, as the protocol's LoRA "
            "adapter labels; the value is the scrape time (the picker keeps the newest series).",
            labels=(RUNNING_LABEL, WAITING_LABEL, MAX_LABEL),
        )
        info.add_metric((",".join(loaded), ",".join(waiting), str(capacity)), time.time())
        yield info
