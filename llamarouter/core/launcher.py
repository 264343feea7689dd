"""The only module that touches the OS: spawn, signal, reap, ports, memory.

Everything above talks to a `Launcher`; unit tests replace it with a recording fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Protocol, cast

# Lines longer than this are cut rather than breaking the reader (llama-server prints
# whole prompts at high verbosity).
_LINE_LIMIT = 1 << 20
# The output pipe is grown to this where the OS allows (Linux's default is 64 KiB and an
# unprivileged process may go up to /proc/sys/fs/pipe-max-size, 1 MiB by default), so a
# ready child's log lines can wait in it between paced reads without its log thread
# blocking on a full pipe.
_PIPE_SIZE = 1 << 20
_PR_SET_PDEATHSIG = 1


class Child(Protocol):
    """A spawned child as process.py sees it."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    async def read_lines(self) -> list[bytes]:
        """The complete lines of output that have arrived (at least one), without their
        line ends; an empty list once the output has ended."""
        ...

    def hold_output(self, seconds: float) -> None:
        """Leave further output in the pipe for `seconds` (no reads, so no wakeups)."""
        ...

    def release_output(self) -> None:
        """Read the output at once from now on, holds included (the child has exited)."""
        ...

    def close_output(self) -> None:
        """Stop reading the output for good (a grandchild may keep the pipe open)."""
        ...


class Launcher(Protocol):
    async def spawn(self, argv: Sequence[str], env: Mapping[str, str]) -> Child: ...

    def terminate(self, child: Child) -> None: ...

    def kill(self, child: Child) -> None: ...

    def free_port(self, host: str) -> int: ...

    def rss_bytes(self, child: Child) -> int | None: ...


