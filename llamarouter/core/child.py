"""One life of one llama-server child: spawn, load, watch, stop, reap.

A `ChildLife` is a side task of the model that owns it (process.py). It keeps what is
about its own child (port, pid, argv, the buffer sizes it reported, when its load began)
on itself, and tells its owner what happened by message only (`Loaded`, `Exited`),
through the `post` it was given: it never changes the model. The one thing it writes
outside itself is the child's output, into the model's log ring (a sink shared by the
model's lives, so the log reads across restarts).

Every await is bounded by a named setting (`Timeouts`); a life always reports its exit,
whatever ends it (a stop, a crash, a failed probe, cancellation at router teardown).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ..settings.childargs import parallel_slots, with_slot_dir
from ..settings.config import ModelSpec, RouterConfig
from .canary import canary_due
from .gguf_info import parse_buffer_line
from .launcher import Child, Launcher
from .logring import LogRing
from .placement import Placement, child_launch
from .probes import Probe
from .reqhealth import RequestHealth
from .sleep import sleeping_from_log
from .states import SAVE_ON_STOP, StopReason
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
ArgvBuilder = Callable[[ModelSpec, int], Sequence[str]]


@dataclass(frozen=True)
class ChildParts:
    """What every life of a model is built from, given once when the model is made."""

    launcher: Launcher
    probe: Probe
    build_argv: ArgvBuilder
    # Keep-cache: slot caches are saved before an idle model is stopped and restored
    # before it is granted requests.
    kv_cache: KvCache | None = None
    # Awaited (bounded by the memory manager) before each spawn: freed VRAM shows up late.
    before_spawn: Callable[[], Awaitable[None]] | None = None
    # VRAM of a child's pid from NVML (GPU hosts with a memory budget only).
    measure_device: Callable[[int], int | None] | None = None


class Traffic(Protocol):
    """What a life may read of its model's requests (to tell a busy child from a dead one)."""

    @property
    def in_flight(self) -> int: ...

    @property
    def last_activity(self) -> float: ...

    def wanted(self) -> bool: ...


@dataclass
class Loaded:
    gen: int
    info: dict[str, Any]
    device_bytes: int | None = None


@dataclass
class Measured:
    gen: int
    device_bytes: int | None


@dataclass
class Exited:
    gen: int
    code: int | None = None
    asked: bool = False  # it exited because we stopped it
    bind_failed: bool = False
    loaded: bool = False  # it reached READY in this life
    cause: str | None = None
    sick: bool = False  # killed because its live requests kept failing


