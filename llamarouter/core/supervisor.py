"""All children: admission queue, LRU eviction, idle TTL, reload and shutdown.

Scheduling follows upstream's router (server-models.cpp `server_lru_sched`): requests for a
model that is not running join a FIFO queue, requests for the same model share one entry,
a load takes a free `--models-max` slot or evicts the least recently used idle model, and a
busy model is never evicted. Every decision is made synchronously inside `_schedule()`, which
runs whenever something that affects it changes (a state change, a request ending, a waiter
joining or leaving), so no decision is split by an await.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

from ..settings.config import ModelSpec, RouterConfig
from ..errors import (
    ConfigError,
    InvalidRequest,
    LlamaRouterError,
    ModelFailed,
    ModelNotFound,
    NotFound,
    QueueFull,
    ShuttingDown,
    BudgetExceeded,
    Unavailable,
)
from .scheduler import Candidate, plan_evictions
from .launcher import Launcher
from .memory import MemoryManager
from .process import ModelProcess
from .states import State, api_status
from .statedir import StateDir

log = logging.getLogger("llamarouter.core.supervisor")

Discover = Callable[[], dict[str, ModelSpec]]
ArgvBuilder = Callable[[ModelSpec, int], Sequence[str]]
StateObserver = Callable[[ModelProcess, State, State], None]
OptionsFor = Callable[[ModelSpec], dict[str, str]]


class EventHub:
    """Fan-out of /models/sse events. A subscriber that falls behind is dropped."""

    def __init__(self, queue_size: int) -> None:
        self._queue_size = queue_size
        self._subscribers: set[asyncio.Queue[bytes | None]] = set()

    def publish(self, event: str, model: str, data: dict[str, object] | None = None) -> None:
        payload: dict[str, object] = {"model": model, "event": event}
        if data is not None:
            payload["data"] = data
        line = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
        for q in list(self._subscribers):
            try:
                q.put_nowait(line)
            except asyncio.QueueFull:
                # Too slow: drop the client. Make room for the end marker so its handler
                # wakes up and closes the connection instead of hanging there.
                self._subscribers.discard(q)
                with contextlib.suppress(asyncio.QueueEmpty):
                    q.get_nowait()
                q.put_nowait(None)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[bytes | None]]:
        q: asyncio.Queue[bytes | None] = asyncio.Queue(self._queue_size)
        self._subscribers.add(q)
        try:
            yield q
        finally:
            self._subscribers.discard(q)

    def close(self) -> None:
        for q in list(self._subscribers):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)
        self._subscribers.clear()


@dataclass
class _Entry:
    """Requests waiting for one model that is not running; upstream's queue entry."""

    name: str
    waiters: int = 0
    started: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor:
    def __init__(
        self,
        config: RouterConfig,
        discover: Discover,
        launcher: Launcher,
        session: aiohttp.ClientSession,
        build_argv: ArgvBuilder,
        state_dir: StateDir | None = None,
        observer: StateObserver | None = None,
        options_for: OptionsFor | None = None,
        memory: MemoryManager | None = None,
    ) -> None:
        self.config = config
        self._observer = observer  # metrics: sees every transition, must not raise
        self._discover = discover
        self._launcher = launcher
        self._session = session
        self._build_argv = build_argv
        self._state_dir = state_dir
        self.events = EventHub(config.limits.sse_queue)
        self.models: dict[str, ModelProcess] = {}
        self.aliases: dict[str, str] = {}
        self._queue: dict[str, _Entry] = {}  # insertion order is the FIFO order
        self.waiting = 0  # requests inside acquire() that have no grant yet
        self.closing = False
        self.started = False  # start() finished: /readyz reports ready from here on
        self._tick_task: asyncio.Task[None] | None = None
        self._retired: set[ModelProcess] = set()  # replaced by reload, still stopping
        self.evictions = 0
        self._scheduling = False
        self._reschedule = False
        # The merged child options of a model (what its memory estimate depends on).
        self._options_for: OptionsFor = options_for or (lambda spec: dict(spec.options))
        self.memory = memory

    # ----------------------------------------------------------------- setup
    def apply_specs(self, specs: dict[str, ModelSpec]) -> None:
        for name, spec in specs.items():
            proc = self.models.get(name)
            if proc is None:
                self.models[name] = self._new_process(spec)
            elif proc.spec != spec:
                proc.spec = spec
                if not proc.holds_slot:
                    proc.argv = []  # show the new command line, not the last run's
        self.aliases = {
            alias: name for name, spec in specs.items() for alias in spec.aliases if alias != name
        }

    def _new_process(self, spec: ModelSpec) -> ModelProcess:
        proc = ModelProcess(
            spec, self.config, self._launcher, self._session, self._build_argv, self._on_state
        )
        memory = self.memory
        if memory is not None:
            proc.before_spawn = lambda: memory.wait_recovered(memory.footprint(proc))
        return proc

    async def start(self) -> None:
        self.apply_specs(self._discover())
        self._tick_task = asyncio.create_task(self._housekeeping(), name="housekeeping")
        startup = [p for p in self.models.values() if p.spec.load_on_startup or p.spec.pin]
        limit = self.config.limits.models_max
        # Upstream refuses to start when load-on-startup models exceed --models-max; with
        # --models-max 0 it refuses any (a bug we do not copy: 0 means unlimited).
        if limit > 0 and len(startup) > limit:
            names = ", ".join(p.name for p in startup)
            raise ConfigError(
                f"{len(startup)} models are set to load on startup ({names}) "
                f"but --models-max is {limit}"
            )
        for proc in startup:
            proc.start()
        self.started = True

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
        """Requests waiting for this model: in the admission queue or for its load."""
        entry = self._queue.get(proc.name)
        return proc.waiters + (entry.waiters if entry is not None else 0)

    def visible(self) -> list[ModelProcess]:
        return [p for p in self.models.values() if not p.spec.hidden]

    # ----------------------------------------------------------------- requests
    async def acquire(self, proc: ModelProcess, autoload: bool) -> None:
        """Block until `proc` is READY, then count the caller as in flight on it.

        Raises: ShuttingDown; InvalidRequest "model is not loaded" when autoload is off and
        the model is not running; ModelFailed (503) while the model is FAILED; StartFailed
        when its load failed; QueueFull/Unavailable (503 + Retry-After) past the configured
        queue length or wait. The caller must call `release(proc)` after a grant.
        """
        if self.closing:
            raise ShuttingDown("server is shutting down")
        if proc.state == State.READY:
            proc.in_flight += 1
            return
        if not autoload and proc.state not in (State.STARTING, State.BACKOFF, State.READY):
            raise InvalidRequest("model is not loaded")
        limits = self.config.limits
        if limits.max_queue is not None and self.waiting >= limits.max_queue:
            raise QueueFull(
                f"too many requests waiting for a model ({self.waiting}); try again later",
                retry_after=self._retry_after(),
            )
        self.waiting += 1
        try:
            if limits.max_wait is None:
                await self._wait_granted(proc, autoload)
            else:
                try:
                    async with asyncio.timeout(limits.max_wait):
                        await self._wait_granted(proc, autoload)
                except TimeoutError:
                    raise Unavailable(
                        f"model name={proc.name} was not ready within {limits.max_wait:g}s; "
                        "try again later",
                        retry_after=self._retry_after(),
                    ) from None
        finally:
            self.waiting -= 1

    async def _wait_granted(self, proc: ModelProcess, autoload: bool) -> None:
        while True:
            if self.closing:
                raise ShuttingDown("server is shutting down")
            state = proc.state
            if state == State.READY:
                proc.in_flight += 1
                return
            if state in (State.STARTING, State.BACKOFF):
                await proc.wait_ready()
                continue
            if state == State.FAILED:
                held = time.monotonic() - proc.state_changed_at
                holdoff = self.config.limits.failed_holdoff
                if held < holdoff:
                    raise ModelFailed(proc.failure_message(), retry_after=holdoff - held)
            if not autoload:
                raise InvalidRequest("model is not loaded")
            await self.check_fits(proc)
            await self._queue_for(proc)

    async def _queue_for(self, proc: ModelProcess) -> None:
        entry = self._queue.get(proc.name)
        if entry is None:
            entry = self._queue[proc.name] = _Entry(proc.name)
        entry.waiters += 1
        self._schedule()
        try:
            await entry.started.wait()
        finally:
            entry.waiters -= 1
            if entry.waiters <= 0 and self._queue.get(proc.name) is entry:
                # The last waiter gave up: the entry costs nobody a slot any more.
                del self._queue[proc.name]
                self._schedule()

    def release(self, proc: ModelProcess) -> None:
        proc.in_flight -= 1
        now = time.monotonic()
        proc.last_used = now
        proc.last_activity = now
        proc.last_used_wall = time.time()
        # An idle model matters only to queued requests (it may now be evicted for them).
        if proc.in_flight == 0 and self._queue:
            self._schedule()

    def _retry_after(self) -> float:
        return max(1.0, self.config.timeouts.ready_poll * 20)

    # ----------------------------------------------------------------- memory
    async def check_fits(self, proc: ModelProcess) -> None:
        """With a memory budget: estimate the model (once) and refuse it at once if it
        cannot fit even after every evictable model is stopped (pinned ones stay)."""
        memory = self.memory
        if memory is None:
            return
        est = await memory.estimate_for(proc, self._options_for(proc.spec))
        if est is None:
            return
        fixed = sum(
            memory.footprint(p) for p in self._all_procs()
            if p.holds_slot and p is not proc and self._pinned(p)
        )
        if fixed + est.total > memory.budget:
            raise BudgetExceeded(
                f"model name={proc.name} needs an estimated {_mib(est.total)} (weights "
                f"{_mib(est.weights)}, KV cache {_mib(est.kv)} for {est.n_ctx} tokens, compute "
                f"{_mib(est.compute)}) but the memory budget is {_mib(memory.budget)}"
                + (f" with {_mib(fixed)} held by pinned models" if fixed else "")
            )

    def _all_procs(self) -> list[ModelProcess]:
        return [*self.models.values(), *self._retired]

    def _pinned(self, proc: ModelProcess) -> bool:
        return proc.spec.pin or self.config.single_model is not None

    def _bytes_short(self, proc: ModelProcess) -> int:
        """Bytes that must be freed before `proc` fits the budget (<= 0: it fits)."""
        memory = self.memory
        if memory is None:
            return 0
        return memory.used(self._all_procs()) + memory.footprint(proc) - memory.budget

    # ----------------------------------------------------------------- scheduling
    def _slots_free(self) -> int | None:
        limit = self.config.limits.models_max
        if limit <= 0:
            return None
        used = sum(1 for p in self.models.values() if p.holds_slot)
        used += sum(1 for p in self._retired if p.holds_slot)
        return limit - used

    def _schedule(self) -> None:
        # Starting or stopping a model changes state, which calls back here; run the pass
        # again afterwards instead of recursing into a half-updated queue.
        if self._scheduling:
            self._reschedule = True
            return
        self._scheduling = True
        try:
            self._reschedule = True
            while self._reschedule and not self.closing:
                self._reschedule = False
                self._schedule_once()
        finally:
            self._scheduling = False

    def _schedule_once(self) -> None:
        free = self._slots_free()
        needed = 0
        bytes_short = 0  # for the first entry blocked by the memory budget (FIFO)
        for entry in list(self._queue.values()):
            proc = self.models.get(entry.name)
            if proc is None:
                entry.started.set()  # vanished in a reload; waiters re-resolve and fail
                self._queue.pop(entry.name, None)
                continue
            if proc.state in (State.STARTING, State.READY, State.BACKOFF):
                entry.started.set()
                self._queue.pop(entry.name, None)
                continue
            if proc.state in (State.STOPPING, State.SHUTDOWN):
                continue  # its stop will trigger another pass
            short = self._bytes_short(proc)
            if (free is None or free > 0) and short <= 0 and not bytes_short:
                proc.start()
                if free is not None:
                    free -= 1
                entry.started.set()
                self._queue.pop(entry.name, None)
                continue
            needed += 1
            if short > 0 and not bytes_short:
                bytes_short = short
        if not needed:
            return
        stopping = [p for p in self._all_procs() if p.state == State.STOPPING]
        slot_deficit = 0 if free is None else needed - free - len(stopping)
        if self.memory is not None:
            bytes_short -= sum(self.memory.footprint(p) for p in stopping)
        for name in plan_evictions(self._candidates(), slot_deficit, max(bytes_short, 0)):
            log.info("[%s] evicting idle least recently used model for a queued request", name)
            self.evictions += 1
            self.models[name].stop("evicted")

    def _candidates(self) -> list[Candidate]:
        return [
            Candidate(
                name=p.name,
                last_used=p.last_used,
                ready=p.state == State.READY,
                busy=p.in_flight > 0,
                pinned=self._pinned(p),
                bytes=self.memory.footprint(p) if self.memory is not None else 0,
                wanted=p.waiters > 0 or p.name in self._queue,
            )
            for p in self.models.values()
        ]

    def _on_state(self, proc: ModelProcess, old: State, new: State) -> None:
        if self._observer is not None:
            self._observer(proc, old, new)
        if self._state_dir is not None:
            self._state_dir.record(self.models.values(), self._retired)
        old_api, new_api = api_status(old), api_status(new)
        if new == State.STARTING and old in (State.STOPPED, State.FAILED):
            self.events.publish("model_status", proc.name, {"status": "loading"})
        elif old_api != new_api:
            data: dict[str, object] = {"status": new_api}
            if new_api == "unloaded":
                data["exit_code"] = proc.exit_code if proc.exit_code is not None else 0
            if new == State.READY and proc.loaded_info:
                data["info"] = proc.loaded_info
            self.events.publish("status_change", proc.name, data)
        if new in (State.STOPPED, State.FAILED, State.SHUTDOWN):
            self._retired.discard(proc)
        self._schedule()

    # ----------------------------------------------------------------- management API
    async def load(self, name: str) -> ModelProcess:
        """POST /models/load: start now; evict the idle LRU model if the slots are full."""
        proc = self.find(name)
        if proc is None:
            # Upstream builds "model is not found", but its HTTP layer rewrites the body of
            # every 404 to this; clients see this text.
            raise NotFound("File Not Found")
        if self.closing:
            raise ShuttingDown("server is shutting down")
        if proc.state in (State.STARTING, State.READY, State.BACKOFF, State.STOPPING):
            raise InvalidRequest("model is already running")
        await self.check_fits(proc)
        # Evicting waits for the victims to exit, and others may start meanwhile: decide
        # again after every wait (bounded: each round stops at least one model or fails).
        for _ in range(len(self.models) + 1):
            if proc.state not in (State.STOPPED, State.FAILED):
                raise InvalidRequest("model is already running")
            free = self._slots_free()
            slot_deficit = 0 if free is None else 1 - free
            bytes_short = self._bytes_short(proc)
            if slot_deficit <= 0 and bytes_short <= 0:
                proc.reset_failed()
                proc.start()
                return proc
            victims = plan_evictions(self._candidates(), slot_deficit, max(bytes_short, 0))
            if not victims:
                raise LlamaRouterError("model limit reached, try again later")
            for victim in victims:
                self.evictions += 1
                self.models[victim].stop("evicted")
            await asyncio.gather(*(self.models[v].wait_stopped() for v in victims))
        raise LlamaRouterError("model limit reached, try again later")

    def unload(self, name: str) -> ModelProcess:
        proc = self.find(name)
        if proc is None:
            raise InvalidRequest("model is not found")
        if proc.state not in (State.STARTING, State.READY, State.BACKOFF):
            raise InvalidRequest("model is not running")
        proc.stop("unloaded")
        return proc

    async def reload(self) -> None:
        """Rescan every source; unload running models whose definition changed or vanished."""
        specs = self._discover()
        waits = []
        for name, proc in list(self.models.items()):
            new = specs.get(name)
            if new is not None and new == proc.spec:
                continue
            if proc.state in (State.STARTING, State.READY, State.BACKOFF, State.STOPPING):
                proc.stop("reload")
                waits.append(proc.wait_stopped())
            elif proc.state == State.FAILED:
                proc.reset_failed()  # a new definition deserves a new try
            if new is None:
                del self.models[name]
                if proc.holds_slot:
                    self._retired.add(proc)
        # The new definitions apply before we wait, so a request arriving meanwhile starts
        # the model as it is now defined, not as it was.
        self.apply_specs(specs)
        if waits:
            await asyncio.gather(*waits)
        self.events.publish("models_reload", "*")
        self._schedule()

    # ----------------------------------------------------------------- background
    async def _housekeeping(self) -> None:
        interval = self.config.timeouts.tick
        while True:
            await asyncio.sleep(interval)
            self.tick(time.monotonic())

    def tick(self, now: float) -> None:
        """Level-triggered upkeep: idle TTL unloads and the state-dir record."""
        if self.closing:
            return
        for proc in self.models.values():
            if proc.state == State.READY and proc.in_flight == 0 and proc.waiters == 0:
                ttl = proc.ttl
                idle_since = max(proc.last_used, proc.ready_at or 0.0)
                if ttl is not None and not proc.spec.pin and now - idle_since >= ttl:
                    log.info("[%s] idle for %.0fs (ttl %gs): unloading", proc.name, now - idle_since, ttl)
                    proc.stop("ttl")
        if self._state_dir is not None:
            self._state_dir.record(self.models.values(), self._retired)

    def begin_shutdown(self) -> None:
        """Refuse new work: queued requests and event streams end now, in-flight
        responses may finish (the caller bounds that with the shutdown grace)."""
        self.closing = True
        for entry in self._queue.values():
            entry.started.set()
        self._queue.clear()
        self.events.close()
        for proc in self.models.values():
            proc.close_log_listeners()

    def kill_all(self) -> None:
        """Forced exit (second signal): SIGKILL every child's process group now."""
        for proc in list(self.models.values()) + list(self._retired):
            proc.kill_now()

    async def shutdown(self) -> None:
        """Stop every child in parallel (each: SIGTERM, stop-timeout, SIGKILL, reap)."""
        self.begin_shutdown()
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick_task
        procs = list(self.models.values()) + list(self._retired)
        for proc in procs:
            proc.shutdown()
        await asyncio.gather(*(p.wait_stopped() for p in procs))
        for proc in procs:
            proc.shutdown()
        self.events.close()
        if self._state_dir is not None:
            self._state_dir.record((), ())


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"
