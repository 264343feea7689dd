"""Start, track and always stop the server processes of a benchmark run.

Every process the harness starts goes through :class:`ProcessRegistry`. It remembers the
root process and, via periodic psutil snapshots, every descendant it has ever seen (the
routers' llama-server children). :meth:`ProcessRegistry.cleanup` is synchronous and safe to
call from a ``finally`` block: SIGTERM, bounded wait, SIGKILL, then the same for any
remembered descendant still alive (matched by pid *and* create time, so a recycled pid is
never touched), then a final check that reports anything left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

STOP_TIMEOUT_S = 15.0  # upstream's own child stop-timeout is 10 s
CHILD_GONE_TIMEOUT_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    name: str
    argv: list[str]
    port: int
    log_path: Path
    popen: subprocess.Popen[bytes]
    create_time: float
    # (pid, create_time) of every descendant ever seen
    seen: set[tuple[int, float]] = field(default_factory=set)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


class ProcessRegistry:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.servers: list[Server] = []
        self._stopped: list[Server] = []

    def start(self, name: str, argv: list[str], port: int, log_path: Path) -> Server:
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                # own session: a Ctrl-C in the terminal reaches the harness only, which then
                # stops everything in order from its finally block
                start_new_session=True,
            )
        try:
            ctime = psutil.Process(popen.pid).create_time()
        except psutil.Error:
            ctime = 0.0
        server = Server(name, argv, port, log_path, popen, ctime)
        self.servers.append(server)
        return server

    def snapshot(self) -> None:
        """Remember every current descendant of every live server."""
        for server in self.servers:
            if not server.alive():
                continue
            try:
                for child in psutil.Process(server.pid).children(recursive=True):
                    with contextlib.suppress(psutil.Error):
                        server.seen.add((child.pid, child.create_time()))
            except psutil.Error:
                pass

    def stop(self, server: Server) -> list[str]:
        """Stop one server and every descendant seen; returns problems (empty if clean)."""
        problems: list[str] = []
        self.snapshot()
        if server.alive():
            with contextlib.suppress(ProcessLookupError):
                server.popen.send_signal(signal.SIGTERM)
            try:
                server.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                problems.append(f"{server.name} (pid {server.pid}) ignored SIGTERM; killed")
                with contextlib.suppress(ProcessLookupError):
                    server.popen.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    server.popen.wait(5)
        deadline = time.monotonic() + CHILD_GONE_TIMEOUT_S
        while time.monotonic() < deadline and _alive(server.seen):
            time.sleep(0.05)
        for pid, ctime in _alive(server.seen):
            problems.append(f"{server.name}: child pid {pid} outlived it; killed")
            with contextlib.suppress(psutil.Error):
                p = psutil.Process(pid)
                if p.create_time() == ctime:
                    p.kill()
        if server in self.servers:
            self.servers.remove(server)
            self._stopped.append(server)
        return problems

    def cleanup(self) -> list[str]:
        """Stop everything still running; then verify nothing we started is alive."""
        problems: list[str] = []
        for server in list(self.servers):
            problems += self.stop(server)
        left = []
        for server in self._stopped:
            if server.alive():
                left.append(f"{server.name} pid {server.pid}")
            left += [f"{server.name} child pid {pid}" for pid, _ in _alive(server.seen)]
        if left:
            problems.append("still alive after cleanup: " + ", ".join(left))
        return problems

    def all_seen(self) -> int:
        return sum(1 + len(s.seen) for s in self._stopped + self.servers)


def _alive(seen: set[tuple[int, float]]) -> list[tuple[int, float]]:
    out = []
    for pid, ctime in seen:
        try:
            p = psutil.Process(pid)
            if p.create_time() == ctime and p.status() != psutil.STATUS_ZOMBIE:
                out.append((pid, ctime))
        except psutil.Error:
            pass
    return out


def rss_bytes(pid: int) -> int | None:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def machine_info() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": str(os.cpu_count()),
        "affinity": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "ram_gib": f"{psutil.virtual_memory().total / 2**30:.1f}",
    }
