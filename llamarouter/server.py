"""The server run loop: listen, serve until a signal, then shut down in order.

Signals only flip state (uvicorn's rule); the loop acts on it. Shutdown order
(docs/design.md): stop accepting -> new requests get 503 -> in-flight responses get
`--shutdown-grace` -> the rest are cancelled -> the runtime stops (children in parallel,
each bounded) -> listeners closed. A second signal kills every child's process group and
exits at once with code 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Coroutine

from aiohttp import web

from . import __version__
from .core.runtime import Runtime
from .core.supervisor import Supervisor
from .errors import ListenFailed, LlamaRouterError
from .sdnotify import Notifier
from .settings.childargs import ChildArgs
from .settings.config import RouterConfig
from .settings.discovery import Discovery
from .settings.flags import FlagTable
from .web.app import ACTIVE, build_app

log = logging.getLogger("llamarouter")


def bind_listeners(config: RouterConfig) -> list[tuple[socket.socket, str]]:
    """Bind every --host address (llama-server's comma-separated list; a path ending in
    .sock is a UNIX socket) before anything else starts: an address that cannot be bound
    is a startup error in every mode, with no child spawned and nothing to clean up."""
    bound: list[tuple[socket.socket, str]] = []
    port = config.port
    try:
        for host in config.hosts:
            try:
                bound.extend(_bind_one(host, port, config.reuse_port))
            except OSError as exc:
                raise ListenFailed(
                    f"couldn't bind HTTP server socket, hostname: {host}, port: {port}: {exc.strerror or exc}"
                ) from None
    except BaseException:
        for sock, _ in bound:
            sock.close()
        raise
    return bound


def _bind_one(host: str, port: int, reuse_port: bool) -> list[tuple[socket.socket, str]]:
    if host.endswith(".sock"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(host)
            sock.listen(1024)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return [(sock, f"unix:{host}")]
    out: list[tuple[socket.socket, str]] = []
    try:
        seen: set[tuple[object, ...]] = set()
        for family, kind, proto, _, addr in socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        ):
            if (family, addr) in seen:
                continue
            seen.add((family, addr))
            sock = socket.socket(family, kind, proto)
            out.append((sock, f"http://[{addr[0]}]:{port}" if family == socket.AF_INET6 else f"http://{addr[0]}:{port}"))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port and hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(addr)
            sock.listen(1024)
            sock.setblocking(False)
    except OSError:
        for sock, _ in out:
            sock.close()
        raise
    return out


class _Stop:
    """Signals only flip state here (uvicorn's rule); the serve loop acts on it."""

    def __init__(self, on_force: Callable[[], None]) -> None:
        self.requested = asyncio.Event()
        self._on_force = on_force
        self.count = 0
        self.exit_code = 0

    def fail(self, exit_code: int) -> None:
        """Shut down as for a signal, then exit with `exit_code`."""
        if not self.requested.is_set():
            self.exit_code = exit_code
            self.requested.set()

    def signal(self) -> None:
        self.count += 1
        if self.count == 1:
            log.info("shutting down: finishing in-flight requests (signal again to force)")
            self.requested.set()
        else:
            self._on_force()


async def exit_if_the_model_cannot_load(sup: Supervisor, stop: _Stop) -> None:
    """Single-model mode: a model that fails before it ever served ends the router with
    exit code 1, as llama-server exits when it cannot load its model (a typo in `-m` then
    makes systemd or Docker see a failed service, not a live one answering 503)."""
    await sup.failed_before_ready.wait()
    log.error("%s; exiting, as llama-server does when its model cannot load", sup.first_failure)
    stop.fail(1)


async def reload_on_signal(sup: Supervisor) -> None:
    """SIGHUP: rescan every source. Never raises: nobody awaits this task, so a failure is
    said here (the router keeps the models it had) or only at garbage collection."""
    try:
        await sup.reload()
        log.info("SIGHUP: models reloaded")
    except LlamaRouterError as exc:
        log.error("SIGHUP: reload failed, keeping the current models: %s", exc.message)
    except Exception as exc:
        # A bug of ours, or a failure discovery does not expect: logged with its trace.
        log.error(
            "SIGHUP: reload failed, keeping the current models: %s: %s",
            type(exc).__name__, exc, exc_info=True,
        )


async def serve(
    config: RouterConfig, discovery: Discovery, table: FlagTable, notifier: Notifier | None = None
) -> int:
    """Run until SIGTERM/SIGINT; the exit code. Shutdown: stop accepting, 503 for new work,
    in-flight responses get `--shutdown-grace`, then the rest are cancelled, the runtime
    stopped (children in parallel, each bounded, the session closed, the lock released).
    A second signal kills every child's process group and exits at once with code 1."""
    socks = bind_listeners(config)
    try:
        runtime = Runtime(config, discovery, ChildArgs(config, table))
        server = _Server(config, runtime, build_app(config, runtime), notifier or Notifier({}))
        return await server.run(socks)
    finally:
        for sock, _ in socks:
            sock.close()


class _Server:
    """One run: the runtime and the HTTP runner started in order, signals turned into
    state, and the shutdown order kept in one place."""

    def __init__(self, config: RouterConfig, runtime: Runtime, app: web.Application, notifier: Notifier) -> None:
        self.config = config
        self.runtime = runtime
        self.app = app
        self.notifier = notifier
        self.stop = _Stop(self._force)
        self.runner = web.AppRunner(
            app,
            handler_cancellation=True,  # a client that goes away cancels its upstream request
            # Our own drain below waits the grace; by the time aiohttp's shutdown runs, what
            # is left is being cancelled and only needs this long to unwind.
            shutdown_timeout=config.timeouts.shutdown_cancel,
            access_log=None,
            # aiohttp arms this timer at accept and partial header bytes do not reset it: a
            # client that trickles its headers is dropped after --header-timeout.
            keepalive_timeout=config.timeouts.header_read,
        )
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, socks: list[tuple[socket.socket, str]]) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.signal)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)
        try:
            sites = await self._start(socks)
            self._started()
            await self.stop.requested.wait()
            await self._shutdown(sites)
            return self.stop.exit_code
        finally:
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks, timeout=self.config.timeouts.shutdown_cancel)
            self.notifier.close()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _start(self, socks: list[tuple[socket.socket, str]]) -> list[web.SockSite]:
        await self.runtime.start()  # releases what it built if it fails
        try:
            await self.runner.setup()
            sites = [web.SockSite(self.runner, sock) for sock, _ in socks]
            for site, (_, where) in zip(sites, socks, strict=True):
                await site.start()
                log.info("llamarouter %s listening on %s", __version__, where)
        except BaseException:
            await self.runner.cleanup()
            await self.runtime.stop()
            raise
        return sites

    def _started(self) -> None:
        config = self.config
        for host in config.hosts:
            if not host.endswith(".sock") and host not in ("127.0.0.1", "localhost", "::1") and not config.api_keys:
                log.warning("listening on %s without --api-key: anyone who can reach it can use it", host)
        self.notifier.ready(f"listening on {config.host}:{config.port}")
        release_free_heap()
        self._spawn(self.notifier.watchdog(), "sd-watchdog")
        if config.single_model is not None:
            self._spawn(exit_if_the_model_cannot_load(self.runtime.supervisor, self.stop), "single-model-watch")

    async def _shutdown(self, sites: list[web.SockSite]) -> None:
        config = self.config
        self.notifier.stopping("finishing in-flight requests")
        self.runtime.begin_shutdown()
        for site in sites:
            await site.stop()  # no new connections; open ones finish their request
        active = self.app[ACTIVE]
        if not await active.wait_idle(config.timeouts.shutdown_grace):
            log.warning(
                "shutdown grace of %gs over: cancelling %d request(s) in flight",
                config.timeouts.shutdown_grace, active.count,
            )
            await active.cancel_all(config.timeouts.shutdown_cancel)
        try:
            await self.runner.cleanup()
        finally:
            await self.runtime.stop()

    def _spawn(self, coro: Coroutine[object, object, None], name: str) -> None:
        # Observed: each ends on its own or is cancelled (and awaited, bounded) by run().
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s ended with an error", task.get_name(), exc_info=task.exception())

    def _on_hup(self) -> None:
        runtime = self.runtime
        if runtime.started and not runtime.supervisor.closing:
            self._spawn(reload_on_signal(runtime.supervisor), "reload")

    def _force(self) -> None:
        log.warning("forced exit: killing every child now")
        self.runtime.kill_all()
        # Whatever is still running (streams, loads, executor threads) must not hold the
        # process: children are SIGKILLed above (and die with us via PDEATHSIG anyway).
        logging.shutdown()
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(1)