class ChildLife:
    """One attempt: the owner makes it, `begin()`s it, and may `request_stop()` or
    `mark_sick()` it; everything else is its own."""

    def __init__(
        self,
        gen: int,
        key: str,
        spec: ModelSpec,
        config: RouterConfig,
        parts: ChildParts,
        traffic: Traffic,
        logs: LogRing,
        post: Callable[[Loaded | Measured | Exited], None],
        stop_timeout: float,
        placement: Placement | None = None,
    ) -> None:
        self.gen = gen
        self.name = key  # the model's name, or its replica's key ("name#2")
        self._spec = spec
        self._config = config
        self._parts = parts
        self._traffic = traffic
        self._logs = logs
        self._post = post
        self._stop_timeout = stop_timeout
        self._placement = placement
        self.requests = RequestHealth(config.limits.request_failures, config.limits.request_failure_window)
        self.task: asyncio.Task[None] | None = None
        # Its own child, readable by the owner; written only by this life.
        self.port: int | None = None
        self.child: Child | None = None
        self.argv: list[str] = []
        self.slots = 1  # its parallel slots (-np), once its command line is known
        self.spawned_file: FileIdentity | None = None
        self.measured: dict[tuple[str, str], int] = {}  # buffer sizes reported while loading
        self.load_started_at: float | None = None
        # Set by the owner: how it should end.
        self.stop = asyncio.Event()
        self.stop_reason: StopReason | None = None
        self.kill_at_once = False
        # Set once its live requests failed past the limit: the life kills the child and the
        # exit is handled as a crash.
        self.sick = asyncio.Event()
        self.sick_cause: str | None = None
        self._loading = True
        self._loaded_at = 0.0
        self._last_canary = 0.0
        self._canary_misses = 0
        self._remeasured = False
        self._probe_now = asyncio.Event()
        self._hinted_at = float("-inf")
        self._last_progress = 0.0

    # ----------------------------------------------------------------- the owner's side
    def begin(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self._live(), name=f"life:{self.name}:{self.gen}")
        return self.task

    def request_stop(self, reason: StopReason | None, kill_at_once: bool) -> None:
        self.stop_reason = reason
        # A child still loading cannot serve and llama-server does not act on SIGTERM
        # until its load ends: it is killed at once, as upstream does.
        self.kill_at_once = self.kill_at_once or kill_at_once
        self.stop.set()

    def mark_sick(self, cause: str) -> None:
        self.sick_cause = cause
        self.sick.set()

    def note_request(self, fault: str | None) -> None:
        """A live request it served ended (`fault`: how the child failed it, reqhealth.py).
        Past the limit the child is marked sick: the watch ends and the child is killed."""
        if self.sick_cause is not None:
            return
        cause = self.requests.note(time.monotonic(), fault)
        if cause is not None:
            log.error("[%s] %s", self.name, cause)
            self.mark_sick(cause)

    def served(self) -> None:
        """After its first request a GPU child has allocated its library workspaces (about
        100 MiB more on an H200): its VRAM is measured once more then."""
        measure, child = self._parts.measure_device, self.child
        if measure is None or child is None or self._remeasured:
            return
        self._remeasured = True
        # Synchronous: NVML lists the GPU's processes, well under a millisecond, and the
        # probe gives up after --device-probe-timeout on a driver that hangs.
        self._post(Measured(self.gen, measure(child.pid)))

    def file_changed(self) -> bool:
        """Its model file is not the one it was spawned on (size, mtime or inode)."""
        path = self._spec.model_path
        return path is not None and self.spawned_file is not None and file_identity(path) != self.spawned_file

    def kill_now(self) -> None:
        child = self.child
        if child is not None and child.returncode is None:
            self._parts.launcher.kill(child)

    # ----------------------------------------------------------------- the life
    async def _live(self) -> None:
        """Spawn, load, watch, terminate, reap; always report the exit to the owner."""
        result = Exited(self.gen)
        child: Child | None = None
        reader: asyncio.Task[None] | None = None
        exit_wait: asyncio.Task[int] | None = None
        try:
            if not await self._before_spawn():
                result.asked = True
                return
            child = await self._spawn(result)
            if child is None:
                return
            reader = asyncio.create_task(self._read_output(child, result), name=f"logs:{self.name}")
            exit_wait = asyncio.create_task(child.wait(), name=f"exit:{self.name}")
            await self._serve(child, exit_wait, result)
        except Exception as exc:
            log.exception("[%s] internal error in the child's life", self.name)
            result.cause = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            await self._end(child, reader, exit_wait, result)

    async def _spawn(self, result: Exited) -> Child | None:
        parts = self._parts
        port = parts.launcher.free_port("127.0.0.1")
        self.argv = _argv(parts, self._spec, self.name, port)
        env = dict(self._config.child_env)
        if self._placement is not None:
            # Its devices: CUDA_VISIBLE_DEVICES, and --main-gpu/--tensor-split over several.
            placed_env, placed_args = child_launch(self._placement)
            env.update(placed_env)
            self.argv += placed_args
        self.slots = parallel_slots(self.argv, dict(self._config.child_env))
        self.spawned_file = file_identity(self._spec.model_path)
        self.load_started_at = self._last_progress = time.monotonic()
        self._note(f"[llamarouter] starting: {' '.join(self.argv)}")
        try:
            async with asyncio.timeout(self._config.timeouts.spawn):
                child = await parts.launcher.spawn(self.argv, env)
        except (OSError, TimeoutError) as exc:
            result.cause = f"could not start {self.argv[0] if self.argv else '?'}: {exc}"
            self._note(f"[llamarouter] {result.cause}")
            return None
        self.child = child
        self.port = port
        return child

    async def _serve(self, child: Child, exit_wait: asyncio.Task[int], result: Exited) -> None:
        """Load, then watch until it ends; then stop it the way it was asked to stop."""
        timeouts = self._config.timeouts
        port = self.port
        assert port is not None
        loaded = await self._wait_loaded(exit_wait, port, result)
        if loaded:
            self._loading = False
            self._loaded_at = time.monotonic()
            info = await self._parts.probe.info(port, timeouts.info)
            kv = self._parts.kv_cache
            if kv is not None:
                # Saved slots go back before any request is granted; bounded by the
                # keep-cache timeout, never raises, and a stop does not wait for it.
                await _unless_stopped(kv.restore_after_ready(self.name, port), self.stop, timeouts.settle_cancelled)
            result.loaded = True
            # One synchronous NVML call per load, well under a millisecond; bounded by
            # --device-probe-timeout should the driver hang.
            measure = self._parts.measure_device
            device = measure(child.pid) if measure is not None else None
            self._post(Loaded(self.gen, info, device))
            await self._watch(exit_wait, port, result)
        if self.stop.is_set():
            result.asked = True
            kv = self._parts.kv_cache
            if (
                kv is not None and loaded and not self.kill_at_once
                and self.stop_reason in SAVE_ON_STOP and not exit_wait.done()
            ):
                # An idle model stopped for eviction, TTL or unload keeps its slot
                # caches on disk (bounded per slot by the keep-cache timeout).
                await kv.save_before_stop(self.name, port)
            await terminate(
                self._parts.launcher, child, exit_wait, self.kill_at_once or not loaded,
                self._stop_timeout, self._config.timeouts.reap, self.name,
            )
        elif not exit_wait.done():
            # Stalled load or failed liveness: the child is alive but useless.
            self._parts.launcher.kill(child)
            await reap(exit_wait, self._config.timeouts.reap, self.name)

    async def _end(
        self,
        child: Child | None,
        reader: asyncio.Task[None] | None,
        exit_wait: asyncio.Task[int] | None,
        result: Exited,
    ) -> None:
        if child is not None and child.returncode is None:
            # Cancelled (router teardown) or broken: never leave a process behind.
            self._parts.launcher.kill(child)
            if exit_wait is not None:
                with contextlib.suppress(BaseException):
                    await reap(exit_wait, self._config.timeouts.reap, self.name)
        if reader is not None:
            if child is not None:
                child.release_output()  # the exit is known: its last lines are wanted now
            with contextlib.suppress(BaseException):
                await drain_output(reader, self._config.timeouts.drain)
        if child is not None:
            child.close_output()
        if exit_wait is not None:
            if exit_wait.done() and not exit_wait.cancelled() and exit_wait.exception() is None:
                result.code = exit_wait.result()
            exit_wait.cancel()
        if result.cause is None and not result.asked and result.code is not None:
            result.cause = self._exit_text(result.code)
        self._post(result)

    async def _before_spawn(self) -> bool:
        """Upstream's fake-timing sleep and the wait for freed memory; False when stopped."""
        waits: list[Awaitable[object]] = []
        if self._config.fake_timing:  # off in -m/-hf mode (cli.py), as upstream
            # Upstream's LLAMA_SERVER_DEBUG_FAKE_TIMING sleeps before every load.
            waits.append(asyncio.sleep(self._config.fake_timing_secs))
        if self._parts.before_spawn is not None:
            waits.append(self._parts.before_spawn())
        for aw in waits:
            if not await _unless_stopped(aw, self.stop, self._config.timeouts.settle_cancelled):
                return False
        return not self.stop.is_set()

    async def _wait_loaded(self, exit_wait: asyncio.Task[int], port: int, result: Exited) -> bool:
        """True when /health says ready; False when the child exited, stalled or was stopped."""
        timeouts = self._config.timeouts
        stop_wait = asyncio.create_task(self.stop.wait())
        try:
            while True:
                if exit_wait.done() or self.stop.is_set():
                    return False
                # Stopped or exited while a probe hangs: do not wait for it to time out.
                probe = await _first(
                    self._parts.probe.health(port, timeouts.ready_poll * 20 + 1.0), exit_wait, stop_wait,
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
                await self._pause(exit_wait, stop_wait, now)
        finally:
            stop_wait.cancel()

    async def _pause(self, exit_wait: asyncio.Task[int], stop_wait: asyncio.Task[Any], now: float) -> None:
        # A readiness line comes just before the child accepts connections: right after
        # one, probe at a fast pace instead of waiting a whole poll interval.
        timeouts = self._config.timeouts
        hinted = now - self._hinted_at < timeouts.hint_window
        interval = timeouts.hint_poll if hinted else timeouts.ready_poll
        self._probe_now.clear()
        probe_wait = asyncio.create_task(self._probe_now.wait())
        try:
            await asyncio.wait(
                {exit_wait, stop_wait, probe_wait}, timeout=interval, return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            probe_wait.cancel()

    async def _watch(self, exit_wait: asyncio.Task[int], port: int, result: Exited) -> None:
        """While READY: return on exit, on stop, or when liveness fails."""
        timeouts = self._config.timeouts
        misses = 0
        self._canary_misses = 0
        stop_wait = asyncio.create_task(self.stop.wait())
        # Failed live requests end the watch like a stop does, but the exit is a crash.
        sick_wait = asyncio.create_task(self.sick.wait())
        ends = (exit_wait, stop_wait, sick_wait)
        try:
            while True:
                done, _ = await asyncio.wait(
                    set(ends), timeout=timeouts.health_interval, return_when=asyncio.FIRST_COMPLETED,
                )
                if done:
                    return
                probe = await _first(
                    self._parts.probe.health(port, timeouts.health_timeout), *ends,
                    settle=timeouts.settle_cancelled,
                )
                if probe is None:
                    return
                healthy = probe.result() == 200
                if healthy and self._canary_due() and not await self._canary(port, ends, result):
                    return
                if healthy:
                    misses = 0
                    continue
                if exit_wait.done() or self.stop.is_set():
                    return
                # A busy child may queue /health behind its HTTP workers; responses that are
                # still starting or finishing show it is alive.
                traffic = self._traffic
                recent = time.monotonic() - traffic.last_activity < timeouts.health_interval
                if traffic.in_flight > 0 and recent:
                    continue
                misses += 1
                log.warning("[%s] liveness probe failed (%d/%d)", self.name, misses, timeouts.health_failures)
                if misses >= timeouts.health_failures:
                    result.cause = (
                        f"child stopped answering /health ({misses} probes of "
                        f"{timeouts.health_timeout:g}s failed); killed"
                    )
                    return
        finally:
            stop_wait.cancel()
            sick_wait.cancel()
            if self.sick.is_set() and not self.stop.is_set() and not exit_wait.done():
                # Whatever else ended the watch, the child is killed for its requests.
                result.cause = self.sick_cause
                result.sick = True

    async def _canary(self, port: int, ends: tuple[asyncio.Future[Any], ...], result: Exited) -> bool:
        """/health says nothing about inference: an idle, awake model also gets a one-token
        completion now and then. Failed canaries are counted on their own (the /health
        probes between them pass) against the same limit. False when the watch must end."""
        timeouts = self._config.timeouts
        self._last_canary = time.monotonic()
        canary = await _first(
            self._parts.probe.canary(port, timeouts.canary_timeout), *ends, settle=timeouts.settle_cancelled,
        )
        if canary is None:
            return False
        if canary.result():
            self._canary_misses = 0
            return True
        self._canary_misses += 1
        misses = self._canary_misses
        log.warning("[%s] canary completion failed (%d/%d)", self.name, misses, timeouts.health_failures)
        if misses >= timeouts.health_failures:
            result.cause = (
                f"child failed its canary completion {misses} times "
                f"in a row (limit {timeouts.canary_timeout:g}s each); killed"
            )
            return False
        return True

    def _canary_due(self) -> bool:
        traffic = self._traffic
        return canary_due(
            self._config, self._spec, now=time.monotonic(), last_canary=self._last_canary,
            last_activity=max(traffic.last_activity, self._loaded_at),
            busy=traffic.in_flight > 0 or traffic.wanted(),
            sleeping=sleeping_from_log(self._logs),
        )

    def _exit_text(self, code: int) -> str:
        what = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        tail = " | ".join(self._logs.tail(3))
        return f"child {what}" + (f"; last output: {tail}" if tail else "")

    async def _read_output(self, child: Child, result: Exited) -> None:
        hold = self._config.timeouts.output_hold
        while True:
            lines = await child.read_lines()
            if not lines:
                return
            self._last_progress = time.monotonic()
            for line in lines:
                if self._loading:
                    self._scan_loading(line, result)
                self._note(line.rstrip(b"\r").decode("utf-8", "replace"))
            if not self._loading:
                # Loading lines are read at once (readiness hints, progress); after that
                # they wait in the pipe between reads: a wakeup per line competed with
                # request intake and with the child's own compute threads.
                child.hold_output(hold)

    def _scan_loading(self, line: bytes, result: Exited) -> None:
        if any(hint in line for hint in _READY_HINTS):
            self._hinted_at = time.monotonic()
            self._probe_now.set()
        elif _BIND_FAILURE.search(line):
            result.bind_failed = True
        elif b"buffer size" in line:
            found = parse_buffer_line(line.decode("utf-8", "replace"))
            if found is not None:
                self.measured[(found[0], found[1])] = found[2]

    def _note(self, text: str) -> None:
        self._logs.append(text)
        child_log.debug("[%s] %s", self.name, text)


def _argv(parts: ChildParts, spec: ModelSpec, key: str, port: int) -> list[str]:
    argv = list(parts.build_argv(spec, port))
    kv = parts.kv_cache
    if kv is not None and key != spec.name:
        # A replica keeps its slot caches apart from its model's first child.
        argv = with_slot_dir(argv, kv.directory(key))
        kv.ensure_dir(key)
    return argv


async def terminate(
    launcher: Launcher, child: Child, exit_wait: asyncio.Task[int], kill: bool,
    stop_timeout: float, reap_timeout: float, name: str,
) -> None:
    """SIGTERM the group (SIGKILL at once for a loading child, `kill`), wait
    `stop_timeout`, SIGKILL, reap (bounded)."""
    if kill:
        launcher.kill(child)
    else:
        launcher.terminate(child)
        try:
            await asyncio.wait_for(asyncio.shield(exit_wait), stop_timeout)
            return
        except TimeoutError:
            log.warning("[%s] did not exit within %.1fs; killing", name, stop_timeout)
            launcher.kill(child)
    await reap(exit_wait, reap_timeout, name)


async def reap(exit_wait: asyncio.Task[int], timeout: float, name: str) -> None:
    try:
        await asyncio.wait_for(asyncio.shield(exit_wait), timeout)
    except TimeoutError:
        # SIGKILLed and still not reaped (uninterruptible sleep in a driver): report it and
        # move on; the state-dir record lets the next start reap it.
        log.error("[%s] child not reaped %.1fs after SIGKILL", name, timeout)


async def drain_output(reader: asyncio.Task[None], timeout: float) -> None:
    # The pipe closes when the whole process group is gone; a grandchild holding it open
    # must not keep us here.
    try:
        await asyncio.wait_for(asyncio.shield(reader), timeout)
    except TimeoutError:
        reader.cancel()


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
