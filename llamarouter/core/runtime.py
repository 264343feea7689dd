"""The core, built and owned in one place (uvicorn's Config/Server split, gunicorn's arbiter).

`Runtime` is given the settings and how to find models; `start()` builds, in order, what
can fail on a bad setting (the memory budget, the state dir's lock), then the client
session children are spoken to on, the keep-cache store, the supervisor, the download
and tool helpers and the model watcher; `stop()` releases them in reverse order, each
step bounded, whatever fails. The web layer receives a runtime and builds nothing of
the core; it registers listeners (metrics, the relay) before `start()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

import aiohttp

from ..errors import LlamaRouterError, ShuttingDown
from ..settings.childargs import ChildArgs, keeps_cache
from ..settings.config import ModelSpec, RouterConfig
from .childclient import ChildClient
from .downloads import Downloads
from .kvcache import KvCache, kv_fingerprint
from .launcher import Launcher, OsLauncher
from .memory import MemoryManager
from .process import ModelProcess
from .statedir import StateDir
from .states import State
from .supervisor import Supervisor
from .toolserver import ToolServer
from .watch import Watcher

log = logging.getLogger("llamarouter.runtime")

Discover = Callable[[], dict[str, ModelSpec]]


class Listener(Protocol):
    """Sees every model transition and what the scheduler does (metrics, the relay, the
    dashboard). Its methods never await and must not raise."""

    def on_state(self, proc: ModelProcess, old: State, new: State) -> None: ...

    def waited(self, model: str, seconds: float) -> None: ...

    def drained(self, model: str) -> None: ...


class _Fanout:
    """The listeners as one, in the order they registered."""

    def __init__(self, listeners: list[Listener]) -> None:
        self._listeners = listeners

    def on_state(self, proc: ModelProcess, old: State, new: State) -> None:
        for listener in self._listeners:
            listener.on_state(proc, old, new)

    def waited(self, model: str, seconds: float) -> None:
        for listener in self._listeners:
            listener.waited(model, seconds)

    def drained(self, model: str) -> None:
        for listener in self._listeners:
            listener.drained(model)


class Runtime:
    def __init__(
        self,
        config: RouterConfig,
        discover: Discover,
        child_args: ChildArgs,
        launcher: Launcher | None = None,
    ) -> None:
        self.config = config
        self._discover = discover
        self.child_args = child_args
        self._launcher = launcher
        self._listeners: list[Listener] = []
        self.memory: MemoryManager | None = None
        self._state_dir: StateDir | None = None
        self._session: aiohttp.ClientSession | None = None
        self._children: ChildClient | None = None
        self._kv_cache: KvCache | None = None
        self._supervisor: Supervisor | None = None
        self._downloads: Downloads | None = None
        self.tools: ToolServer | None = None  # set while the tool helper serves
        self._watcher: Watcher | None = None

    # ----------------------------------------------------------------- what the web reads
    @property
    def started(self) -> bool:
        return self._supervisor is not None

    @property
    def supervisor(self) -> Supervisor:
        if self._supervisor is None:
            raise ShuttingDown("server is not running")
        return self._supervisor

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise ShuttingDown("server is not running")
        return self._session

    @property
    def children(self) -> ChildClient:
        if self._children is None:
            raise ShuttingDown("server is not running")
        return self._children

    @property
    def kv_cache(self) -> KvCache | None:
        return self._kv_cache

    @property
    def downloads(self) -> Downloads | None:
        return self._downloads

    def listen(self, listener: Listener) -> None:
        """Register before `start()`: the supervisor is built with its listeners."""
        if self.started:
            raise RuntimeError("listeners register before the runtime starts")
        self._listeners.append(listener)

    # ----------------------------------------------------------------- start and stop
    async def start(self) -> None:
        """Build and start the core. On any failure what was built is released again."""
        config = self.config
        try:
            self._open_settings()
            self._session = _child_session(config)
            self._children = ChildClient(self._session)
            self._build_core(self._children)
            await self._start_tools(self._children)
            await self.supervisor.start()
            await self._start_watcher()
        except BaseException:
            await self.stop()
            raise

    def _open_settings(self) -> None:
        # Settings that can fail come first, so a bad one leaves little to undo.
        config = self.config
        if config.memory_budget is not None:
            self.memory = MemoryManager.from_setting(
                config.memory_budget, config.limits.memory_margin,
                config.timeouts.memory_recovery, config.timeouts.memory_poll,
                probe_timeout=config.timeouts.device_probe, start_timeout=config.timeouts.device_start,
            )
        if config.state_dir is not None:
            state_dir = StateDir(config.state_dir)
            state_dir.acquire()
            self._state_dir = state_dir

    def _build_core(self, children: ChildClient) -> None:
        config = self.config
        kv = self._kv_cache = KvCache(config, children, self._wants_cache, self._fingerprint)
        fanout = _Fanout(self._listeners)
        child_args = self.child_args

        def build_argv(spec: ModelSpec, port: int) -> list[str]:
            if port:
                kv.ensure_dir(spec.name)
            return child_args.argv(spec, port)

        sup = self._supervisor = Supervisor(
            config, self._discover, self._launcher or OsLauncher(config.limits.child_nice),
            children, build_argv, self._state_dir, observer=fanout.on_state,
            options_for=child_args.merged, memory=self.memory, kv_cache=kv, watch=fanout,
        )
        self._downloads = Downloads(
            config, OsLauncher(config.limits.child_nice), sup.events.publish, sup.reload,
            lambda name: sup.find(name) is not None,
        )

    async def _start_tools(self, children: ChildClient) -> None:
        config = self.config
        tools = ToolServer(config, OsLauncher(config.limits.child_nice), children)
        if not tools.enabled or config.single_model is not None:
            return
        self.tools = tools
        try:
            await tools.start()
        except (RuntimeError, OSError, TimeoutError) as exc:
            raise LlamaRouterError(f"tools setup failed: {exc}") from None

    async def _start_watcher(self) -> None:
        config = self.config
        if not config.watch or config.single_model is not None:
            return
        watcher = self._watcher = Watcher(
            config.models_dir, config.models_preset, self.supervisor.reload,
            config.timeouts.watch_debounce, config.timeouts.watch_poll,
        )
        watcher.start()
        # Serve only once the watcher has its first snapshot: a change made between then
        # and now would be in that snapshot and never applied.
        try:
            await asyncio.wait_for(watcher.watching.wait(), config.timeouts.watch_poll)
        except TimeoutError:
            log.warning("the model watcher took over %gs to start", config.timeouts.watch_poll)

    def begin_shutdown(self) -> None:
        """Refuse new work: queued requests and event streams end now (docs/design.md)."""
        if self._supervisor is not None:
            self._supervisor.begin_shutdown()

    def kill_all(self) -> None:
        """Forced exit (second signal): SIGKILL every child's process group now."""
        if self._supervisor is not None:
            self._supervisor.kill_all()

    async def stop(self) -> None:
        """Release everything `start()` built, in reverse order; each step is bounded by
        its own setting and runs whatever the one before did."""
        timeouts = self.config.timeouts
        try:
            if self._watcher is not None:
                await self._watcher.stop(timeouts.watch_poll)
                self._watcher = None
            if self._downloads is not None:
                await self._downloads.close()  # before the children: a cancelled one cleans up
            if self.tools is not None:
                await self.tools.close()
            if self._supervisor is not None:
                await self._supervisor.shutdown()
        finally:
            try:
                if self._session is not None:
                    await self._session.close()
            finally:
                if self._state_dir is not None:
                    self._state_dir.release()
                    self._state_dir = None

    # ----------------------------------------------------------------- keep-cache
    def _wants_cache(self, name: str) -> bool:
        proc = self._by_key(name)
        return proc is not None and keeps_cache(self.config, proc.spec)

    def _by_key(self, key: str) -> ModelProcess | None:
        """A model by its name, or one of its replicas by its key ("name#2"): each keeps
        its slot caches apart."""
        return self._supervisor.table.by_key(key) if self._supervisor is not None else None

    def _fingerprint(self, name: str) -> str | None:
        proc = self._by_key(name)
        if proc is None:
            return None
        return kv_fingerprint(self.child_args.merged(proc.spec), proc.spec.model_path)


def _child_session(config: RouterConfig) -> aiohttp.ClientSession:
    # Health probes and metrics scrapes: idle connections are dropped before
    # llama-server's 5 s keep-alive closes them, so a probe never meets a closing one.
    connector = aiohttp.TCPConnector(
        limit=0, keepalive_timeout=config.timeouts.proxy_idle, enable_cleanup_closed=False
    )
    # No cookie jar: children set no cookies, and the jar costs time on every request.
    return aiohttp.ClientSession(
        connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    )
