"""All models: the supervisor the web layer talks to.

It puts together the model table (models.py: which models exist, their owners, pins),
admission (admission.py: the waiting line, leases, usage) and the arbiter (arbiter.py:
the one loop that decides), and keeps what spans them: start, reload, unload, what a
model's transitions mean (events, the state-dir record, single-model exit) and shutdown.
Model state is changed only by each model's owner task (process.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence

from ..errors import (
    InvalidRequest,
    LlamaRouterError,
    NotFound,
    ShuttingDown,
)
from ..settings.config import ModelSpec, RouterConfig
from .admission import Admission, Lease, Usage
from .arbiter import Arbiter, Counters, SchedulingWatch
from .child import ChildParts
from .events import EventHub
from .gguf_info import Estimate
from .kvcache import KvCache
from .launcher import Launcher
from .memory import MemoryManager
from .models import ModelTable
from .probes import Probe
from .process import ModelProcess
from .statedir import StateDir
from .states import RUNNING_STATES, State, StopReason

log = logging.getLogger("llamarouter.supervisor")

Discover = Callable[[], dict[str, ModelSpec]]
ArgvBuilder = Callable[[ModelSpec, int], Sequence[str]]
StateObserver = Callable[[ModelProcess, State, State], None]
OptionsFor = Callable[[ModelSpec], dict[str, str]]


class _MemoryHooks:
    """The memory budget as a model's lives use it (process.MemoryHooks)."""

    def __init__(self, memory: MemoryManager) -> None:
        self._memory = memory

    @property
    def gpu(self) -> bool:
        return self._memory.probe.gpu

    def before_spawn(self, proc: ModelProcess) -> Awaitable[None]:
        # Placed on GPUs: each of its devices must show its share free (NVML's figures;
        # per-device budgets without NVML have no device to ask).
        placement = proc.placement if self.gpu else None
        return self._memory.wait_recovered(self._memory.footprint(proc), placement)

    def measure_device(self, proc: ModelProcess, pid: int) -> int | None:
        return self._memory.measure_device(proc, pid)


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
        self._observer = observer  # metrics: sees every transition, must not raise
        self._discover = discover
        self._launcher = launcher
        self._state_dir = state_dir
        self._options_for: OptionsFor = options_for or (lambda spec: dict(spec.options))
        self.memory = memory
        parts = ChildParts(launcher, probe, build_argv, kv_cache)
        hooks = _MemoryHooks(memory) if memory is not None else None
        self.table = ModelTable(
            config,
            lambda spec, replica: ModelProcess(
                spec, config, parts, self._on_state, demand=self, memory=hooks, replica=replica,
            ),
        )
        self.events = EventHub(config.limits.sse_queue)
        # Set when a model fails before it was ever ready in this run, with the reason:
        # single-model mode then exits, as llama-server does when its model cannot load.
        self.failed_before_ready = asyncio.Event()
        self.first_failure = ""
        self._been_ready: set[str] = set()
        self.closing = False
        self.admission = Admission(config, self, memory, self._options_for)
        self._waiters = self.admission.waiters
        self._usage = self.admission.usage
        self.arbiter = Arbiter(
            config, self.table, self.admission, memory, watch, self._record, lambda: self.closing,
        )
        self.started = False  # start() finished: /readyz reports ready from here on

    # ----------------------------------------------------------------- Demand (for processes)
    def in_flight(self, proc: ModelProcess) -> int:
        return self.admission.in_flight(proc)

    def wanted(self, name: str) -> bool:
        """Pinned, or requests wait for it: a failed load is retried, no canary is sent."""
        proc = self.table.models.get(name)
        return (proc is not None and self.table.pinned(proc)) or self._waiters.wants(name)

    def last_activity(self, name: str) -> float:
        return self._usage.get(name).last_activity

    def set_activity(self, name: str, when: float) -> None:
        self._usage.of(name).last_activity = when

    def usage(self, name: str) -> Usage:
        return self._usage.get(name)

    # ----------------------------------------------------------------- setup
    async def start(self) -> None:
        self.table.apply(self._discover())
        startup = [p for p in self.models.values() if p.spec.load_on_startup or self.pinned(p)]
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
            # Pinned ones are the scheduler's to keep loaded; the others are placed too.
            if not self.pinned(proc) and not self.arbiter.start_model(proc):
                log.warning("[%s] not started at startup: no room for it on the devices", proc.name)
        self.arbiter.start()
        self.started = True

    # ----------------------------------------------------------------- lookup
    @property
    def models(self) -> dict[str, ModelProcess]:
        return self.table.models

    @property
    def aliases(self) -> dict[str, str]:
        return self.table.aliases

    def resolve(self, name: str) -> ModelProcess:
        return self.table.resolve(name)

    def find(self, name: str) -> ModelProcess | None:
        return self.table.find(name)

    def visible(self) -> list[ModelProcess]:
        return self.table.visible()

    def all_processes(self) -> list[ModelProcess]:
        return self.table.all_processes()

    def pinned(self, proc: ModelProcess) -> bool:
        """Whether the model is kept loaded: its preset's `pin`, or a runtime pin."""
        return self.table.pinned(proc)

    def rss_of(self, proc: ModelProcess) -> int | None:
        """Resident memory of the model's child, if it runs (informational: shared pages and
        the mapped model file count too)."""
        child = proc.child
        return self._launcher.rss_bytes(child) if child is not None else None

    def queued_for(self, proc: ModelProcess) -> int:
        return self._waiters.requests_for(proc.name)

    def draining(self, proc: ModelProcess) -> bool:
        """Giving way to requests past --drain-after: its own new requests queue."""
        return proc in self.arbiter.drains

    @property
    def waiting(self) -> int:
        return self._waiters.requests

    @property
    def counters(self) -> Counters:
        return self.arbiter.counters

    @property
    def evictions(self) -> int:
        return self.counters.evictions

    def estimate_of(self, proc: ModelProcess) -> Estimate | None:
        return self.memory.estimate_of(proc) if self.memory is not None else None

    # ----------------------------------------------------------------- admission
    def touch(self, proc: ModelProcess) -> None:
        """Upstream stamps last_used on every POST it routes to a model, loads included."""
        self.admission.touch(proc)

    async def acquire(self, proc: ModelProcess, autoload: bool) -> Lease:
        """Wait until `proc` is READY and hold it busy: the caller must `release()` the lease.

        Raises ShuttingDown; InvalidRequest "model is not loaded" (autoload off);
        ModelFailed (503 + Retry-After) during a failed model's hold-off; StartAborted when
        the load it waited for was stopped; ModelNotFound when a reload removed the model;
        BudgetExceeded when it cannot fit; QueueFull/Unavailable past --max-queue/--max-wait.
        """
        return await self.admission.acquire(proc, autoload)

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
        await self.admission.wait(proc, load=True, autoload=True)
        return proc

    # ----------------------------------------------------------------- admission.Loop
    def kick(self) -> None:
        self.arbiter.kick.set()

    def decide_now(self, now: float) -> None:
        self.arbiter.decide(now)

    def grantable(self, proc: ModelProcess) -> bool:
        if not self.table.listed(proc):
            return False
        if proc.spec.replicas <= 1:
            # On the CPU budget, a request with others in line is the scheduler's to order.
            return self.serving(proc) and (
                self.arbiter.cpu.threads(proc) <= 0
                or (not self.admission.waiters and self.arbiter.cpu.free_now(proc, self.admission.busy, self._loading()))
            )
        # A model with replicas takes no more than its children's slots at once.
        return any(self.serving(p) and self.in_flight(p) < p.slots for p in self.table.replicas(proc))

    def _loading(self) -> list[ModelProcess]:
        return [p for p in self.table.all_processes() if p.expected_state == State.STARTING]

    def replicas(self, proc: ModelProcess) -> list[ModelProcess]:
        return self.table.replicas(proc)

    def serving(self, proc: ModelProcess) -> bool:
        return proc.expected_state == State.READY and proc not in self.arbiter.drains

    def waited(self, model: str, seconds: float) -> None:
        if self._watch is not None:
            self._watch.waited(model, seconds)

    def pin(self, name: str, on: bool) -> ModelProcess:
        """POST /models/pin: keep a model loaded (started now if a slot allows, never
        evicted, restarted after a crash or unload), or let it go back to normal. Lasts
        until the router stops; a reload keeps it."""
        proc = self.table.pin(name, on)
        if proc is None:
            raise InvalidRequest("model is not found")
        self.kick()
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
            self.arbiter.drains.discard(proc)
        if new == State.READY:
            self._been_ready.add(proc.name)
            self.arbiter.costs.loaded(proc)
        elif new == State.FAILED and proc.name not in self._been_ready and not self.failed_before_ready.is_set():
            self.first_failure = f"model name={proc.name}: {proc.failure or 'failed'}"
            self.failed_before_ready.set()
        if self.arbiter.placing is not None:
            self.arbiter.placing.changed(proc, new)
        if self.table.listed(proc) and not proc.replica:
            # The model's status is its first child's: an extra replica coming and going
            # is no change of the model's (GET /models lists each replica).
            self.events.transition(proc, old, new)
        if new in (State.STOPPED, State.FAILED, State.SHUTDOWN) and self.table.finished(proc):
            self._forget(proc)
        self.kick()

    def _forget(self, proc: ModelProcess) -> None:
        """A model left the table: its scheduling bookkeeping goes too."""
        self.arbiter.forget(proc)
        self.admission.forget(proc)

    # ----------------------------------------------------------------- management API
    def unload(self, name: str) -> ModelProcess:
        proc = self.find(name)
        if proc is None:
            raise InvalidRequest("model is not found")
        running = [p for p in self.table.replicas(proc) if p.expected_state in RUNNING_STATES]
        if not running:
            raise InvalidRequest("model is not running")
        for child in running:
            child.stop(StopReason.UNLOADED)
        return proc

    def unload_all(self) -> list[str]:
        """Stop every running model that is not pinned; their names."""
        names = []
        for proc in list(self.models.values()):
            # What the model's owner will do, not what it did: one with a stop already on
            # its way (an eviction, a TTL in the same pass) is not running any more, and
            # unload() would refuse it half-way through the list.
            if self.pinned(proc) or all(p.expected_state not in RUNNING_STATES for p in self.table.replicas(proc)):
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
            # Requests in flight finish on the old definition; it stops once idle (and
            # keeps its slot until then, so the new one waits for room).
            for closed in self.table.unlist(name, busy=lambda p: self.in_flight(p) > 0):
                self._forget(closed)
            if new is None:
                self._usage.forget(name)
        self.table.apply(specs)
        self.events.publish("models_reload", "*")
        self.kick()

    # ----------------------------------------------------------------- shutdown
    def begin_shutdown(self) -> None:
        """Refuse new work: queued requests and event streams end now, in-flight
        responses may finish (the caller bounds that with the shutdown grace)."""
        if self.closing:
            return
        self.closing = True
        self._waiters.fail_all(lambda: ShuttingDown("server is shutting down"))
        self.events.close()
        for proc in self.all_processes():
            proc.logs.close()
        self.kick()

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
        await self.table.end_owners(self.config.timeouts.reap)
        await self.arbiter.stop(self.config.timeouts.reap)
        self.events.close()
        if self._state_dir is not None:
            with contextlib.suppress(OSError):
                self._state_dir.record(())
