"""One supervised llama-server child, owned by one task.

`ModelProcess` is an actor (llama-swap's single-writer `run()`): its owner task reads
messages from one inbox and is the only code that changes the model's state. Callers send
commands (`start`, `stop`, `shutdown`) that return at once with a future; the slow parts of
a child's life (spawn, load, liveness, terminate, reap) run in a side task, the *life*,
which never changes state: it reports what happened (`_Loaded`, `_Exited`) to the inbox.
Messages from an older life carry an older generation number and are ignored, so a late
report can never move a newer life's state.

Handlers of messages never await: a decision and its effect happen in one step. Every
await in a life is bounded by a named setting (`Timeouts`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..errors import ShuttingDown
from ..settings.config import ModelSpec, RouterConfig
from .canary import canary_due
from .failure import classify
from .gguf_info import parse_buffer_line
from .kvcache import SAVE_ON_STOP
from .launcher import Child, Launcher
from .logring import LogRing
from .probes import Probe
from .reqhealth import RequestHealth
from .sleep import sleeping_from_log
from .states import SLOT_STATES, State, api_status, check_transition
from .watch import FileIdentity, file_identity

if TYPE_CHECKING:
    from .kvcache import KvCache

log = logging.getLogger("llamarouter.process")
child_log = logging.getLogger("llamarouter.child")

# llama-server prints these once the HTTP server answers; seeing one makes us probe
# /health at once instead of waiting for the next poll tick.
_READY_HINTS = (
    b"listening on http",  # this build: "llama_server: listening on http://H:P"
    b"server is listening on",  # older builds: "main: server is listening on http://H:P - ..."
    b": model loaded",
    b"all slots are idle",
)
# A lost port race (another process bound it between our probe and the child's bind).
_BIND_FAILURE = re.compile(rb"couldn't bind|address already in use|Address already in use")

T = TypeVar("T")
StateListener = Callable[["ModelProcess", State, State], None]
ArgvBuilder = Callable[[ModelSpec, int], Sequence[str]]


class Demand(Protocol):
    """What the supervisor knows about a model's requests (the process only reads it)."""

    def in_flight(self, proc: ModelProcess) -> int: ...

    def wanted(self, name: str) -> bool: ...

    def last_activity(self, name: str) -> float: ...

    def set_activity(self, name: str, when: float) -> None: ...


class _NoDemand:
    def in_flight(self, proc: ModelProcess) -> int:
        return 0

    def wanted(self, name: str) -> bool:
        return False

    def last_activity(self, name: str) -> float:
        return 0.0

    def set_activity(self, name: str, when: float) -> None:
        pass


class _Cmd(enum.Enum):
    START = "start"
    STOP = "stop"
    SHUTDOWN = "shutdown"
    CLOSE = "close"  # the owner task ends (the model left the supervisor)


@dataclass
class _Command:
    cmd: _Cmd
    reason: str = ""
    fut: asyncio.Future[None] | None = None


@dataclass
class _Loaded:
    gen: int
    info: dict[str, Any]
    device_bytes: int | None = None


@dataclass
class _Exited:
    gen: int
    code: int | None = None
    asked: bool = False  # it exited because we stopped it
    bind_failed: bool = False
    loaded: bool = False  # it reached READY in this life
    cause: str | None = None
    sick: bool = False  # killed because its live requests kept failing


@dataclass
class _BackoffDone:
    gen: int


@dataclass
class _Remeasure:
    gen: int


_Message = _Command | _Loaded | _Exited | _BackoffDone | _Remeasure


@dataclass
class _Life:
    """What the owner keeps of the current attempt: its task and how to stop it."""

    gen: int
    requests: RequestHealth
    task: asyncio.Task[None] | None = None
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    kill_at_once: bool = False
    # Set once its live requests failed past the limit: the life kills the child and the
    # exit is handled as a crash; until then the model routes nothing new (expected_state).
    sick: asyncio.Event = field(default_factory=asyncio.Event)
    sick_cause: str | None = None


