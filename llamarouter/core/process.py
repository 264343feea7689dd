"""One supervised llama-server child.

A ModelProcess owns at most one OS process at a time and one run task per lifecycle
(spawn -> wait ready -> watch -> exit). State changes only through `_set_state`, which
checks the transition table and tells the supervisor. Public methods never await between
reading the state and changing it, so asyncio's interleaving cannot split a decision.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import aiohttp

from ..settings.config import RouterConfig, ModelSpec
from ..errors import ModelFailed, StartAborted, StartFailed
from .gguf_info import Estimate, parse_buffer_line
from .launcher import Child, Launcher
from .probes import canary, canary_due
from .sleep import sleeping_from_log
from .kvcache import SAVE_ON_STOP
from .states import SLOT_STATES, State, api_status, check_transition

if TYPE_CHECKING:
    from .kvcache import KvCache

log = logging.getLogger("llamarouter.core.process")
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
# Fresh ports to try after lost races before the load counts as failed.
_BIND_RETRIES = 5

StateListener = Callable[["ModelProcess", State, State], None]
ArgvBuilder = Callable[[ModelSpec, int], Sequence[str]]


class ModelProcess:
    def __init__(
        self,
        spec: ModelSpec,
        config: RouterConfig,
        launcher: Launcher,
        session: aiohttp.ClientSession,
        build_argv: ArgvBuilder,
        on_state: StateListener,
    ) -> None:
        self.spec = spec
        self.name = spec.name
        self._config = config
        self._launcher = launcher
        self._session = session
        self._build_argv = build_argv
        self._on_state = on_state

        self.state = State.STOPPED
        self.state_changed_at = time.monotonic()
        self.port: int | None = None
        self.child: Child | None = None
        self.argv: list[str] = []
        self.in_flight = 0
        self.last_used = 0.0  # monotonic; stamped when a request finishes
        self.last_used_wall = 0.0
        self.last_activity = 0.0  # a proxied response started or ended (liveness hint)
        self.exit_code: int | None = None
        self.crashed = False  # last exit was not asked for (upstream's failed: true)
        self.failure: str | None = None  # why FAILED / why the last load failed
        self.stop_reason: str | None = None
        self.restarts = 0
        self.crash_times: collections.deque[float] = collections.deque()
        self.loaded_info: dict[str, object] = {}
        self.logs: collections.deque[str] = collections.deque(maxlen=config.limits.log_lines)
        self.log_listeners: set[asyncio.Queue[str | None]] = set()
        self.waiters = 0  # requests blocked in wait_ready(): the model is wanted
        self.load_started_at: float | None = None
        # Memory accounting (used only with a budget): the estimate for `estimate_spec`,
        # and the buffer sizes the child reported while loading, by (device, kind).
        self.estimate: Estimate | None = None
        self.estimate_spec: ModelSpec | None = None
        self.measured: dict[tuple[str, str], int] = {}
        # Awaited before each spawn (the supervisor waits there for freed memory to return).
        self.before_spawn: Callable[[], Awaitable[None]] | None = None
        self.ready_at: float | None = None
        # Keep-cache (set by the app): slot caches saved before a stop, restored after a load.
        self.kv_cache: KvCache | None = None

        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._stop_evt = asyncio.Event()
        self._stopped = asyncio.Event()
        self._stopped.set()
        self._probe_now = asyncio.Event()
        self._hinted_at = float("-inf")
        self._changed = asyncio.Event()  # set and replaced on every state change
        self._last_progress = 0.0
        self._bind_failed = False
        self._cause: str | None = None
        self._served = False
        self._last_canary = 0.0

    # ----------------------------------------------------------------- queries
    @property
    def holds_slot(self) -> bool:
        return self.state in SLOT_STATES

    @property
    def api_status(self) -> str:
        return api_status(self.state)

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

    def log_tail(self, n: int) -> list[str]:
        if n <= 0:
            return []
        return list(self.logs)[-n:]

    # ----------------------------------------------------------------- commands
    def start(self) -> None:
        """STOPPED/FAILED -> STARTING and spawn. No-op when already starting or running.

        Raises InvalidTransition from STOPPING/SHUTDOWN: the caller waits for the stop.
        """
        if self.state in (State.STARTING, State.READY, State.BACKOFF):
            return
        if self.state == State.FAILED:
            self.crash_times.clear()  # an explicit retry gets a fresh crash budget
        self.failure = None
        self.stop_reason = None
        self._stop_evt = asyncio.Event()
        self._stopped = asyncio.Event()
        self._ready = asyncio.get_running_loop().create_future()
        self._set_state(State.STARTING)
        self._task = asyncio.create_task(self._run(), name=f"model:{self.name}")

    async def wait_ready(self) -> None:
        """Return once READY.

        STARTING/BACKOFF: wait (the model counts as wanted, so a crash is retried).
        FAILED: raise ModelFailed. STOPPED/STOPPING/SHUTDOWN: raise StartAborted.
        """
        if self.state == State.READY:
            return
        if self.state == State.FAILED:
            raise ModelFailed(self.failure_message())
        if self.state not in (State.STARTING, State.BACKOFF) or self._ready is None:
            raise StartAborted(f"model name={self.name} is not loading")
        fut = self._ready
        self.waiters += 1
        try:
            await asyncio.shield(fut)
        finally:
            self.waiters -= 1

    def stop(self, reason: str) -> None:
        """Ask the child to exit. Returns at once; `wait_stopped()` waits for the reap.

        STARTING/READY/BACKOFF -> STOPPING; FAILED -> STOPPED; otherwise nothing to do.
        """
        if self.state == State.FAILED:
            self._set_state(State.STOPPED)
            return
        if self.state not in (State.STARTING, State.READY, State.BACKOFF):
            return
        self.stop_reason = reason
        self._set_state(State.STOPPING)
        self._stop_evt.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def shutdown(self) -> None:
        """Final stop for router exit: after this the model never starts again."""
        if self.state in (State.STOPPED, State.FAILED):
            self._set_state(State.SHUTDOWN)
        else:
            self.stop("shutdown")

    async def wait_changed_from(self, port: int | None, timeout: float) -> None:
        """Return once the model is no longer READY on `port` (it crashed, restarted or
        stopped), or after `timeout`."""
        if self.state != State.READY or self.port != port:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def kill_now(self) -> None:
        if self.child is not None and self.child.returncode is None:
            self._launcher.kill(self.child)

    def close_log_listeners(self) -> None:
        for q in self.log_listeners:
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(None)

    def reset_failed(self) -> None:
        if self.state == State.FAILED:
            self.crash_times.clear()
            self._set_state(State.STOPPED)

    def failure_message(self) -> str:
        detail = self.failure or "unknown error"
        return f"model name={self.name} failed to load: {detail}"

    # ----------------------------------------------------------------- internals
    def _set_state(self, new: State) -> None:
        old = self.state
        if old == new:
            return
        check_transition(old, new)
        if new in (State.STARTING, State.BACKOFF) and (self._ready is None or self._ready.done()):
            # A restart after a crash of a READY child: waiters need a future that is
            # still pending, or they would spin on the old, settled one.
            self._ready = asyncio.get_running_loop().create_future()
        self.state = new
        self.state_changed_at = time.monotonic()
        self._changed.set()
        self._changed = asyncio.Event()
        log.info("[%s] %s -> %s", self.name, old, new)
        if new in (State.STOPPED, State.FAILED, State.SHUTDOWN):
            self._stopped.set()
            self.port = None
        if new not in (State.STARTING, State.BACKOFF):
            self._settle_ready(new)  # waiters learn the outcome of the load they wait for
        self._on_state(self, old, new)

    def _settle_ready(self, new: State) -> None:
        fut = self._ready
        if fut is None or fut.done():
            return
        if new == State.READY:
            fut.set_result(None)
            return
        if new == State.FAILED:
            exc: Exception = ModelFailed(self.failure_message())
        elif new == State.STOPPED and self.crashed:
            exc = StartFailed(self.failure_message())
        else:
            exc = StartAborted(
                f"model name={self.name} stopped while loading ({self.stop_reason or 'stopped'})"
            )
        fut.set_exception(exc)
        # Nobody may be waiting; don't let asyncio report the exception as never retrieved.
        fut.exception()

    def _wanted(self) -> bool:
        return self.spec.pin or self.waiters > 0

    async def _run(self) -> None:
        timeouts = self._config.timeouts
        limits = self._config.limits
        backoff = timeouts.backoff_initial
        bind_retries = 0
        try:
            while True:
                outcome = await self._one_life()
                if self._served:
                    backoff = timeouts.backoff_initial  # it worked for a while: start afresh
                if outcome == "stopped":
                    self.crashed = False
                    self._set_state(State.STOPPED)
                    return
                if outcome == "bind":
                    bind_retries += 1
                    if bind_retries <= _BIND_RETRIES:
                        log.warning("[%s] port taken before the child bound it; retrying", self.name)
                        continue
                    self.failure = "could not bind a port for the child"
                # A crash (or a failed load): count it in the restart window.
                now = time.monotonic()
                self.crashed = True
                self.crash_times.append(now)
                while self.crash_times and now - self.crash_times[0] > limits.restart_window:
                    self.crash_times.popleft()
                if self.state == State.STOPPING:
                    self._set_state(State.STOPPED)
                    return
                if len(self.crash_times) >= limits.restart_max:
                    log.error(
                        "[%s] giving up after %d failures in %.0fs: %s",
                        self.name, len(self.crash_times), limits.restart_window, self.failure,
                    )
                    self._set_state(State.FAILED)
                    return
                # A model that was serving is replaced (users expect a loaded model to stay
                # loaded); one that failed while loading is retried only while wanted.
                if not (self._wanted() or self._served):
                    self._set_state(State.STOPPED)
                    return
                self._set_state(State.BACKOFF)
                log.warning("[%s] restarting in %.1fs: %s", self.name, backoff, self.failure)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop_evt.wait(), backoff)
                if self._stop_evt.is_set():
                    self._set_state(State.STOPPED)
                    return
                backoff = min(backoff * 2, timeouts.backoff_max)
                self.restarts += 1
                self._set_state(State.STARTING)
        except asyncio.CancelledError:
            # Router teardown cancelled us: never leave a process behind.
            if self.child is not None and self.child.returncode is None:
                self._launcher.kill(self.child)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.child.wait(), self.stop_timeout)
            raise

    async def _one_life(self) -> str:
        """Spawn, wait ready, watch. Returns "stopped" (asked to), "crash" or "bind"."""
        if self._config.fake_timing:
            # Upstream's LLAMA_SERVER_DEBUG_FAKE_TIMING sleeps before every load.
            await asyncio.sleep(self._config.fake_timing_secs)
            if self._stop_evt.is_set():
                return "stopped"
        if self.before_spawn is not None:
            await self.before_spawn()
        port = self._launcher.free_port("127.0.0.1")
        self.argv = list(self._build_argv(self.spec, port))
        self.measured = {}
        self._bind_failed = False
        self._cause = None
        self._served = False
        self.exit_code = None
        self.load_started_at = time.monotonic()
        self._last_progress = self.load_started_at
        self._note(f"[llamarouter] starting: {' '.join(self.argv)}")
        try:
            child = await self._launcher.spawn(self.argv, dict(self._config.child_env))
        except OSError as exc:
            self.failure = f"could not start {self.argv[0]}: {exc}"
            self._note(f"[llamarouter] {self.failure}")
            return "crash"
        self.child = child
        self.port = port
        reader = asyncio.create_task(self._read_output(child), name=f"logs:{self.name}")
        exit_wait = asyncio.ensure_future(child.wait())
        try:
            ready = await self._wait_loaded(child, exit_wait)
            if ready is True:
                await self._fetch_info()
                # KEEP-CACHE HOOK (restore; the new core calls it at the same point): the
                # saved slots go back before any request is granted. Bounded, never raises.
                if self.kv_cache is not None:
                    await self.kv_cache.restore_after_ready(self.name, port)
                self.ready_at = time.monotonic()
                self._served = True
                self._set_state(State.READY)
                log.info(
                    "[%s] ready on port %d in %.2fs",
                    self.name, port, self.ready_at - (self.load_started_at or self.ready_at),
                )
                await self._watch(child, exit_wait)
            if self._stop_evt.is_set():
                # KEEP-CACHE HOOK (save; the new core calls it at the same point): an idle
                # model stopped for eviction, TTL or unload keeps its slot caches on disk.
                # Bounded by the keep-cache timeout per slot, never raises.
                kv = self.kv_cache
                keep = ready is True and self.stop_reason in SAVE_ON_STOP and not exit_wait.done()
                if keep and kv is not None:
                    await kv.save_before_stop(self.name, port)
                await self._terminate(child, exit_wait, loading=ready is not True)
                return "stopped"
            if not exit_wait.done():
                # Stalled load or failed liveness: the child is alive but useless.
                self._launcher.kill(child)
                await exit_wait
            await self._drain(reader)
            code = exit_wait.result()
            self.exit_code = code
            if self._bind_failed:
                return "bind"
            self.failure = self._cause or self._exit_text(code)
            log.warning("[%s] %s", self.name, self.failure)
            return "crash"
        finally:
            if child.returncode is None:
                self._launcher.kill(child)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(exit_wait), self.stop_timeout)
            if not reader.done():
                await self._drain(reader)
            exit_wait.cancel()
            self.child = None

    def _exit_text(self, code: int) -> str:
        what = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        tail = " | ".join(line for line in self.log_tail(3))
        return f"child {what}" + (f"; last output: {tail}" if tail else "")

    async def _drain(self, reader: asyncio.Task[None]) -> None:
        # The pipe closes when the whole process group is gone; a grandchild holding it open
        # must not keep us here forever.
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(reader, self._config.timeouts.health_timeout)

    async def _wait_loaded(self, child: Child, exit_wait: asyncio.Future[int]) -> bool | None:
        """True when /health says ready; None when the child exited, stalled or was stopped."""
        timeouts = self._config.timeouts
        url = f"http://127.0.0.1:{self.port}/health"
        stop_wait = asyncio.ensure_future(self._stop_evt.wait())
        try:
            while True:
                if exit_wait.done() or self._stop_evt.is_set():
                    return None
                if await self._probe(url, timeouts.ready_poll * 20 + 1.0):
                    return True
                now = time.monotonic()
                if now - self._last_progress > timeouts.load_stall:
                    self._cause = (
                        f"load stalled: no output and no answer for {timeouts.load_stall:g}s; killed"
                    )
                    return None
                # A readiness line comes just before the child accepts connections: right
                # after one, probe at a fast pace instead of waiting a whole poll interval.
                hinted = now - self._hinted_at < timeouts.hint_window
                interval = timeouts.hint_poll if hinted else timeouts.ready_poll
                self._probe_now.clear()
                probe_wait = asyncio.ensure_future(self._probe_now.wait())
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

    async def _probe(self, url: str, timeout: float) -> bool:
        try:
            async with self._session.get(
                url, timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                await resp.read()
                if resp.status == 503:
                    self._last_progress = time.monotonic()  # alive, still loading
                return resp.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def _fetch_info(self) -> None:
        # The child's /v1/models entry (e.g. `meta`) is merged into the router's /models item.
        try:
            async with self._session.get(
                f"http://127.0.0.1:{self.port}/v1/models",
                timeout=aiohttp.ClientTimeout(total=self._config.timeouts.health_timeout),
            ) as resp:
                body = await resp.json(content_type=None)
            data = body.get("data") if isinstance(body, dict) else None
            if isinstance(data, list) and data and isinstance(data[0], dict):
                self.loaded_info = dict(data[0])
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            self.loaded_info = {}

    async def _watch(self, child: Child, exit_wait: asyncio.Future[int]) -> None:
        """While READY: return on exit, on stop, or when liveness fails."""
        timeouts = self._config.timeouts
        url = f"http://127.0.0.1:{self.port}/health"
        misses = 0
        canary_misses = 0
        stop_wait = asyncio.ensure_future(self._stop_evt.wait())
        try:
            while True:
                done, _ = await asyncio.wait(
                    {exit_wait, stop_wait},
                    timeout=timeouts.health_interval,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if done:
                    return
                healthy = await self._probe(url, timeouts.health_timeout)
                # CANARY HOOK (the new core calls it from its liveness loop): /health says
                # nothing about inference; an idle, awake model also gets a one-token
                # completion now and then. Failed canaries are counted on their own (the
                # /health probes between them pass) against the same failure limit.
                if healthy and self._canary_due():
                    self._last_canary = time.monotonic()
                    if await canary(self._session, self.port or 0, timeouts.canary_timeout):
                        canary_misses = 0
                    else:
                        canary_misses += 1
                        log.warning(
                            "[%s] canary completion failed (%d/%d)",
                            self.name, canary_misses, timeouts.health_failures,
                        )
                        if canary_misses >= timeouts.health_failures:
                            self._cause = (
                                f"child failed its canary completion {canary_misses} times "
                                f"in a row (limit {timeouts.canary_timeout:g}s each); killed"
                            )
                            return
                if healthy:
                    misses = 0
                    continue
                if exit_wait.done() or self._stop_evt.is_set():
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
                    self._cause = (
                        f"child stopped answering /health ({misses} probes of "
                        f"{timeouts.health_timeout:g}s failed); killed"
                    )
                    return
        finally:
            stop_wait.cancel()

    def _canary_due(self) -> bool:
        return canary_due(
            self._config, self.spec, now=time.monotonic(), last_canary=self._last_canary,
            last_activity=max(self.last_activity, self.ready_at or 0.0), busy=self.in_flight > 0 or self.waiters > 0,
            sleeping=sleeping_from_log(self.logs),
        )

    async def _terminate(self, child: Child, exit_wait: asyncio.Future[int], loading: bool) -> None:
        """SIGTERM the group, wait stop-timeout, SIGKILL, always reap.

        A child still loading is killed at once, as upstream does: it cannot serve and
        llama-server does not act on SIGTERM until its load finishes.
        """
        if loading:
            self._launcher.kill(child)
        else:
            self._launcher.terminate(child)
        try:
            await asyncio.wait_for(asyncio.shield(exit_wait), self.stop_timeout)
        except TimeoutError:
            log.warning("[%s] did not exit within %.1fs; killing", self.name, self.stop_timeout)
            self._launcher.kill(child)
            await exit_wait
        self.exit_code = exit_wait.result()

    async def _read_output(self, child: Child) -> None:
        while True:
            line = await child.readline()
            if not line:
                return
            self._last_progress = time.monotonic()
            if self.state == State.STARTING:
                if any(hint in line for hint in _READY_HINTS):
                    self._hinted_at = time.monotonic()
                    self._probe_now.set()
                elif _BIND_FAILURE.search(line):
                    self._bind_failed = True
                elif b"buffer size" in line:
                    found = parse_buffer_line(line.decode("utf-8", "replace"))
                    if found is not None:
                        self.measured[(found[0], found[1])] = found[2]
            self._note(line.rstrip(b"\r\n").decode("utf-8", "replace"))

    def _note(self, text: str) -> None:
        self.logs.append(text)
        child_log.debug("[%s] %s", self.name, text)
        for q in self.log_listeners:
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(text)
