"""All children: one admission path, one scheduling loop, leases, reload and shutdown.

Every request and every `POST /models/load` becomes a *waiter* in one FIFO queue and
awaits one future, which resolves to a grant (a `Lease` on a READY model), a resolution
(the load was started) or an error. One loop (`_run`) owns the queue: each pass takes a
snapshot, asks the pure scheduler (`scheduler.plan`) what to do, and applies the actions
with no await in between. Model state is changed only by each model's owner task; the
supervisor sends it commands. A state change, a new or departing waiter, a released lease
and a reload all wake the loop; deadlines and TTLs wake it on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from ..errors import (
    BudgetExceeded,
    InvalidRequest,
    LlamaRouterError,
    ModelFailed,
    ModelNotFound,
    NotFound,
    QueueFull,
    ShuttingDown,
    StartAborted,
    Unavailable,
)
from ..settings.config import ModelSpec, RouterConfig
from . import scheduler
from .gguf_info import Estimate
from .kvcache import KvCache
from .launcher import Launcher
from .logring import end_queue
from .memory import MemoryManager
from .probes import Probe
from .process import ModelProcess
from .scheduler import Why
from .statedir import StateDir
from .states import State, api_status

log = logging.getLogger("llamarouter.supervisor")

Discover = Callable[[], dict[str, ModelSpec]]
ArgvBuilder = Callable[[ModelSpec, int], Sequence[str]]
StateObserver = Callable[[ModelProcess, State, State], None]
OptionsFor = Callable[[ModelSpec], dict[str, str]]


class EventHub:
    """Fan-out of /models/sse events. A subscriber that falls behind is dropped; once
    closed, a new subscriber gets the end marker at once."""

    def __init__(self, queue_size: int) -> None:
        self._queue_size = queue_size
        self._subscribers: set[asyncio.Queue[bytes | None]] = set()
        self._closed = False

    def publish(self, event: str, model: str, data: dict[str, object] | None = None) -> None:
        payload: dict[str, object] = {"model": model, "event": event}
        if data is not None:
            payload["data"] = data
        line = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
        for q in list(self._subscribers):
            try:
                q.put_nowait(line)
            except asyncio.QueueFull:
                # Too slow: drop the client; the end marker wakes its handler, which closes
                # the connection instead of hanging there.
                self._subscribers.discard(q)
                end_queue(q)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[bytes | None]]:
        q: asyncio.Queue[bytes | None] = asyncio.Queue(self._queue_size)
        if self._closed:
            # Nothing would ever end it later: a stream opened after shutdown began (a
            # reconnect on a kept-alive connection) would hold the router for its grace.
            end_queue(q)
        else:
            self._subscribers.add(q)
        try:
            yield q
        finally:
            self._subscribers.discard(q)

    def close(self) -> None:
        self._closed = True
        for q in list(self._subscribers):
            end_queue(q)
        self._subscribers.clear()


@dataclass
class Usage:
    """Request accounting of one model, kept by the supervisor (not the process)."""

    last_used: float = 0.0  # monotonic; stamped by every routed POST and when a request ends
    last_used_wall: float = 0.0
    last_activity: float = 0.0  # a response started or ended (liveness hint)


class Lease:
    """A granted request on a READY model. `release()` ends it; only the first call counts."""

    __slots__ = ("_released", "_sup", "proc")

    def __init__(self, sup: Supervisor, proc: ModelProcess) -> None:
        self.proc = proc
        self._sup = sup
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._sup._release(self.proc)


@dataclass(eq=False)
class _Waiter:
    id: int
    model: str
    fut: asyncio.Future[Lease | None]
    load: bool
    autoload: bool
    deadline: float | None
    since: float = 0.0  # monotonic: when it joined the queue
    saw_generation: int | None = None


class SchedulingWatch(Protocol):
    """Sees what the scheduler does beyond state changes (metrics, the dashboard); its
    methods never await and must not raise."""

    def waited(self, model: str, seconds: float) -> None: ...

    def drained(self, model: str) -> None: ...


@dataclass
class _Counters:
    evictions: int = 0
    passes: int = 0  # scheduling passes run (what a test waits on to know one has run)


class Supervisor:
    def __init__(
        self,
        config: RouterConfig,
        discover: Discover,
        launcher: Launcher,
        probe: Probe,
        build_argv: ArgvBuilder,
        state_dir: StateDir | None = None,
        observer: StateObserver | None = None,
        options_for: OptionsFor | None = None,
        memory: MemoryManager | None = None,
        kv_cache: KvCache | None = None,
        watch: SchedulingWatch | None = None,
    ) -> None:
        self.config = config
        self._watch = watch
        self._kv_cache = kv_cache
        self._observer = observer  # metrics: sees every transition, must not raise
        self._discover = discover
        self._launcher = launcher
        self._probe = probe
        self._build_argv = build_argv
        self._state_dir = state_dir
        self._options_for: OptionsFor = options_for or (lambda spec: dict(spec.options))
        self.memory = memory
        self.events = EventHub(config.limits.sse_queue)
        # Set when a model fails before it was ever ready in this run, with the reason:
        # single-model mode then exits, as llama-server does when its model cannot load.
        self.failed_before_ready = asyncio.Event()
        self.first_failure = ""
        self._been_ready: set[str] = set()
        self.models: dict[str, ModelProcess] = {}
        self.aliases: dict[str, str] = {}
        self._retired: set[ModelProcess] = set()  # replaced or removed by a reload, stopping
        # Retired while serving: they finish the requests they have, then stop.
        self._draining: set[ModelProcess] = set()
        # Giving way to requests past the drain bound: new requests queue, the model is
        # evicted once idle.
        self._drains: set[ModelProcess] = set()
        # Seconds the last load of each model took (for --evict-cost).
        self._load_seconds: dict[str, float] = {}
        self._file_sizes: dict[str, int] = {}
        # Leases held on each process. Counted per process, not per name: a reload can
        # retire a busy model and list the same name again while the old child serves.
        self._serving: dict[ModelProcess, int] = {}
        self._usage: dict[str, Usage] = {}
        self._starts: dict[int, int] = {}  # id(proc) -> number of its latest load
        self._generations = itertools.count(1)
        self._waiters: list[_Waiter] = []
        self._ids = itertools.count(1)
        self._owners: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._kick = asyncio.Event()
        self.counters = _Counters()
        self._pins: dict[str, bool] = {}  # runtime pin/unpin over the preset's `pin`
        self.closing = False
        self.started = False  # start() finished: /readyz reports ready from here on

    # ----------------------------------------------------------------- Demand (for processes)
    def in_flight(self, proc: ModelProcess) -> int:
        return self._serving.get(proc, 0)

    def wanted(self, name: str) -> bool:
        return self._pins.get(name, False) or any(w.model == name for w in self._waiters)

    def last_activity(self, name: str) -> float:
        usage = self._usage.get(name)
        return usage.last_activity if usage is not None else 0.0

    def set_activity(self, name: str, when: float) -> None:
        self._usage_of(name).last_activity = when

    def usage(self, name: str) -> Usage:
        return self._usage.get(name) or Usage()

    def _usage_of(self, name: str) -> Usage:
        usage = self._usage.get(name)
        if usage is None:
            usage = self._usage[name] = Usage()
        return usage

    # ----------------------------------------------------------------- setup
    def _new_process(self, spec: ModelSpec) -> ModelProcess:
        proc = ModelProcess(
            spec, self.config, self._launcher, self._probe, self._build_argv, self._on_state,
            demand=self,
        )
        proc.kv_cache = self._kv_cache
        memory = self.memory
        if memory is not None:
            proc.before_spawn = lambda: memory.wait_recovered(memory.footprint(proc))
            if memory.probe.gpu:
                proc.measure_device = lambda pid: memory.measure_device(proc, pid)
        task = proc.open()
        self._owners.add(task)
        task.add_done_callback(self._owner_done)
        return proc

    def _owner_done(self, task: asyncio.Task[None]) -> None:
        self._owners.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s ended with an error: %r", task.get_name(), exc, exc_info=exc)

    def _apply_specs(self, specs: dict[str, ModelSpec]) -> None:
        for name, spec in specs.items():
            if name not in self.models:
                self.models[name] = self._new_process(spec)
        self.aliases = {
            alias: name for name, spec in specs.items() for alias in spec.aliases if alias != name
        }

    async def start(self) -> None:
        self._apply_specs(self._discover())
        startup = [p for p in self.models.values() if p.spec.load_on_startup or p.spec.pin]
        limit = self.config.limits.models_max
        # Upstream refuses to start when load-on-startup models exceed --models-max; with
        # --models-max 0 it refuses any (a bug we do not copy: 0 means unlimited).
        if limit > 0 and len(startup) > limit:
            names = ", ".join(p.name for p in startup)
            raise LlamaRouterError(
                f"{len(startup)} models are set to load on startup ({names}) "
                f"but --models-max is {limit}"
            )
        for proc in startup:
            if not proc.spec.pin:  # pinned ones are the scheduler's to keep loaded
                self._note_start(proc)
                proc.start()
        self._loop_task = asyncio.create_task(self._run(), name="scheduler")
        self._loop_task.add_done_callback(self._loop_done)
        self._kick.set()
        self.started = True

    def _loop_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical("the scheduling loop died: %r", task.exception(), exc_info=task.exception())

    # ----------------------------------------------------------------- lookup
    def resolve(self, name: str) -> ModelProcess:
        proc = self.models.get(name)
        if proc is None:
            canonical = self.aliases.get(name)
            if canonical is not None:
                proc = self.models.get(canonical)
        if proc is None:
            raise ModelNotFound(f"model '{name}' not found")
        return proc

    def find(self, name: str) -> ModelProcess | None:
        try:
            return self.resolve(name)
        except ModelNotFound:
            return None

    def rss_of(self, proc: ModelProcess) -> int | None:
        """Resident memory of the model's child, if it runs (informational: shared pages and
        the mapped model file count too)."""
        child = proc.child
        return self._launcher.rss_bytes(child) if child is not None else None

    def queued_for(self, proc: ModelProcess) -> int:
        return sum(1 for w in self._waiters if w.model == proc.name and not w.load)

    def draining(self, proc: ModelProcess) -> bool:
        """Giving way to requests past --drain-after: its own new requests queue."""
        return proc in self._drains

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiters if not w.load)

    @property
    def evictions(self) -> int:
        return self.counters.evictions

    def visible(self) -> list[ModelProcess]:
        return [p for p in self.models.values() if not p.spec.hidden]

    def all_processes(self) -> list[ModelProcess]:
        return [*self.models.values(), *self._retired]

    def estimate_of(self, proc: ModelProcess) -> Estimate | None:
        return self.memory.estimate_of(proc) if self.memory is not None else None

    # ----------------------------------------------------------------- admission
    def touch(self, proc: ModelProcess) -> None:
        """Upstream stamps last_used on every POST it routes to a model, loads included."""
        usage = self._usage_of(proc.name)
        usage.last_used = time.monotonic()
        usage.last_used_wall = time.time()

    async def acquire(self, proc: ModelProcess, autoload: bool) -> Lease:
        """Wait until `proc` is READY and hold it busy: the caller must `release()` the lease.

        Raises ShuttingDown; InvalidRequest "model is not loaded" (autoload off);
        ModelFailed (503 + Retry-After) during a failed model's hold-off; StartAborted when
        the load it waited for was stopped; ModelNotFound when a reload removed the model;
        BudgetExceeded when it cannot fit; QueueFull/Unavailable past --max-queue/--max-wait.
        """
        if self.closing:
            raise ShuttingDown("server is shutting down")
        if (
            proc.expected_state == State.READY
            and proc not in self._drains
            and self.models.get(proc.name) is proc
        ):
            # The scheduler's grant rule for a READY model, applied inline (no queue).
            if self._watch is not None:
                self._watch.waited(proc.name, 0.0)
            return self._grant(proc)
        result = await self._admit(proc, load=False, autoload=autoload)
        assert result is not None
        return result

    async def load(self, name: str) -> ModelProcess:
        """POST /models/load: start now (evicting the idle LRU model if needed); returns
        once the start is under way, as upstream does."""
        proc = self.find(name)
        if proc is None:
            # Upstream builds "model is not found", but its HTTP layer rewrites the body of
            # every 404 to this; clients see this text.
            raise NotFound("File Not Found")
        if self.closing:
            raise ShuttingDown("server is shutting down")
        self.touch(proc)
        await self._admit(proc, load=True, autoload=True)
        return proc

    async def _admit(self, proc: ModelProcess, load: bool, autoload: bool) -> Lease | None:
        limits = self.config.limits
        if not load and limits.max_queue is not None and self.waiting >= limits.max_queue:
            raise QueueFull(
                f"too many requests waiting for a model ({self.waiting}); try again later",
                retry_after=self._retry_after(),
            )
        if self.memory is not None:
            # The estimate reads the GGUF header once (off the loop); the scheduler decides.
            await self.memory.estimate_for(proc, self._options_for(proc.spec))
            if self.closing:
                raise ShuttingDown("server is shutting down")
        loop = asyncio.get_running_loop()
        deadline = None
        if limits.max_wait is not None and not load:
            deadline = time.monotonic() + limits.max_wait
        waiter = _Waiter(
            next(self._ids), proc.name, loop.create_future(), load, autoload, deadline, time.monotonic(),
        )
        self._waiters.append(waiter)
        self._kick.set()
        try:
            return await asyncio.shield(waiter.fut)
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
                self._kick.set()

    def _abandon(self, waiter: _Waiter) -> None:
        """The caller went away: leave the queue; a grant that raced in is given back."""
        if waiter.fut.done():
            if not waiter.fut.cancelled() and waiter.fut.exception() is None:
                lease = waiter.fut.result()
                if lease is not None:
                    lease.release()
        else:
            waiter.fut.cancel()

    def _grant(self, proc: ModelProcess) -> Lease:
        self._serving[proc] = self._serving.get(proc, 0) + 1
        return Lease(self, proc)

    def _release(self, proc: ModelProcess) -> None:
        usage = self._usage_of(proc.name)
        now = time.monotonic()
        usage.last_used = usage.last_activity = now
        usage.last_used_wall = time.time()
        left = self._serving.get(proc, 0) - 1
        proc.served()
        if left > 0:
            self._serving[proc] = left
        else:
            self._serving.pop(proc, None)
        if left <= 0 and self._waiters and not self.closing:
            # Decide now, before another request can make the model busy again: an idle
            # model that others wait for is evicted at this instant (upstream's rule too),
            # a drained one leaves. Waiting for the loop's next pass let a trickle of
            # requests keep one model loaded while the queue waited.
            self._pass(now)
        if left <= 0 or proc in self._draining:
            # An idle model matters to queued requests (it may be evicted for them), to
            # TTL, and to a reload waiting for it to finish its requests.
            self._kick.set()

    def _retry_after(self) -> float:
        return max(1.0, self.config.timeouts.ready_poll * 20)

    # ----------------------------------------------------------------- the loop
    async def _run(self) -> None:
        tick = self.config.timeouts.tick
        next_tick = time.monotonic() + tick
        while True:
            now = time.monotonic()
            wake = soonest = self._pass(now)
            if now >= next_tick:
                next_tick = now + tick
                try:
                    self._record()
                except Exception:
                    log.exception("recording the children in the state dir failed")
            if self._settling():
                wake = next_tick if soonest is None else min(next_tick, soonest)
            # At rest (nothing waits, nothing loads or stops) no timer is set: only an
            # event wakes the loop, so an idle router costs no CPU.
            timeout = None if wake is None else max(0.0, wake - time.monotonic()) + 0.001
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._kick.wait()
            self._kick.clear()

    def _settling(self) -> bool:
        """Whether the housekeeping tick is still needed: requests wait (what they wait
        for, such as memory a sleeping child gave back, may change without an event), or
        a child is loading, stopping or backing off (the state-dir record of a child
        spawned mid-load)."""
        return bool(self._waiters) or any(
            p.state in (State.STARTING, State.STOPPING, State.BACKOFF) for p in self.all_processes()
        )

    def _pass(self, now: float) -> float | None:
        """One scheduling pass: plan from a snapshot and apply it, with no await between.
        Returns when the next one is due without an event (None: only on an event)."""
        soonest = None
        # The whole pass, not only plan and apply: a loop that died of a bug would
        # leave every later request waiting for a grant that never comes.
        try:
            self._stop_drained()
            snap = self._snapshot(now)
            self._apply(scheduler.plan(snap))
            soonest = scheduler.next_wakeup(snap)
        except Exception:  # a bug of ours: log it, keep the loop (and the router) alive
            log.exception("scheduling pass failed")
        self.counters.passes += 1
        return soonest

    def _stop_drained(self) -> None:
        for proc in list(self._draining):
            if self._serving.get(proc, 0) == 0 or proc.expected_state != State.READY:
                self._draining.discard(proc)
                proc.stop("reload")

    def _snapshot(self, now: float) -> scheduler.Snapshot:
        memory = self.memory
        views = []
        for proc in self.all_processes():
            usage = self.usage(proc.name) if self.models.get(proc.name) is proc else Usage()
            state = proc.expected_state
            starts = self._starts.get(id(proc), 0)
            views.append(
                scheduler.ModelView(
                    name=proc.name,
                    state=state,
                    in_flight=self._serving.get(proc, 0),
                    last_used=usage.last_used,
                    idle_since=max(usage.last_used, proc.ready_at or 0.0),
                    pinned=self._pinned(proc),
                    bytes=memory.held(proc) if memory is not None else 0,
                    ttl=proc.ttl,
                    failed_at=proc.state_changed_at if proc.state == State.FAILED else None,
                    listed=self.models.get(proc.name) is proc,
                    load_generation=starts,
                    draining=proc in self._drains,
                    ready_at=proc.ready_at or 0.0,
                    reload_seconds=self._reload_seconds(proc),
                )
            )
        waiters = [
            scheduler.WaiterView(
                id=w.id, model=self.aliases.get(w.model, w.model), load=w.load,
                autoload=w.autoload, deadline=w.deadline, saw_generation=w.saw_generation,
                since=w.since,
            )
            for w in self._waiters
            if not w.fut.done()
        ]
        return scheduler.Snapshot(
            now=now,
            models=views,
            waiters=waiters,
            models_max=self.config.limits.models_max,
            budget=memory.budget if memory is not None else None,
            failed_holdoff=self.config.limits.failed_holdoff,
            closing=self.closing,
            drain_after=self.config.limits.drain_after,
            evict_cost=self.config.limits.evict_cost,
        )

    def _reload_seconds(self, proc: ModelProcess) -> float:
        """What loading `proc` again would cost: its last measured load, or before it has
        loaded once its size read at a nominal 1 GiB/s (only --evict-cost reads it)."""
        if not self.config.limits.evict_cost:
            return 0.0
        measured = self._load_seconds.get(proc.name)
        if measured is not None:
            return measured
        path = proc.spec.model_path
        if not path:
            return 0.0
        size = self._file_sizes.get(path)
        if size is None:
            try:
                size = os.stat(path).st_size  # once per path: a local stat
            except OSError:
                size = 0
            self._file_sizes[path] = size
        return size / _NOMINAL_LOAD_BYTES_PER_S

    def _apply(self, actions: list[scheduler.Action]) -> None:
        by_id = {w.id: w for w in self._waiters}
        for action in actions:
            if isinstance(action, scheduler.Start):
                proc = self.models[action.model]
                self._note_start(proc)
                proc.start()
            elif isinstance(action, scheduler.Drain):
                proc = self.models[action.model]
                self._drains.add(proc)
                log.info(
                    "[%s] draining: a request has waited %gs (--drain-after) for a slot; new "
                    "requests queue behind the swap, %d in flight finish first",
                    proc.name, self.config.limits.drain_after or 0.0, self._serving.get(proc, 0),
                )
                if self._watch is not None:
                    self._watch.drained(proc.name)
            elif isinstance(action, scheduler.Undrain):
                proc = self.models[action.model]
                if proc in self._drains:
                    self._drains.discard(proc)
                    log.info("[%s] no longer draining: nothing waits for its slot any more", proc.name)
            elif isinstance(action, scheduler.Evict):
                proc = self.models[action.model]
                if action.reason == "ttl":
                    log.info("[%s] idle past its ttl (%gs): unloading", proc.name, proc.ttl or 0)
                elif action.reason == "drained":
                    log.info("[%s] drained: unloading it for the waiting requests", proc.name)
                    self.counters.evictions += 1
                else:
                    log.info("[%s] evicting the idle least recently used model", proc.name)
                    self.counters.evictions += 1
                proc.stop(action.reason)
            elif isinstance(action, scheduler.Track):
                waiter = by_id.get(action.waiter)
                if waiter is not None:
                    generation = action.generation
                    if generation is None:  # the load the Start just before began
                        started = self.models.get(waiter.model)
                        generation = self._starts.get(id(started), 0) if started is not None else 0
                    waiter.saw_generation = generation
            else:
                waiter = by_id.get(action.waiter)
                if waiter is None or waiter.fut.done():
                    continue
                if isinstance(action, scheduler.Grant):
                    if self._watch is not None:
                        self._watch.waited(waiter.model, time.monotonic() - waiter.since)
                    waiter.fut.set_result(self._grant(self.models[action.model]))
                elif isinstance(action, scheduler.Resolve):
                    waiter.fut.set_result(None)
                else:
                    waiter.fut.set_exception(self._refusal(action))

    def _note_start(self, proc: ModelProcess) -> None:
        # Load numbers are unique across all processes: a reload's new process of the same
        # name never reuses the number a waiter saw on the old one.
        if proc.expected_state in (State.STOPPED, State.FAILED):
            self._starts[id(proc)] = next(self._generations)

    def _refusal(self, action: scheduler.Refuse) -> LlamaRouterError:
        name, why = action.model, action.why
        proc = self.models.get(name)
        if why == Why.SHUTDOWN:
            return ShuttingDown("server is shutting down")
        if why == Why.REMOVED:
            return ModelNotFound(f"model '{name}' not found")
        if why == Why.NOT_LOADED:
            return InvalidRequest("model is not loaded")
        if why == Why.RUNNING:
            return InvalidRequest("model is already running")
        if why == Why.NO_ROOM:
            return LlamaRouterError("model limit reached, try again later")
        if why == Why.DEADLINE:
            wait = self.config.limits.max_wait or 0.0
            return Unavailable(
                f"model name={name} was not ready within {wait:g}s; try again later",
                retry_after=self._retry_after(),
            )
        if why == Why.FAILED and proc is not None:
            return ModelFailed(proc.failure_message(), retry_after=action.retry_after)
        if why == Why.ABORTED and proc is not None:
            return StartAborted(
                f"model name={name} stopped while loading ({proc.stop_reason or 'stopped'})"
            )
        if why == Why.BUDGET and proc is not None and self.memory is not None:
            return self._budget_error(proc, action.detail)
        return LlamaRouterError(f"model name={name}: {why}")

    def _budget_error(self, proc: ModelProcess, fixed: int) -> BudgetExceeded:
        assert self.memory is not None
        est = self.memory.estimate_of(proc)
        budget = _mib(self.memory.budget)
        if est is None:
            return BudgetExceeded(f"model name={proc.name} does not fit the memory budget {budget}")
        # On a GPU host, the VRAM a child needs beyond its buffers (learned from others).
        overhead = max(self.memory.footprint(proc) - est.total, 0)
        return BudgetExceeded(
            f"model name={proc.name} needs an estimated {_mib(est.total + overhead)} (weights "
            f"{_mib(est.weights)}, KV cache {_mib(est.kv)} for {est.n_ctx} tokens, compute "
            f"{_mib(est.compute)}" + (f", GPU overhead {_mib(overhead)}" if overhead else "")
            + f") but the memory budget is {budget}"
            + (f" with {_mib(fixed)} held by pinned models" if fixed else "")
        )

    def _pinned(self, proc: ModelProcess) -> bool:
        override = self._pins.get(proc.name)
        if override is not None:
            return override
        return proc.spec.pin or self.config.single_model is not None

    def pinned(self, proc: ModelProcess) -> bool:
        """Whether the model is kept loaded: its preset's `pin`, or a runtime pin."""
        return self._pinned(proc)

    def pin(self, name: str, on: bool) -> ModelProcess:
        """POST /models/pin: keep a model loaded (started now if a slot allows, never
        evicted, restarted after a crash or unload), or let it go back to normal. Lasts
        until the router stops; a reload keeps it."""
        proc = self.find(name)
        if proc is None:
            raise InvalidRequest("model is not found")
        self._pins[proc.name] = on
        self._kick.set()
        return proc

    def _record(self) -> None:
        if self._state_dir is not None:
            try:
                self._state_dir.record(self.all_processes())
            except OSError as exc:
                log.warning("cannot write the state dir record: %s", exc)

    def _on_state(self, proc: ModelProcess, old: State, new: State) -> None:
        """Called by a model's owner on every transition (never awaits, must not raise)."""
        if self._observer is not None:
            self._observer(proc, old, new)
        if new in (State.READY, State.STOPPED, State.FAILED, State.SHUTDOWN):
            self._record()
        if new != State.READY:
            self._drains.discard(proc)
        if new == State.READY:
            self._been_ready.add(proc.name)
            if proc.load_started_at is not None and proc.ready_at is not None:
                self._load_seconds[proc.name] = proc.ready_at - proc.load_started_at
        elif new == State.FAILED and proc.name not in self._been_ready and not self.failed_before_ready.is_set():
            self.first_failure = f"model name={proc.name}: {proc.failure or 'failed'}"
            self.failed_before_ready.set()
        # ever_ready is about the life that is ending (it resets only on entering STARTING).
        old_api = api_status(old, proc.ever_ready)
        new_api = proc.api_status
        listed = self.models.get(proc.name) is proc
        if listed and new == State.STARTING and old in (State.STOPPED, State.FAILED):
            self.events.publish("model_status", proc.name, {"status": "loading"})
        elif listed and old_api != new_api:
            data: dict[str, object] = {"status": new_api}
            if new_api == "unloaded":
                # A stop we asked for is a clean exit, whatever signal ended the child.
                data["exit_code"] = proc.exit_code if proc.crashed and proc.exit_code is not None else 0
            if new == State.READY and proc.loaded_info:
                data["info"] = proc.loaded_info
            self.events.publish("status_change", proc.name, data)
        if new in (State.STOPPED, State.FAILED, State.SHUTDOWN) and proc in self._retired:
            self._retired.discard(proc)
            self._draining.discard(proc)
            self._close(proc)
        self._kick.set()

    def _close(self, proc: ModelProcess) -> None:
        if proc.state != State.SHUTDOWN:
            proc.close()
        self._starts.pop(id(proc), None)
        self._serving.pop(proc, None)

    # ----------------------------------------------------------------- management API
    def unload(self, name: str) -> ModelProcess:
        proc = self.find(name)
        if proc is None:
            raise InvalidRequest("model is not found")
        if proc.expected_state not in (State.STARTING, State.READY, State.BACKOFF):
            raise InvalidRequest("model is not running")
        proc.stop("unloaded")
        return proc

    def unload_all(self) -> list[str]:
        """Stop every running model that is not pinned; their names."""
        names = []
        for proc in list(self.models.values()):
            # What the model's owner will do, not what it did: one with a stop already on
            # its way (an eviction, a TTL in the same pass) is not running any more, and
            # unload() would refuse it half-way through the list.
            if proc.spec.pin or proc.expected_state not in (State.STARTING, State.READY, State.BACKOFF):
                continue
            self.unload(proc.name)
            names.append(proc.name)
        return names

    async def reload(self) -> None:
        """Rescan every source. A model whose definition changed or vanished is stopped
        (it keeps its slot until it has exited); the new definition applies at once, so a
        request arriving meanwhile gets the model as it is defined now."""
        specs = self._discover()
        if self.closing:
            return
        for name, proc in list(self.models.items()):
            new = specs.get(name)
            if new is not None and new == proc.spec:
                if not (proc.expected_state == State.FAILED and proc.file_repaired()):
                    continue
                # Same definition, but the file that failed was replaced or rewritten:
                # a fresh process, so no hold-off and a fresh failure budget.
                log.info("[%s] its model file changed since it failed: it may load again", name)
            del self.models[name]
            state = proc.expected_state
            if state == State.READY and self._serving.get(proc, 0) > 0:
                # Requests in flight finish on the old definition; it stops once idle
                # (and keeps its slot until then, so the new one waits for room).
                self._retired.add(proc)
                self._draining.add(proc)
            elif state in (State.STARTING, State.READY, State.BACKOFF, State.STOPPING):
                proc.stop("reload")
                self._retired.add(proc)
            else:
                self._close(proc)
            if new is None:
                self._usage.pop(name, None)
        self._apply_specs(specs)
        self.events.publish("models_reload", "*")
        self._kick.set()

    # ----------------------------------------------------------------- shutdown
    def begin_shutdown(self) -> None:
        """Refuse new work: queued requests and event streams end now, in-flight
        responses may finish (the caller bounds that with the shutdown grace)."""
        if self.closing:
            return
        self.closing = True
        for waiter in self._waiters:
            if not waiter.fut.done():
                waiter.fut.set_exception(ShuttingDown("server is shutting down"))
        self.events.close()
        for proc in self.all_processes():
            proc.logs.close()
        self._kick.set()

    def kill_all(self) -> None:
        """Forced exit (second signal): SIGKILL every child's process group now."""
        for proc in self.all_processes():
            proc.kill_now()

    async def shutdown(self) -> None:
        """Stop every child in parallel (each: SIGTERM, stop-timeout, SIGKILL, reap), each
        bounded by its own stop bound; then end the owners and the loop."""
        self.begin_shutdown()
        procs = self.all_processes()
        for proc in procs:
            proc.shutdown()
        results = await asyncio.gather(*(p.wait_shutdown(p.stop_bound) for p in procs))
        for proc, ok in zip(procs, results, strict=True):
            if not ok:
                log.error("[%s] did not stop within %.1fs; killing", proc.name, proc.stop_bound)
                proc.kill_now()
        for proc in procs:
            proc.close()
        owners = list(self._owners)
        if owners:
            _, pending = await asyncio.wait(owners, timeout=self.config.timeouts.reap)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=self.config.timeouts.reap)
        loop_task = self._loop_task
        if loop_task is not None:
            loop_task.cancel()
            # asyncio.wait never re-raises: a loop that died of a bug (logged by _loop_done)
            # must not skip the rest of shutdown (state-dir record, event streams).
            _, pending = await asyncio.wait([loop_task], timeout=self.config.timeouts.reap)
            if pending:
                log.error("the scheduling loop did not end within %.1fs", self.config.timeouts.reap)
        self.events.close()
        if self._state_dir is not None:
            with contextlib.suppress(OSError):
                self._state_dir.record(())


# Before a model has loaded once, --evict-cost guesses its load time from its size.
_NOMINAL_LOAD_BYTES_PER_S = 1024**3


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"