def release_free_heap() -> None:
    """Hands the C heap's free pages back to the OS once startup is over. Imports, the
    command line, the first scan and the app's setup leave freed memory behind that glibc
    keeps for reuse; at rest it would only be resident memory (about 0.5 MiB). One call
    of a few milliseconds at most, never on the request path; nothing happens off glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries have none
        return
    trim(0)


def run(main: Coroutine[object, object, int], settle: float) -> int:
    """Run on uvloop when it is installed (about 100 us less CPU per proxied request here),
    else on asyncio's default loop. Unlike asyncio.run, the teardown is bounded: leftover
    tasks get `settle` seconds, and executor threads are not waited for here (see main)."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    except ImportError:
        factory = asyncio.new_event_loop
    loop = factory()
    try:
        return loop.run_until_complete(main)
    finally:
        try:
            pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.wait(pending, timeout=settle))
            loop.run_until_complete(asyncio.wait_for(loop.shutdown_asyncgens(), settle))
        except (TimeoutError, RuntimeError) as exc:
            log.warning("teardown did not finish cleanly: %r", exc)
        finally:
            loop.close()  # shuts the default executor down without waiting for its threads


def exit_within(code: int, settle: float) -> None:
    """Exit with `code` within `settle` seconds even if a worker thread is stuck (a file read
    on a hung mount, a slow name lookup): the interpreter would otherwise join it forever."""
    deadline = time.monotonic() + settle
    for thread in threading.enumerate():
        if thread is threading.main_thread() or thread.daemon:
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() and not t.daemon and t is not threading.main_thread() for t in threading.enumerate()):
        log.warning("exiting with worker threads still running")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