class ModelProcess:
    def __init__(
        self,
        spec: ModelSpec,
        config: RouterConfig,
        launcher: Launcher,
        probe: Probe,
        build_argv: ArgvBuilder,
        on_state: StateListener,
        demand: Demand | None = None,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self._config = config
        self._launcher = launcher
        self._probe = probe
        self._build_argv = build_argv
        self._on_state = on_state
        self._demand: Demand = demand or _NoDemand()

        self.state = State.STOPPED
        self.state_changed_at = time.monotonic()
        self.port: int | None = None
        self.child: Child | None = None
        self.argv: list[str] = []
        self.exit_code: int | None = None
        self.crashed = False  # last exit was not asked for (upstream's failed: true)
        self.failure: str | None = None  # why FAILED / why the last load failed
        self.stop_reason: str | None = None
        self.restarts = 0
        self.crash_times: collections.deque[float] = collections.deque()
        self.loaded_info: dict[str, Any] = {}
        self.logs = LogRing(config.limits.log_lines, config.limits.log_lines)
        self.load_started_at: float | None = None
        self.ready_at: float | None = None
        self.ever_ready = False  # this life reached READY (STOPPING shows "loaded" only then)
        # The model file as the last child was spawned on it: a reload that finds it
        # changed gives a failed model another try at once (Supervisor.reload).
        self.spawned_file: FileIdentity | None = None
        # The last unasked exit was a kill because live requests kept failing (reqhealth.py).
        self.sick_exit = False
        # Buffer sizes the child reported while loading, by (device, kind).
        self.measured: dict[tuple[str, str], int] = {}
        # VRAM of the child from NVML, once ready and after its first request (GPU hosts
        # with a memory budget only);
        # kept after it exits as the best guess of what its next start needs.
        self.device_bytes: int | None = None
        self.measure_device: Callable[[int], int | None] | None = None
        # Generation whose VRAM was measured again after its first request (a GPU child
        # allocates library workspaces then: about 100 MiB more on an H200).
        self._remeasured_gen = -1
        # Awaited (bounded by the memory manager) before each spawn: freed VRAM shows up late.
        self.before_spawn: Callable[[], Awaitable[None]] | None = None
        # Keep-cache (handed over by the app when the model starts): slot caches are saved
        # before an idle model is stopped and restored before it is granted requests.
        self.kv_cache: KvCache | None = None
        self._last_canary = 0.0

        self._inbox: asyncio.Queue[_Message] = asyncio.Queue()
        self._owner: asyncio.Task[None] | None = None
        self._life: _Life | None = None
        self._gen = 0
        self._backoff_delay = config.timeouts.backoff_initial
        self._backoff_timer: asyncio.TimerHandle | None = None
        self._bind_retries = 0
        self._start_after_stop = False
        self._shutting_down = False
        # Commands sent but not handled yet: the scheduler counts them as done already, so
        # two passes in a row never start (or evict) the same model twice.
        self._pending: collections.deque[_Cmd] = collections.deque()
        self._shut = asyncio.Event()  # reached SHUTDOWN: nothing runs and nothing will
        self._changed = asyncio.Event()  # set and replaced on every state change
        self._probe_now = asyncio.Event()
        self._hinted_at = float("-inf")
        self._last_progress = 0.0

    # ----------------------------------------------------------------- queries
    @property
    def holds_slot(self) -> bool:
        return self.expected_state in SLOT_STATES

    @property
    def expected_state(self) -> State:
        """The state once the commands already sent are handled (what scheduling uses)."""
        state = self.state
        life = self._life
        if state == State.READY and life is not None and life.sick_cause is not None:
            state = State.BACKOFF  # its exit, already on its way, will be handled as a crash
        for cmd in self._pending:
            if cmd == _Cmd.START and state in (State.STOPPED, State.FAILED):
                state = State.STARTING
            elif cmd != _Cmd.START and state in (State.STARTING, State.READY, State.BACKOFF):
                state = State.STOPPING
        return state

    @property
    def api_status(self) -> str:
        """The upstream status word (states.api_status)."""
        return api_status(self.state, self.ever_ready)

    @property
    def in_flight(self) -> int:
        return self._demand.in_flight(self)

    @property
    def last_activity(self) -> float:
        return self._demand.last_activity(self.name)

    @last_activity.setter
    def last_activity(self, when: float) -> None:
        # The relay stamps this when a response starts: a liveness hint kept by the supervisor.
        self._demand.set_activity(self.name, when)

    @property
    def stop_timeout(self) -> float:
        return (
            self.spec.stop_timeout
            if self.spec.stop_timeout is not None
            else self._config.timeouts.stop
        )

    @property
    def ttl(self) -> float | None:
        return self.spec.ttl if self.spec.ttl is not None else self._config.limits.ttl

    @property
    def measured_bytes(self) -> int | None:
        return sum(self.measured.values()) if self.measured else None

    @property
    def stop_bound(self) -> float:
        """The longest a stop can take: SIGTERM, stop-timeout, SIGKILL, reap, drain."""
        t = self._config.timeouts
        return self.stop_timeout + t.reap + t.drain + t.spawn

    def file_repaired(self) -> bool:
        """FAILED, and its model file is not the one its last child was spawned on (size,
        mtime or inode changed): the hold-off was about a file that is gone."""
        path = self.spec.model_path
        return (
            self.state == State.FAILED and path is not None and self.spawned_file is not None
            and file_identity(path) != self.spawned_file
        )

    def log_tail(self, n: int) -> list[str]:
        return self.logs.tail(n)

    def failure_message(self) -> str:
        detail = self.failure or "unknown error"
        return f"model name={self.name} failed to load: {detail}"

    # ----------------------------------------------------------------- commands
    def open(self) -> asyncio.Task[None]:
        """Start the owner task (once). The supervisor keeps and observes it."""
        if self._owner is None:
            self._owner = asyncio.create_task(self._own(), name=f"owner:{self.name}")
        return self._owner

    def start(self) -> asyncio.Future[None]:
        """Load the model. STOPPED/FAILED: start; STARTING/READY/BACKOFF: nothing to do;
        STOPPING: start again once stopped; SHUTDOWN: fails with ShuttingDown."""
        return self._send(_Command(_Cmd.START))

    def stop(self, reason: str) -> asyncio.Future[None]:
        """Unload. STARTING: the load is cancelled (the child killed at once); READY:
        SIGTERM, stop-timeout, SIGKILL, reap; BACKOFF/FAILED: to STOPPED. The future
        resolves when the command is handled, not when the child has been reaped."""
        return self._send(_Command(_Cmd.STOP, reason))

    def shutdown(self) -> asyncio.Future[None]:
        """Final stop for router exit: afterwards the model never starts again."""
        return self._send(_Command(_Cmd.SHUTDOWN, "shutdown"))

    def close(self) -> asyncio.Future[None]:
        """End the owner task; only for a model that is stopped and no longer listed."""
        return self._send(_Command(_Cmd.CLOSE))

    def served(self) -> None:
        """A request finished: the first one of a life has the child's VRAM measured again."""
        if self.measure_device is not None and self._remeasured_gen != self._gen and self.state == State.READY:
            self._remeasured_gen = self._gen
            self._post(_Remeasure(self._gen))

    def note_request(self, port: int | None, fault: str | None) -> None:
        """A live request to the child on `port` ended; `fault` says how the child failed
        it (reqhealth.py), None that it answered. Past the limit the child is taken out of
        routing at once and its life kills it; the exit then counts as a crash (backoff,
        or `failed` once the restart budget is used up). A report about an earlier child,
        or while the model is not READY (a stop cuts requests short), is ignored."""
        life = self._life
        if (
            life is None or port is None or port != self.port or self.state != State.READY
            or life.sick_cause is not None
        ):
            return
        cause = life.requests.note(time.monotonic(), fault)
        if cause is None:
            return
        life.sick_cause = cause
        log.error("[%s] %s", self.name, cause)
        life.sick.set()

    async def wait_shutdown(self, timeout: float) -> bool:
        """True once SHUTDOWN (every command sent before `shutdown()` handled, the child
        reaped); False after timeout."""
        try:
            async with asyncio.timeout(timeout):
                await self._shut.wait()
            return True
        except TimeoutError:
            return False

    async def wait_changed_from(self, port: int | None, timeout: float) -> None:
        """Return once the model is no longer READY on `port` (it crashed, restarted or
        stopped), or after `timeout`."""
        if self.state != State.READY or self.port != port:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def kill_now(self) -> None:
        """Forced exit: SIGKILL the child's group. Not a state change: the life still
        reaps it and reports the exit."""
        child = self.child
        if child is not None and child.returncode is None:
            self._launcher.kill(child)

    def _send(self, command: _Command) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        command.fut = fut
        if command.cmd in (_Cmd.START, _Cmd.STOP, _Cmd.SHUTDOWN):
            self._pending.append(command.cmd)
        self._inbox.put_nowait(command)
        return fut

    def _post(self, msg: _Message) -> None:
        self._inbox.put_nowait(msg)

    # ----------------------------------------------------------------- the owner
    async def _own(self) -> None:
        try:
            await self._own_messages()
        finally:
            life = self._life
            if life is not None and life.task is not None and not life.task.done():
                # Router teardown: the life kills and reaps its child on cancellation.
                life.task.cancel()

    async def _own_messages(self) -> None:
        while True:
            msg = await self._inbox.get()
            try:
                done = self._handle(msg)
            except Exception as exc:  # a bug of ours: never leave the model undefined
                log.exception("[%s] internal error handling %s", self.name, type(msg).__name__)
                self._recover(exc)
                done = False
            if isinstance(msg, _Command):
                if self._pending and msg.cmd != _Cmd.CLOSE:
                    self._pending.popleft()
                if msg.fut is not None and not msg.fut.done():
                    if msg.cmd == _Cmd.START and self.state == State.SHUTDOWN:
                        msg.fut.set_exception(ShuttingDown("server is shutting down"))
                        msg.fut.exception()
                    else:
                        msg.fut.set_result(None)
            if done:
                return

    def _recover(self, exc: BaseException) -> None:
        """After an unexpected error: stop what runs and settle in FAILED or STOPPED."""
        self.failure = f"internal error: {type(exc).__name__}: {exc}"
        life = self._life
        if life is not None:
            life.kill_at_once = True
            life.stop.set()
            if self.state in (State.STARTING, State.READY, State.BACKOFF):
                self._set_state(State.STOPPING)
            return
        if self.state in (State.STARTING, State.READY, State.BACKOFF):
            self._set_state(State.FAILED)

    def _handle(self, msg: _Message) -> bool:
        """Handle one message; never awaits. Returns True when the owner should end."""
        if isinstance(msg, _Command):
            return self._on_command(msg)
        if isinstance(msg, _Loaded):
            if msg.gen == self._gen and self.state == State.STARTING:
                self.loaded_info = msg.info
                if msg.device_bytes:
                    self.device_bytes = msg.device_bytes
                self.ready_at = time.monotonic()
                self.ever_ready = True
                self._bind_retries = 0
                self._set_state(State.READY)
                log.info(
                    "[%s] ready on port %s in %.2fs", self.name, self.port,
                    self.ready_at - (self.load_started_at or self.ready_at),
                )
            # Otherwise a stop got there first: the life is already being told to end.
        elif isinstance(msg, _Exited) and msg.gen == self._gen:
            self._on_exit(msg)
        elif isinstance(msg, _Remeasure) and msg.gen == self._gen and self.state == State.READY:
            child, measure = self.child, self.measure_device
            if child is not None and measure is not None:
                # Synchronous: NVML lists the GPU's processes, well under a millisecond, and
                # the probe gives up after --device-probe-timeout on a driver that hangs.
                self.device_bytes = max(self.device_bytes or 0, measure(child.pid) or 0) or None
        elif isinstance(msg, _BackoffDone) and msg.gen == self._gen and self.state == State.BACKOFF:
            self._backoff_timer = None
            self.restarts += 1
            self._set_state(State.STARTING)
            self._begin_life()
        return False

    def _on_command(self, msg: _Command) -> bool:
        state = self.state
        if msg.cmd == _Cmd.START:
            if state in (State.STOPPED, State.FAILED):
                if state == State.FAILED:
                    self.crash_times.clear()  # an explicit retry gets a fresh crash budget
                self._begin(State.STARTING)
            elif state == State.STOPPING:
                self._start_after_stop = True
        elif msg.cmd in (_Cmd.STOP, _Cmd.SHUTDOWN):
            if msg.cmd == _Cmd.SHUTDOWN:
                self._shutting_down = True
                self._start_after_stop = False
            elif state == State.STOPPING:
                self._start_after_stop = False  # a later stop wins over an earlier start
            self._stop(msg.reason)
            if self._shutting_down and self.state in (State.STOPPED, State.FAILED):
                self._set_state(State.SHUTDOWN)
        elif msg.cmd == _Cmd.CLOSE:
            if self._life is None and self.state in (State.STOPPED, State.FAILED, State.SHUTDOWN):
                self.logs.close()
                return True
            log.warning("[%s] close refused in state %s", self.name, self.state)
        return False

    def _begin(self, state: State) -> None:
        self.failure = None
        self.stop_reason = None
        self.crashed = False
        self._bind_retries = 0
        self._backoff_delay = self._config.timeouts.backoff_initial
        self._set_state(state)
        self._begin_life()

    def _stop(self, reason: str) -> None:
        state = self.state
        if state == State.FAILED:
            self._set_state(State.STOPPED)
        elif state == State.BACKOFF:
            if self._backoff_timer is not None:
                self._backoff_timer.cancel()
                self._backoff_timer = None
            self._gen += 1  # a timer that already fired is stale now
            self.stop_reason = reason
            self._set_state(State.STOPPED)
        elif state in (State.STARTING, State.READY):
            self.stop_reason = reason
            life = self._life
            self._set_state(State.STOPPING)
            if life is not None:
                # A child still loading cannot serve and llama-server does not act on
                # SIGTERM until its load ends: kill it at once, as upstream does.
                life.kill_at_once = state == State.STARTING
                life.stop.set()

    def _begin_life(self) -> None:
        self._gen += 1
        limits = self._config.limits
        life = _Life(self._gen, RequestHealth(limits.request_failures, limits.request_failure_window))
        self._life = life
        life.task = asyncio.create_task(self._live(life), name=f"life:{self.name}:{life.gen}")
        life.task.add_done_callback(self._life_done)

    def _life_done(self, task: asyncio.Task[None]) -> None:
        # A life catches its own errors and reports them; anything else is a bug to see.
        if not task.cancelled() and task.exception() is not None:
            log.error("[%s] %s ended with an error", self.name, task.get_name(), exc_info=task.exception())

    def _on_exit(self, ex: _Exited) -> None:
        self._life = None
        self.child = None
        self.port = None
        self.exit_code = ex.code
        state = self.state
        if state == State.STOPPING or ex.asked:
            self.crashed = False
            if state in (State.STARTING, State.READY, State.BACKOFF):
                self._set_state(State.STOPPING)  # asked to stop by recovery: pass through
            if self._shutting_down:
                self._set_state(State.SHUTDOWN)
                return
            self._set_state(State.STOPPED)
            if self._start_after_stop:
                self._start_after_stop = False
                self._begin(State.STARTING)
            return
        if ex.bind_failed and state == State.STARTING:
            self._bind_retries += 1
            if self._bind_retries <= self._config.limits.bind_retries:
                log.warning("[%s] port taken before the child bound it; retrying", self.name)
                self._begin_life()
                return
            ex.cause = "could not bind a port for the child"
        now = time.monotonic()
        limits = self._config.limits
        self.crashed = True
        self.failure = ex.cause or "child exited"
        self.sick_exit = ex.sick
        found = classify(self.logs.tail(limits.log_lines)) if not ex.loaded else None
        if found is not None and found.cause:
            # The child's own words ("invalid magic characters", "No such file") say why.
            self.failure = f"{self.failure}; cause: {found.cause}"
        if found is not None and found.permanent:
            # A file that cannot load at all is not retried as if it had crashed.
            log.error("[%s] the model cannot load: %s", self.name, self.failure)
            self._set_state(State.FAILED)
            return
        self.crash_times.append(now)
        while self.crash_times and now - self.crash_times[0] > limits.restart_window:
            self.crash_times.popleft()
        log.warning("[%s] %s", self.name, self.failure)
        if len(self.crash_times) >= limits.restart_max:
            log.error(
                "[%s] giving up after %d failures in %.0fs: %s",
                self.name, len(self.crash_times), limits.restart_window, self.failure,
            )
            self._set_state(State.FAILED)
            return
        # A model that was serving is replaced (users expect a loaded model to stay
        # loaded); one that failed while loading is retried only while wanted.
        if not (ex.loaded or self.spec.pin or self._demand.wanted(self.name)):
            self._set_state(State.STOPPED)
            return
        if ex.loaded:
            # It served for a while: a fresh crash budget for the backoff too.
            self._backoff_delay = self._config.timeouts.backoff_initial
        delay = self._backoff_delay
        self._backoff_delay = min(delay * 2, self._config.timeouts.backoff_max)
        self._set_state(State.BACKOFF)
        log.warning("[%s] restarting in %.2fs", self.name, delay)
        gen = self._gen
        self._backoff_timer = asyncio.get_running_loop().call_later(
            delay, self._post, _BackoffDone(gen)
        )

    def _set_state(self, new: State) -> None:
        old = self.state
        if old == new:
            return
        check_transition(old, new)
        self.state = new
        self.state_changed_at = time.monotonic()
        if new == State.STARTING:
            self.ever_ready = False
        elif new == State.SHUTDOWN:
            self._shut.set()
        self._changed.set()
        self._changed = asyncio.Event()
        log.info("[%s] %s -> %s", self.name, old, new)
        try:
            self._on_state(self, old, new)
        except Exception:  # the listener is the supervisor's; it must not break the owner
            log.exception("[%s] state listener failed on %s -> %s", self.name, old, new)

    # ----------------------------------------------------------------- one life
    async def _live(self, life: _Life) -> None:
        """Spawn, load, watch, terminate, reap; always report the exit to the owner."""
        result = _Exited(life.gen)
        child: Child | None = None
        reader: asyncio.Task[None] | None = None
        exit_wait: asyncio.Task[int] | None = None
        timeouts = self._config.timeouts
        try:
            if not await self._before_spawn(life):
                result.asked = True
                return
            port = self._launcher.free_port("127.0.0.1")
            self.argv = list(self._build_argv(self.spec, port))
            self.spawned_file = file_identity(self.spec.model_path)
            self.measured = {}
            self.load_started_at = self._last_progress = time.monotonic()
            self._note(f"[llamarouter] starting: {' '.join(self.argv)}")
            try:
                async with asyncio.timeout(timeouts.spawn):
                    child = await self._launcher.spawn(self.argv, dict(self._config.child_env))
            except (OSError, TimeoutError) as exc:
                result.cause = f"could not start {self.argv[0] if self.argv else '?'}: {exc}"
                self._note(f"[llamarouter] {result.cause}")
                return
            self.child = child
            self.port = port
            reader = asyncio.create_task(self._read_output(child, result), name=f"logs:{self.name}")
            exit_wait = asyncio.create_task(child.wait(), name=f"exit:{self.name}")
            loaded = await self._wait_loaded(life, exit_wait, port, result)
            if loaded:
                info = await self._probe.info(port, timeouts.info)
                kv = self.kv_cache
                if kv is not None:
                    # Saved slots go back before any request is granted; bounded by the
                    # keep-cache timeout, never raises, and a stop does not wait for it.
                    await _unless_stopped(kv.restore_after_ready(self.name, port), life.stop, timeouts.settle_cancelled)
                result.loaded = True
                # One synchronous NVML call per load, well under a millisecond; bounded by
                # --device-probe-timeout should the driver hang.
                device = self.measure_device(child.pid) if self.measure_device is not None else None
                self._post(_Loaded(life.gen, info, device))
                await self._watch(life, exit_wait, port, result)
            if life.stop.is_set():
                result.asked = True
                kv = self.kv_cache
                if (
                    kv is not None and loaded and not life.kill_at_once
                    and self.stop_reason in SAVE_ON_STOP and not exit_wait.done()
                ):
                    # An idle model stopped for eviction, TTL or unload keeps its slot
                    # caches on disk (bounded per slot by the keep-cache timeout).
                    await kv.save_before_stop(self.name, port)
                await self._terminate(child, exit_wait, kill=life.kill_at_once or not loaded)
            elif not exit_wait.done():
                # Stalled load or failed liveness: the child is alive but useless.
                self._launcher.kill(child)
                await self._reap(exit_wait)
        except Exception as exc:
            log.exception("[%s] internal error in the child's life", self.name)
            result.cause = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            if child is not None and child.returncode is None:
                # Cancelled (router teardown) or broken: never leave a process behind.
                self._launcher.kill(child)
                if exit_wait is not None:
                    with contextlib.suppress(BaseException):
                        await self._reap(exit_wait)
            if reader is not None:
                if child is not None:
                    child.release_output()  # the exit is known: its last lines are wanted now
                with contextlib.suppress(BaseException):
                    await self._drain(reader)
            if child is not None:
                child.close_output()
            if exit_wait is not None:
                if exit_wait.done() and not exit_wait.cancelled() and exit_wait.exception() is None:
                    result.code = exit_wait.result()
                exit_wait.cancel()
            if result.cause is None and not result.asked and result.code is not None:
                result.cause = self._exit_text(result.code)
            self._post(result)

    async def _before_spawn(self, life: _Life) -> bool:
        """Upstream's fake-timing sleep and the wait for freed memory; False when stopped."""
        waits: list[Awaitable[object]] = []
        if self._config.fake_timing:  # off in -m/-hf mode (cli.py), as upstream
            # Upstream's LLAMA_SERVER_DEBUG_FAKE_TIMING sleeps before every load.
            waits.append(asyncio.sleep(self._config.fake_timing_secs))
        if self.before_spawn is not None:
            waits.append(self.before_spawn())
        for aw in waits:
            if not await _unless_stopped(aw, life.stop, self._config.timeouts.settle_cancelled):
                return False
        return not life.stop.is_set()

    async def _wait_loaded(
        self, life: _Life, exit_wait: asyncio.Task[int], port: int, result: _Exited
    ) -> bool:
        """True when /health says ready; False when the child exited, stalled or was stopped."""
        timeouts = self._config.timeouts
        stop_wait = asyncio.create_task(life.stop.wait())
        try:
            while True:
                if exit_wait.done() or life.stop.is_set():
                    return False
                # Stopped or exited while a probe hangs: do not wait for it to time out.
                probe = await _first(
                    self._probe.health(port, timeouts.ready_poll * 20 + 1.0), exit_wait, stop_wait,
                    settle=timeouts.settle_cancelled,
                )
                if probe is None:
                    return False
                status = probe.result()
                if status == 200:
                    return True
                now = time.monotonic()
                if status == 503:
                    self._last_progress = now  # alive, still loading
                if now - self._last_progress > timeouts.load_stall:
                    result.cause = (
                        f"load stalled: no output and no answer for {timeouts.load_stall:g}s; killed"
                    )
                    return False
                # A readiness line comes just before the child accepts connections: right
                # after one, probe at a fast pace instead of waiting a whole poll interval.
                hinted = now - self._hinted_at < timeouts.hint_window
                interval = timeouts.hint_poll if hinted else timeouts.ready_poll
                self._probe_now.clear()
                probe_wait = asyncio.create_task(self._probe_now.wait())
                try:
                    await asyncio.wait(
                        {exit_wait, stop_wait, probe_wait},
                        timeout=interval,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    probe_wait.cancel()
        finally:
            stop_wait.cancel()

    async def _watch(
        self, life: _Life, exit_wait: asyncio.Task[int], port: int, result: _Exited
    ) -> None:
        """While READY: return on exit, on stop, or when liveness fails."""
        timeouts = self._config.timeouts
        misses = canary_misses = 0
        stop_wait = asyncio.create_task(life.stop.wait())
        # Failed live requests end the watch like a stop does, but the exit is a crash.
        sick_wait = asyncio.create_task(life.sick.wait())
        try:
            while True:
                done, _ = await asyncio.wait(
                    {exit_wait, stop_wait, sick_wait},
                    timeout=timeouts.health_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if done:
                    return
                probe = await _first(
                    self._probe.health(port, timeouts.health_timeout), exit_wait, stop_wait, sick_wait,
                    settle=timeouts.settle_cancelled,
                )
                if probe is None:
                    return
                healthy = probe.result() == 200
                if healthy and self._canary_due():
                    # /health says nothing about inference: an idle, awake model also gets a
                    # one-token completion now and then. Failed canaries are counted on their
                    # own (the /health probes between them pass) against the same limit.
                    self._last_canary = time.monotonic()
                    canary = await _first(
                        self._probe.canary(port, timeouts.canary_timeout), exit_wait, stop_wait, sick_wait,
                        settle=timeouts.settle_cancelled,
                    )
                    if canary is None:
                        return
                    if canary.result():
                        canary_misses = 0
                    else:
                        canary_misses += 1
                        log.warning(
                            "[%s] canary completion failed (%d/%d)",
                            self.name, canary_misses, timeouts.health_failures,
                        )
                        if canary_misses >= timeouts.health_failures:
                            result.cause = (
                                f"child failed its canary completion {canary_misses} times "
                                f"in a row (limit {timeouts.canary_timeout:g}s each); killed"
                            )
                            return
                if healthy:
                    misses = 0
                    continue
                if exit_wait.done() or life.stop.is_set():
                    return
                # A busy child may queue /health behind its HTTP workers; responses that are
                # still starting or finishing show it is alive.
                recent = time.monotonic() - self.last_activity < timeouts.health_interval
                if self.in_flight > 0 and recent:
                    continue
                misses += 1
                log.warning(
                    "[%s] liveness probe failed (%d/%d)", self.name, misses, timeouts.health_failures
                )
                if misses >= timeouts.health_failures:
                    result.cause = (
                        f"child stopped answering /health ({misses} probes of "
                        f"{timeouts.health_timeout:g}s failed); killed"
                    )
                    return
        finally:
            stop_wait.cancel()
            sick_wait.cancel()
            if life.sick.is_set() and not life.stop.is_set() and not exit_wait.done():
                # Whatever else ended the watch, the child is killed for its requests.
                result.cause = life.sick_cause
                result.sick = True

    def _canary_due(self) -> bool:
        return canary_due(
            self._config, self.spec, now=time.monotonic(), last_canary=self._last_canary,
            last_activity=max(self.last_activity, self.ready_at or 0.0),
            busy=self.in_flight > 0 or self._demand.wanted(self.name),
            sleeping=sleeping_from_log(self.logs),
        )

    async def _terminate(self, child: Child, exit_wait: asyncio.Task[int], kill: bool) -> None:
        """SIGTERM the group (SIGKILL for a loading child), wait stop-timeout, SIGKILL,
        reap (bounded)."""
        if kill:
            self._launcher.kill(child)
        else:
            self._launcher.terminate(child)
            try:
                await asyncio.wait_for(asyncio.shield(exit_wait), self.stop_timeout)
                return
            except TimeoutError:
                log.warning("[%s] did not exit within %.1fs; killing", self.name, self.stop_timeout)
                self._launcher.kill(child)
        await self._reap(exit_wait)

    async def _reap(self, exit_wait: asyncio.Task[int]) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(exit_wait), self._config.timeouts.reap)
        except TimeoutError:
            # SIGKILLed and still not reaped (uninterruptible sleep in a driver): report it
            # and move on; the state-dir record lets the next start reap it.
            log.error("[%s] child not reaped %.1fs after SIGKILL", self.name, self._config.timeouts.reap)

    async def _drain(self, reader: asyncio.Task[None]) -> None:
        # The pipe closes when the whole process group is gone; a grandchild holding it open
        # must not keep us here.
        try:
            await asyncio.wait_for(asyncio.shield(reader), self._config.timeouts.drain)
        except TimeoutError:
            reader.cancel()

    def _exit_text(self, code: int) -> str:
        what = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        tail = " | ".join(self.log_tail(3))
        return f"child {what}" + (f"; last output: {tail}" if tail else "")

    async def _read_output(self, child: Child, result: _Exited) -> None:
        hold = self._config.timeouts.output_hold
        while True:
            lines = await child.read_lines()
            if not lines:
                return
            self._last_progress = time.monotonic()
            for line in lines:
                if self.state == State.STARTING:
                    if any(hint in line for hint in _READY_HINTS):
                        self._hinted_at = time.monotonic()
                        self._probe_now.set()
                    elif _BIND_FAILURE.search(line):
                        result.bind_failed = True
                    elif b"buffer size" in line:
                        found = parse_buffer_line(line.decode("utf-8", "replace"))
                        if found is not None:
                            self.measured[(found[0], found[1])] = found[2]
                self._note(line.rstrip(b"\r").decode("utf-8", "replace"))
            if self.state != State.STARTING:
                # Loading lines are read at once (readiness hints, progress); after that
                # they wait in the pipe between reads: a wakeup per line competed with
                # request intake and with the child's own compute threads.
                child.hold_output(hold)

    def _note(self, text: str) -> None:
        self.logs.append(text)
        child_log.debug("[%s] %s", self.name, text)


async def _first(aw: Awaitable[T], *stops: asyncio.Future[Any], settle: float) -> asyncio.Future[T] | None:
    """Await `aw` unless one of `stops` finishes first: then `aw` is cancelled (its end
    awaited up to `settle` seconds) and None comes back; else `aw`'s finished future, for
    its result. Should the caller itself be cancelled, `aw` is cancelled too, without
    waiting for it."""
    task = asyncio.ensure_future(aw)
    try:
        await asyncio.wait({task, *stops}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task
        task.cancel()
        await asyncio.wait({task}, timeout=settle)
    except BaseException:
        # asyncio.wait never cancels what it waits for: a life cancelled at teardown
        # would leave its probe, canary or restore running unwatched.
        _abandon(task)
        raise
    _abandon(task)
    return None


def _abandon(task: asyncio.Future[Any]) -> None:
    """Cancel `task` and take its outcome whenever it ends, so that no error in it waits
    for garbage collection to be reported as never retrieved."""
    task.cancel()
    task.add_done_callback(_retrieve)


def _retrieve(task: asyncio.Future[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        # Nobody wants its answer any more; an error here is worth a trace, not a warning.
        log.debug("abandoned wait ended with %s: %s", type(exc).__name__, exc)


async def _unless_stopped(aw: Awaitable[object], stop: asyncio.Event, settle: float) -> bool:
    """Await `aw` unless `stop` is set first (then cancel it). True when `aw` finished."""
    stop_wait = asyncio.create_task(stop.wait())
    try:
        done = await _first(aw, stop_wait, settle=settle)
    finally:
        stop_wait.cancel()
    if done is None:
        return False
    done.result()  # an error in it is the life's to report
    return not stop.is_set()
