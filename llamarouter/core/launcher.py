"""The only module that touches the OS: spawn, signal, reap, ports, memory.

Everything above talks to a `Launcher`; unit tests replace it with a recording fake.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Protocol

import psutil

# Lines longer than this are cut rather than breaking the reader (llama-server prints
# whole prompts at high verbosity).
_LINE_LIMIT = 1 << 20
_PR_SET_PDEATHSIG = 1


class Child(Protocol):
    """A spawned child as process.py sees it."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    async def readline(self) -> bytes: ...


class Launcher(Protocol):
    async def spawn(self, argv: Sequence[str], env: Mapping[str, str]) -> Child: ...

    def terminate(self, child: Child) -> None: ...

    def kill(self, child: Child) -> None: ...

    def free_port(self, host: str) -> int: ...

    def rss_bytes(self, child: Child) -> int | None: ...


class _AsyncioChild:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self.pid = proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        return await self._proc.wait()

    async def readline(self) -> bytes:
        stream = self._proc.stdout
        assert stream is not None
        try:
            return await stream.readline()
        except ValueError:
            # Line longer than the stream limit: drop what is buffered and carry on.
            with contextlib.suppress(asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                return await stream.read(_LINE_LIMIT) + b"\n"
            return b"\n"


def _libc_prctl() -> object | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


class OsLauncher:
    """Real processes: own session (so a signal reaches grandchildren too) and, on Linux,
    a parent-death signal so that a SIGKILLed router takes its children with it."""

    def __init__(self) -> None:
        self._prctl = _libc_prctl()

    def _preexec(self, parent_pid: int) -> None:
        # Runs in the forked child before exec. If the router died between fork and prctl,
        # PDEATHSIG would never fire, hence the parent check.
        if self._prctl is not None:
            self._prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # type: ignore[operator]  # prctl comes from ctypes, untyped
            if os.getppid() != parent_pid:
                os._exit(1)

    async def spawn(self, argv: Sequence[str], env: Mapping[str, str]) -> Child:
        parent = os.getpid()
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(env),
            start_new_session=True,
            preexec_fn=(lambda: self._preexec(parent)) if self._prctl is not None else None,
            limit=_LINE_LIMIT,
        )
        return _AsyncioChild(proc)

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
        try:
            return int(psutil.Process(child.pid).memory_info().rss)
        except (psutil.Error, OSError):
            return None


def kill_leftover(pid: int, create_time: float) -> int:
    """SIGKILL what is left of a child a previous router instance started: the child
    itself and every member of its process group (a child is its group's leader).

    Pids get reused, so a process counts only if it belongs to that group and was started
    no earlier than the recorded child. Returns how many processes were killed.
    """
    killed = 0
    for proc in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getpgid(proc.pid) != pid:
                continue
            started = proc.info["create_time"]
            if started is None or started < create_time - 0.01:
                continue
            proc.kill()
            killed += 1
        except (psutil.Error, OSError):
            continue
    return killed


def process_create_time(pid: int) -> float | None:
    try:
        return float(psutil.Process(pid).create_time())
    except psutil.Error:
        return None