class _Output(asyncio.Protocol):
    """The read end of a child's stdout+stderr pipe, handed out a batch of lines at a time.

    llama-server logs about nine lines per request from its own log thread, one write each.
    Reading them one wakeup per line put the router's event loop to work right when a
    burst of requests was coming in and the child was computing on every core; `hold`
    lets a ready child's lines collect in the pipe and be read in one go.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._transport: asyncio.ReadTransport | None = None
        self._buf = bytearray()
        self._eof = False
        self._waiter: asyncio.Future[None] | None = None
        self._held: asyncio.TimerHandle | None = None
        self._released = False  # read at once from now on: the child is gone

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast("asyncio.ReadTransport", transport)

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._resume()  # only drops the timer: the transport is closed
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read_lines(self) -> list[bytes]:
        while True:
            end = self._buf.rfind(b"\n")
            if end >= 0:
                lines = bytes(self._buf[:end]).split(b"\n")
                del self._buf[: end + 1]
                return lines
            if len(self._buf) >= _LINE_LIMIT or (self._eof and self._buf):
                rest = bytes(self._buf[:_LINE_LIMIT])
                del self._buf[:_LINE_LIMIT]
                return [rest]
            if self._eof:
                return []
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def hold(self, seconds: float) -> None:
        transport = self._transport
        if (
            seconds <= 0 or self._held is not None or self._released
            or transport is None or transport.is_closing()
        ):
            return
        transport.pause_reading()
        self._held = self._loop.call_later(seconds, self._resume)

    def release(self) -> None:
        self._released = True
        self._resume()

    def _resume(self) -> None:
        """End a hold, if any (its timer fired, the output was released or closed)."""
        if self._held is None:
            return
        self._held.cancel()  # a no-op when the timer itself calls this
        self._held = None
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._resume()  # only drops the timer: the transport is closing
        self._eof = True
        self._wake()


class _AsyncioChild:
    def __init__(self, proc: asyncio.subprocess.Process, output: _Output) -> None:
        self._proc = proc
        self._output = output
        self.pid = proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        return await self._proc.wait()

    async def read_lines(self) -> list[bytes]:
        return await self._output.read_lines()

    def hold_output(self, seconds: float) -> None:
        self._output.hold(seconds)

    def release_output(self) -> None:
        self._output.release()

    def close_output(self) -> None:
        self._output.close()


def _nicer(step: int) -> None:
    """Lower the calling process's CPU priority by `step`: in a child before exec, so every
    thread it starts inherits it. Best effort, as every priority change here: a child that
    cannot be made nicer runs as it would have."""
    with contextlib.suppress(OSError):
        os.nice(step)


def _libc_prctl() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


class OsLauncher:
    """Real processes: each the leader of its own process group (so a signal reaches
    grandchildren too, and a terminal's Ctrl-C reaches the router alone) and, on Linux,
    a parent-death signal so that a SIGKILLed router takes its children with it.

    Children stay in the router's session, as upstream's router keeps its children.
    Where the kernel shares CPU time between sessions first and between threads second
    (autogroup, on hosts whose processes sit in the root cgroup), a child in a session
    of its own made the router's single thread wait for a CPU behind the child's compute
    threads whenever a burst of requests came in; in one session the router's thread and
    the child's threads are ranked against each other, and a child made nicer with
    `child_nice` ranks below the router's thread."""

    def __init__(self, child_nice: int = 0) -> None:
        self._prctl = _libc_prctl()
        self._nice = child_nice

    def _preexec(self, parent_pid: int) -> None:
        # Runs in the forked child before exec. If the router died between fork and prctl,
        # PDEATHSIG would never fire, hence the parent check.
        if self._prctl is not None:
            self._prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # type: ignore[operator]  # prctl comes from ctypes, untyped
            if os.getppid() != parent_pid:
                os._exit(1)
        os.setpgid(0, 0)  # the router's session, a group of its own
        if self._nice > 0:
            _nicer(self._nice)

    async def spawn(self, argv: Sequence[str], env: Mapping[str, str]) -> Child:
        parent = os.getpid()
        # Our own pipe rather than asyncio's: its read end is a plain read transport, which
        # can be paused (see _Output), and wait() stays about the process alone.
        read_fd, write_fd = os.pipe()
        setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
        if setsize is not None:
            with contextlib.suppress(OSError):
                fcntl.fcntl(read_fd, setsize, _PIPE_SIZE)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=write_fd,
                stderr=asyncio.subprocess.STDOUT,
                env=dict(env),
                preexec_fn=lambda: self._preexec(parent),
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        loop = asyncio.get_running_loop()
        pipe = os.fdopen(read_fd, "rb", buffering=0)
        try:
            _, output = await loop.connect_read_pipe(lambda: _Output(loop), pipe)
        except BaseException:
            pipe.close()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(BaseException):
                await proc.wait()  # the caller bounds spawn() with timeouts.spawn
            raise
        return _AsyncioChild(proc, output)

    async def spawn_commanded(self, argv: Sequence[str], env: Mapping[str, str]) -> asyncio.subprocess.Process:
        """A child that speaks llama-server's router-child protocol: commands to it on
        stdin (its end of stdin is how it knows the router is gone), its reports on stdout,
        its log on stderr. Same process group and parent-death rules as `spawn`."""
        parent = os.getpid()
        return await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=dict(env),
            preexec_fn=lambda: self._preexec(parent),
            limit=_LINE_LIMIT,
        )

    def kill_group(self, pid: int) -> None:
        """SIGKILL a child started by `spawn_commanded` and its group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)

    def _signal_group(self, child: Child, sig: int) -> None:
        if child.returncode is not None:
            return
        try:
            os.killpg(child.pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError:
            # The group leader may be gone while a grandchild keeps the group id busy
            # under another owner; fall back to the leader alone.
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, sig)

    def terminate(self, child: Child) -> None:
        self._signal_group(child, signal.SIGTERM)

    def kill(self, child: Child) -> None:
        self._signal_group(child, signal.SIGKILL)

    def free_port(self, host: str) -> int:
        # Another process may take the port before the child binds it; process.py retries
        # with a new port when the child reports a bind failure.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            return int(s.getsockname()[1])

    def rss_bytes(self, child: Child) -> int | None:
        import psutil  # only the dashboard's memory view asks: not loaded at rest (about 1 MiB)

        try:
            return int(psutil.Process(child.pid).memory_info().rss)
        except (psutil.Error, OSError):
            return None


def kill_leftover(pid: int, create_time: float) -> int:
    """SIGKILL what is left of a child a previous router instance started: the child
    itself and every member of its process group (a child is its group's leader).

    Pids get reused, so a process counts only if it belongs to that group and was started
    no earlier than the recorded child. A zombie is already dead: it is not counted, and
    it is reaped when it is ours (the router runs as PID 1 in a container, or as a
    subreaper, and adopted it). Returns how many processes were killed.
    """
    import psutil  # only with --state-dir, once at startup

    killed = 0
    for proc in psutil.process_iter(["pid", "create_time", "status"]):
        try:
            if os.getpgid(proc.pid) != pid:
                continue
            started = proc.info["create_time"]
            if started is None or started < create_time - 0.01:
                continue
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                _reap_if_ours(proc.pid)
                continue
            proc.kill()
            killed += 1
        except (psutil.Error, OSError):
            continue
    return killed


def _reap_if_ours(pid: int) -> None:
    # Only a parent can reap; for anyone else's zombie this fails at once and its own
    # parent (or init) collects it.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def process_create_time(pid: int) -> float | None:
    import psutil  # only with --state-dir

    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None
