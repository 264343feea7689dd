"""A scripted launcher and probe: children without processes or sockets.

Each model has a `Script` (how its children behave); tests change scripts as they go.
Time is the event loop's: a child becomes ready `load_secs` after its spawn.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from llamarouter.core.supervisor import Supervisor
from llamarouter.settings.config import Limits, ModelSpec, RouterConfig, Timeouts


@dataclass
class Script:
    load_secs: float = 0.0
    crash_on_start: bool = False  # exits right after spawn
    hang_health: bool = False  # /health never answers (a stalled load, or a hung child)
    ignore_term: bool = False  # SIGTERM does nothing; only SIGKILL ends it
    info_delay: float = 0.0  # /v1/models is slow
    spawn_error: bool = False  # the binary cannot be started


class FakeChild:
    def __init__(self, pid: int, name: str, port: int, script: Script) -> None:
        self.pid = pid
        self.name = name
        self.port = port
        self.script = Script(**vars(script))  # a child keeps the script it started with
        self.started = asyncio.get_running_loop().time()
        self._rc: int | None = None
        self._exited = asyncio.Event()
        self._lines: asyncio.Queue[bytes] = asyncio.Queue()
        self._lines.put_nowait(b"fake: loading model\n")
        self.holds: list[float] = []
        self.argv: list[str] = []
        self.env: dict[str, str] = {}
        self.output_calls: list[str] = []

    @property
    def returncode(self) -> int | None:
        return self._rc

    async def wait(self) -> int:
        await self._exited.wait()
        assert self._rc is not None
        return self._rc

    async def read_lines(self) -> list[bytes]:
        if self._rc is not None and self._lines.empty():
            return []
        lines = [await self._lines.get()]
        while not self._lines.empty():
            lines.append(self._lines.get_nowait())
        if lines[-1] == b"":  # the end marker of exit()
            lines.pop()
            if not lines:
                return []
            self._lines.put_nowait(b"")
        return [line.rstrip(b"\n") for line in lines]

    def say(self, line: bytes) -> None:
        """The child prints a line."""
        self._lines.put_nowait(line + b"\n")

    def hold_output(self, seconds: float) -> None:
        self.holds.append(seconds)
        self.output_calls.append("hold")

    def release_output(self) -> None:
        self.output_calls.append("release" if self._rc is not None else "release before exit")

    def close_output(self) -> None:
        self.output_calls.append("close")

    def exit(self, code: int) -> None:
        if self._rc is None:
            self._rc = code
            self._exited.set()
            self._lines.put_nowait(b"")

    def ready(self, now: float) -> bool:
        if self.script.crash_on_start:
            return False
        return now - self.started >= self.script.load_secs


class FakeLauncher:
    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.children: list[FakeChild] = []
        self._pids = itertools.count(1000)
        self._ports = itertools.count(20000)

    def script(self, name: str) -> Script:
        return self.scripts.setdefault(name, Script())

    async def spawn(self, argv: Sequence[str], env: Mapping[str, str]) -> FakeChild:
        name, port = argv[0], int(argv[1])
        script = self.script(name)
        if script.spawn_error:
            raise OSError(2, "No such file or directory")
        child = FakeChild(next(self._pids), name, port, script)
        child.argv, child.env = list(argv), dict(env)  # what it was told (placement: its devices)
        self.children.append(child)
        if script.crash_on_start:
            asyncio.get_running_loop().call_soon(child.exit, 1)
        return child

    def terminate(self, child: Any) -> None:
        if not child.script.ignore_term:
            asyncio.get_running_loop().call_soon(child.exit, -15)

    def kill(self, child: Any) -> None:
        asyncio.get_running_loop().call_soon(child.exit, -9)

    def free_port(self, host: str) -> int:
        return next(self._ports)

    def rss_bytes(self, child: Any) -> int | None:
        return None

    def alive(self, name: str | None = None) -> list[FakeChild]:
        return [c for c in self.children if c.returncode is None and (name is None or c.name == name)]

    def by_port(self, port: int) -> FakeChild | None:
        for child in reversed(self.children):
            if child.port == port:
                return child
        return None


class FakeProbe:
    def __init__(self, launcher: FakeLauncher) -> None:
        self._launcher = launcher

    async def health(self, port: int, timeout: float) -> int | None:
        child = self._launcher.by_port(port)
        if child is None or child.returncode is not None:
            return None
        if child.script.hang_health:
            await asyncio.sleep(timeout)
            return None
        return 200 if child.ready(asyncio.get_running_loop().time()) else 503

    async def canary(self, port: int, timeout: float) -> bool:
        child = self._launcher.by_port(port)
        return child is not None and child.returncode is None and not child.script.hang_health

    async def info(self, port: int, timeout: float) -> dict[str, Any]:
        child = self._launcher.by_port(port)
        if child is not None and child.script.info_delay:
            await asyncio.sleep(min(child.script.info_delay, timeout))
        return {"id": child.name if child else "?"}


FAST = Timeouts(
    stop=0.05, load_stall=0.5, ready_poll=0.005, hint_poll=0.001, hint_window=0.05,
    health_interval=0.05, health_timeout=0.03, health_failures=2, backoff_initial=0.01,
    backoff_max=0.05, tick=0.05, reap=0.2, drain=0.1, spawn=0.2, info=0.1,
)


def fast_config(models_max: int = 2, **limits: Any) -> RouterConfig:
    base = dict(models_max=models_max, restart_max=3, restart_window=60.0, failed_holdoff=0.3)
    base.update(limits)
    return RouterConfig(timeouts=FAST, limits=Limits(**base))  # type: ignore[arg-type]


def make_supervisor(
    specs: dict[str, ModelSpec], config: RouterConfig, launcher: FakeLauncher,
) -> Supervisor:
    return Supervisor(
        config, lambda: dict(specs), launcher, FakeProbe(launcher),
        lambda spec, port: [spec.name, str(port)],
    )


def spec(name: str, **kw: Any) -> ModelSpec:
    return ModelSpec(name=name, source="models_dir", **kw)
