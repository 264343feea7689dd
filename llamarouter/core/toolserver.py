"""`--tools`, `--agent`, MCP servers and `--ui-mcp-proxy` in router mode.

llama-server's router serves `/tools` (its built-in agent tools and MCP servers) and
`/cors-proxy` (the web UI's MCP proxy) itself, in the router process. llamarouter gets
them from the same code: one extra `llama-server` in router mode with no models of its
own (an empty `--models-dir`, an empty cache) and those flags, on a loopback port; the
web layer relays `/tools` and `/cors-proxy` to it. It holds no model, takes no
`--models-max` slot and no memory budget. It is restarted with backoff if it exits, and
stopped with the router.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from ..settings.config import RouterConfig
from .childclient import CHILD_HOST, ChildClient
from .launcher import OsLauncher

log = logging.getLogger("llamarouter.tools")

# The flags that make llama-server serve /tools or /cors-proxy (server.cpp), as option keys.
TOOL_KEYS = ("--tools", "--tools-runtime", "--mcp-servers-config", "--mcp-servers-json", "-ag", "--ui-mcp-proxy")
_SWITCHES = {"-ag": "--agent", "--ui-mcp-proxy": "--ui-mcp-proxy"}
_BACKOFF_MAX = 30.0


def tool_args(options: Sequence[tuple[str, str]]) -> list[str]:
    """The tool flags among the router's child options, as llama-server arguments."""
    argv: list[str] = []
    for k, v in options:
        if k not in TOOL_KEYS:
            continue
        if k in _SWITCHES:
            if v == "true":
                argv.append(_SWITCHES[k])
        elif v:
            argv += [k, v]
    return argv


def ui_mcp_proxy(options: Sequence[tuple[str, str]]) -> bool:
    return any(k == "--ui-mcp-proxy" and v == "true" for k, v in options)


class ToolServer:
    """The helper llama-server. `port` is set while it answers `/health`."""

    def __init__(self, config: RouterConfig, spawner: OsLauncher, children: ChildClient) -> None:
        self.config = config
        self.args = tool_args(config.child_options)
        self._spawner = spawner
        self._children = children
        self.port: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._proc: asyncio.subprocess.Process | None = None
        self._dir: Path | None = None
        self._ready = asyncio.Event()

    @property
    def enabled(self) -> bool:
        return bool(self.args)

    async def start(self) -> None:
        """Start it and wait (bounded by the load timeout) until it answers; a helper that
        cannot start fails the router's start, as llama-server exits when its tools
        cannot be set up."""
        self._dir = Path(tempfile.mkdtemp(prefix="llamarouter-tools-"))
        (self._dir / "models").mkdir()
        (self._dir / "cache").mkdir()
        first: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._own(first), name="tool server")
        self._task.add_done_callback(self._done)
        error = await asyncio.wait_for(asyncio.shield(first), self.config.timeouts.load_stall + self.config.timeouts.spawn)
        if error is not None:
            await self.close()
            raise RuntimeError(f"the tools server (llama-server {' '.join(self.args)}) did not start: {error}")

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("the tools server's owner ended with an error: %r", task.exception(), exc_info=task.exception())

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            t = self.config.timeouts
            _, pending = await asyncio.wait([self._task], timeout=t.stop + t.reap + t.drain)
            for task in pending:
                task.cancel()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    async def _own(self, first: asyncio.Future[str | None]) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            started = time.monotonic()
            error = await self._life(first)
            if not first.done():
                first.set_result(error or "it exited")
                return
            if self._stop.is_set():
                return
            # Restart with backoff; a life that lasted a while starts the doubling afresh.
            backoff = 0.5 if time.monotonic() - started > _BACKOFF_MAX else min(backoff * 2, _BACKOFF_MAX)
            log.error("the tools server exited (%s); restarting in %.1fs", error, backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)
        if not first.done():
            first.set_result("the router is stopping")

    async def _life(self, first: asyncio.Future[str | None]) -> str | None:
        assert self._dir is not None
        t = self.config.timeouts
        port = self._spawner.free_port(CHILD_HOST)
        argv = [self.config.server_bin, "--models-dir", str(self._dir / "models"),
                "--host", CHILD_HOST, "--port", str(port), *self.args]
        env = dict(self.config.child_env)
        env["LLAMA_CACHE"] = str(self._dir / "cache")  # lists nothing, scans nothing
        proc = self._proc = await asyncio.wait_for(self._spawner.spawn_commanded(argv, env), t.spawn)
        log.info("tools server: %s", " ".join(argv))
        pumps = [asyncio.create_task(_log_lines(s)) for s in (proc.stdout, proc.stderr)]
        exited = asyncio.create_task(proc.wait())
        stopping = asyncio.create_task(self._stop.wait())
        try:
            if not await self._wait_healthy(port, exited, stopping):
                return f"exit code {proc.returncode}" if exited.done() else "no answer on /health"
            self.port = port
            if not first.done():
                first.set_result(None)
            await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            return None if stopping.done() else f"exit code {proc.returncode}"
        finally:
            self.port = None
            stopping.cancel()
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
                try:
                    await asyncio.wait_for(asyncio.shield(exited), t.stop)
                except TimeoutError:
                    self._spawner.kill_group(proc.pid)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(asyncio.shield(exited), t.reap)
            if proc.stdin is not None:
                proc.stdin.close()
            await asyncio.wait(pumps, timeout=t.drain)
            for task in (*pumps, exited):
                task.cancel()

    async def _wait_healthy(self, port: int, exited: asyncio.Task[int], stopping: asyncio.Task[bool]) -> bool:
        t = self.config.timeouts
        deadline = time.monotonic() + t.load_stall
        while time.monotonic() < deadline and not exited.done() and not stopping.done():
            if await self._children.health(port, t.health_timeout) == 200:
                return True
            await asyncio.wait({exited, stopping}, timeout=t.ready_poll * 5)
        return False


async def _log_lines(stream: asyncio.StreamReader | None) -> None:
    if stream is None:
        return
    while True:
        try:
            raw = await stream.readline()
        except ValueError:
            continue
        if not raw:
            return
        log.info("[tools] %s", raw.decode(errors="replace").rstrip())

