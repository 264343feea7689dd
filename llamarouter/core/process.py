"""One model and its owner task; the children it runs are `ChildLife`s (child.py).

`ModelProcess` is an actor (llama-swap's single-writer `run()`): its owner task reads
messages from one inbox and is the only code that changes the model's state. Callers send
commands (`start`, `stop`, `shutdown`) that return at once with a future; the slow parts of
a child's life (spawn, load, liveness, terminate, reap) run in a side task, the *life*,
which never changes the model: it reports what happened (`Loaded`, `Exited`) to the inbox.
Messages from an older life carry an older generation number and are ignored, so a late
report can never move a newer life's state.

Handlers of messages never await: a decision and its effect happen in one step.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import ShuttingDown
from ..settings.config import ModelSpec, RouterConfig
from ..settings.declared import REPLICA_TTL, STOP_TIMEOUT, TTL, effective
from .child import ChildLife, ChildParts, Exited, Loaded, Measured
from .launcher import Child
from .logring import LogRing
from .placement import Placement
from .restarts import Restarts
from .states import RUNNING_STATES, SLOT_STATES, State, StopReason, api_status, check_transition

log = logging.getLogger("llamarouter.process")

StateListener = Callable[["ModelProcess", State, State], None]


class MemoryHooks(Protocol):
    """The memory budget's part in a child's life (memory.py)."""

    @property
    def gpu(self) -> bool: ...

    def before_spawn(self, proc: ModelProcess) -> Awaitable[None]:
        """Wait (bounded) until memory freed by stopped children shows as free."""
        ...

    def measure_device(self, proc: ModelProcess, pid: int) -> int | None: ...


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
    reason: StopReason | None = None
    fut: asyncio.Future[None] | None = None


@dataclass
class _BackoffDone:
    gen: int


_Message = _Command | Loaded | Measured | Exited | _BackoffDone


class ModelProcess:
    def __init__(
        self,
        spec: ModelSpec,
        config: RouterConfig,
        parts: ChildParts,
        on_state: StateListener,
        demand: Demand | None = None,
        memory: MemoryHooks | None = None,
        replica: int = 0,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        # Replica 0 is the model's first child; the others (preset key `replicas`) are
        # told apart by their key ("name#2") in scheduling and in the logs.
        self.replica = replica
        self.key = spec.name if replica == 0 else f"{spec.name}#{replica + 1}"
        self._config = config
        self._parts = _own_parts(self, parts, memory)
        self._on_state = on_state
        self._demand: Demand = demand or _NoDemand()

        self.state = State.STOPPED
        self.state_changed_at = time.monotonic()
        self.exit_code: int | None = None
        self.crashed = False  # last exit was not asked for (upstream's failed: true)
        self.failure: str | None = None  # why FAILED / why the last load failed
        self.stop_reason: StopReason | None = None
        self.restarts = 0
        self._restarts = Restarts(config.limits, config.timeouts)
        self.loaded_info: dict[str, Any] = {}
        # The children's output, across lives (the one thing a life writes outside itself).
        self.logs = LogRing(config.limits.log_lines, config.limits.log_lines)
        self.ready_at: float | None = None
        self.ever_ready = False  # this life reached READY (STOPPING shows "loaded" only then)
        # The last unasked exit was a kill because live requests kept failing (reqhealth.py).
        self.sick_exit = False
        # VRAM of the child from NVML, once ready and after its first request (GPU hosts
        # with a memory budget only); kept after it exits as the best guess of what its
        # next start needs.
        self.device_bytes: int | None = None
        # The devices its children are given (placing.py); None: as the router was started.
        self.placement: Placement | None = None

        self._inbox: asyncio.Queue[_Message] = asyncio.Queue()
        self._owner: asyncio.Task[None] | None = None
        self._life: ChildLife | None = None  # the running child's life
        self._last_life: ChildLife | None = None  # the latest, running or ended
        self._gen = 0
        self._backoff_timer: asyncio.TimerHandle | None = None
        self._bind_retries = 0
        self._start_after_stop = False
        self._shutting_down = False
        # Commands sent but not handled yet: the scheduler counts them as done already, so
        # two passes in a row never start (or evict) the same model twice.
        self._pending: collections.deque[_Cmd] = collections.deque()
        self._shut = asyncio.Event()  # reached SHUTDOWN: nothing runs and nothing will
        self._changed = asyncio.Event()  # set and replaced on every state change

    # ----------------------------------------------------------------- its child
    @property
    def port(self) -> int | None:
        return self._life.port if self._life is not None else None

    @property
    def child(self) -> Child | None:
        return self._life.child if self._life is not None else None

    @property
    def argv(self) -> list[str]:
        """How the latest child was started (kept after it exits)."""
        return self._last_life.argv if self._last_life is not None else []

    @property
    def measured(self) -> dict[tuple[str, str], int]:
        """Buffer sizes the latest child reported while loading, by (device, kind)."""
        return self._last_life.measured if self._last_life is not None else {}

    @property
    def load_started_at(self) -> float | None:
        return self._last_life.load_started_at if self._last_life is not None else None

    @property
    def crash_times(self) -> collections.deque[float]:
        """Unasked exits within --restart-window (the restart budget used)."""
        return self._restarts.crash_times

    # ----------------------------------------------------------------- queries
    @property
    def holds_slot(self) -> bool:
        return self.expected_state in SLOT_STATES

    @property
    def expected_state(self) -> State:
        """The state once the commands already sent are handled (what scheduling uses)."""
        sick = self._life is not None and self._life.sick_cause is not None
        return _expected(self.state, sick, self._pending)

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
        return effective(self.spec, self._config, STOP_TIMEOUT)

    @property
    def ttl(self) -> float | None:
        ttl = effective(self.spec, self._config, TTL)
        extra = effective(self.spec, self._config, REPLICA_TTL) if self.replica else None
        return min((t for t in (ttl, extra) if t is not None), default=None)

    @property
    def slots(self) -> int:
        """The latest child's parallel slots (-np; llama-server's auto is 4)."""
        return self._last_life.slots if self._last_life is not None else 1

    @property
    def measured_bytes(self) -> int | None:
        return sum(self.measured.values()) if self.measured else None

    @property
    def stop_bound(self) -> float:
        """The longest a stop can take: SIGTERM, stop-timeout, SIGKILL, reap, drain."""
        return self.stop_timeout + self._config.timeouts.reap + self._config.timeouts.drain + self._config.timeouts.spawn

    def file_repaired(self) -> bool:
        """FAILED, and its model file is not the one its last child was spawned on (size,
        mtime or inode changed): the hold-off was about a file that is gone."""
        return self.state == State.FAILED and self._last_life is not None and self._last_life.file_changed()

    def log_tail(self, n: int) -> list[str]:
        return self.logs.tail(n)

    def failure_message(self) -> str:
        return f"model name={self.name} failed to load: {self.failure or 'unknown error'}"

    # ----------------------------------------------------------------- commands
    def open(self) -> asyncio.Task[None]:
        """Start the owner task (once). The supervisor keeps and observes it."""
        if self._owner is None:
            self._owner = asyncio.create_task(self._own(), name=f"owner:{self.key}")
        return self._owner

    def start(self, placement: Placement | None = None) -> asyncio.Future[None]:
        """Load the model. STOPPED/FAILED: start; STARTING/READY/BACKOFF: nothing to do;
        STOPPING: start again once stopped; SHUTDOWN: fails with ShuttingDown. `placement`
        (several GPUs: placing.py) is where its next lives run, restarts included."""
        self.placement = placement
        return self._send(_Command(_Cmd.START))

    def stop(self, reason: StopReason) -> asyncio.Future[None]:
        """Unload. STARTING: the load is cancelled (the child killed at once); READY:
        SIGTERM, stop-timeout, SIGKILL, reap; BACKOFF/FAILED: to STOPPED. The future
        resolves when the command is handled, not when the child has been reaped."""
        self.stop_reason = reason  # from the asking on: a pass before the owner runs sees why
        return self._send(_Command(_Cmd.STOP, reason))

    def shutdown(self) -> asyncio.Future[None]:
        """Final stop for router exit: afterwards the model never starts again."""
        return self._send(_Command(_Cmd.SHUTDOWN, StopReason.SHUTDOWN))

    def close(self) -> asyncio.Future[None]:
        """End the owner task; only for a model that is stopped and no longer listed."""
        return self._send(_Command(_Cmd.CLOSE))

    def served(self) -> None:
        """A request finished: the first one of a life has the child's VRAM measured again."""
        if self._life is not None and self.state == State.READY:
            self._life.served()

    def note_request(self, port: int | None, fault: str | None) -> None:
        """A live request to the child on `port` ended; `fault` says how the child failed
        it (reqhealth.py), None that it answered. Past the limit the child is taken out of
        routing at once and its life kills it; the exit then counts as a crash (backoff,
        or `failed` once the restart budget is used up). A report about an earlier child,
        or while the model is not READY (a stop cuts requests short), is ignored."""
        if self._life is not None and port is not None and port == self.port and self.state == State.READY:
            self._life.note_request(fault)

    async def wait_shutdown(self, timeout: float) -> bool:
        """True once SHUTDOWN (every command sent before `shutdown()` handled, the child
        reaped); False after timeout."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._shut.wait(), timeout)
        return self._shut.is_set()

    async def wait_changed_from(self, port: int | None, timeout: float) -> None:
        """Return once the model is no longer READY on `port` (it crashed, restarted or
        stopped), or after `timeout`."""
        if self.state != State.READY or self.port != port:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def kill_now(self) -> None:
        """Forced exit: SIGKILL the child's group (the life still reaps it and reports)."""
        if self._life is not None:
            self._life.kill_now()

    def wanted(self) -> bool:
        """Pinned, or requests wait for it (the supervisor's view; for a life's canary)."""
        return self._demand.wanted(self.name)

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
            done = False
            while not done:
                msg = await self._inbox.get()
                try:
                    done = self._handle(msg)
                except Exception as exc:  # a bug of ours: never leave the model undefined
                    log.exception("[%s] internal error handling %s", self.key, type(msg).__name__)
                    self._recover(exc)
                if isinstance(msg, _Command):
                    if self._pending and msg.cmd != _Cmd.CLOSE:
                        self._pending.popleft()
                    _answer(msg, self.state)
        finally:
            life = self._life
            if life is not None and life.task is not None and not life.task.done():
                # Router teardown: the life kills and reaps its child on cancellation.
                life.task.cancel()

    def _recover(self, exc: BaseException) -> None:
        """After an unexpected error: stop what runs and settle in FAILED or STOPPED."""
        self.failure = f"internal error: {type(exc).__name__}: {exc}"
        life = self._life
        if life is not None:
            life.request_stop(self.stop_reason, kill_at_once=True)
            if self.state in RUNNING_STATES:
                self._set_state(State.STOPPING)
            return
        if self.state in RUNNING_STATES:
            self._set_state(State.FAILED)

    def _handle(self, msg: _Message) -> bool:
        """Handle one message; never awaits. Returns True when the owner should end."""
        if isinstance(msg, _Command):
            return self._on_command(msg)
        if isinstance(msg, Loaded):
            if msg.gen == self._gen and self.state == State.STARTING:
                self.loaded_info = msg.info
                self.device_bytes = msg.device_bytes or self.device_bytes
                self.ready_at = time.monotonic()
                self.ever_ready = True
                self._bind_retries = 0
                self._set_state(State.READY)
                took = self.ready_at - (self.load_started_at or self.ready_at)
                log.info("[%s] ready on port %s in %.2fs", self.key, self.port, took)
            # Otherwise a stop got there first: the life is already being told to end.
        elif isinstance(msg, Exited) and msg.gen == self._gen:
            self._on_exit(msg)
        elif isinstance(msg, Measured) and msg.gen == self._gen and self.state == State.READY:
            self.device_bytes = max(self.device_bytes or 0, msg.device_bytes or 0) or None
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
                self._begin(State.STARTING, after_failed=state == State.FAILED)
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
            log.warning("[%s] close refused in state %s", self.key, self.state)
        return False

    def _begin(self, state: State, after_failed: bool = False) -> None:
        self.failure = None
        self.stop_reason = None
        self.crashed = False
        self._bind_retries = 0
        self._restarts.fresh_start(after_failed)
        self._set_state(state)
        self._begin_life()

    def _stop(self, reason: StopReason | None) -> None:
        state = self.state
        if state == State.FAILED:
            self._set_state(State.STOPPED)
        elif state == State.BACKOFF:
            if self._backoff_timer is not None:
                self._backoff_timer.cancel()
            self._gen += 1  # a timer that already fired is stale now
            self.stop_reason = reason
            self._set_state(State.STOPPED)
        elif state in (State.STARTING, State.READY):
            self.stop_reason = reason
            self._set_state(State.STOPPING)
            if self._life is not None:
                self._life.request_stop(reason, kill_at_once=state == State.STARTING)

    def _begin_life(self) -> None:
        self._gen += 1
        life = ChildLife(
            self._gen, self.key, self.spec, self._config, self._parts, self, self.logs, self._post,
            self.stop_timeout, self.placement,
        )
        self._life = self._last_life = life
        life.begin().add_done_callback(_life_done)

    def _on_exit(self, ex: Exited) -> None:
        self._life = None
        self.exit_code = ex.code
        state = self.state
        if state == State.STOPPING or ex.asked:
            self.crashed = False
            if state in RUNNING_STATES:
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
                log.warning("[%s] port taken before the child bound it; retrying", self.key)
                self._begin_life()
                return
            ex.cause = "could not bind a port for the child"
        self.crashed = True
        self.sick_exit = ex.sick
        verdict = self._restarts.after_exit(
            self.key, ex, self.logs.tail(self._config.limits.log_lines), self._demand.wanted(self.name),
            time.monotonic(),
        )
        self.failure = verdict.failure
        self._set_state(verdict.state)
        if verdict.state == State.BACKOFF:
            gen = self._gen
            self._backoff_timer = asyncio.get_running_loop().call_later(
                verdict.delay, self._post, _BackoffDone(gen)
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
        log.info("[%s] %s -> %s", self.key, old, new)
        try:
            self._on_state(self, old, new)
        except Exception:  # the listener is the supervisor's; it must not break the owner
            log.exception("[%s] state listener failed on %s -> %s", self.key, old, new)


def _own_parts(proc: ModelProcess, parts: ChildParts, memory: MemoryHooks | None) -> ChildParts:
    """What `proc`'s lives are built from: the budget's hooks bound to it."""
    if memory is not None:
        parts = dataclasses.replace(
            parts,
            before_spawn=lambda: memory.before_spawn(proc),
            measure_device=(lambda pid: memory.measure_device(proc, pid)) if memory.gpu else None,
        )
    return parts


def _expected(state: State, sick: bool, pending: collections.deque[_Cmd]) -> State:
    if state == State.READY and sick:
        state = State.BACKOFF  # its exit, already on its way, will be handled as a crash
    for cmd in pending:
        if cmd == _Cmd.START and state in (State.STOPPED, State.FAILED):
            state = State.STARTING
        elif cmd != _Cmd.START and state in RUNNING_STATES:
            state = State.STOPPING
    return state


def _answer(msg: _Command, state: State) -> None:
    """Resolve a handled command's future: a start refused by a shut-down model fails."""
    fut = msg.fut
    if fut is None or fut.done():
        return
    if msg.cmd == _Cmd.START and state == State.SHUTDOWN:
        fut.set_exception(ShuttingDown("server is shutting down"))
        fut.exception()  # retrieved: a caller that dropped the future is no error
    else:
        fut.set_result(None)


def _life_done(task: asyncio.Task[None]) -> None:
    # A life catches its own errors and reports them; anything else is a bug to see.
    if not task.cancelled() and task.exception() is not None:
        log.error("%s ended with an error", task.get_name(), exc_info=task.exception())
