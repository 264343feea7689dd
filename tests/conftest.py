"""Fixtures shared by every tier: a router started as a real subprocess; and the helpers
the router tests share (fake models, held-open streams, SSE events, children, metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.helpers import free_port, wait_for, write_fake_model, write_fake_server_bin

ROOT = Path(__file__).resolve().parent.parent


async def run_router_to_exit(*args: str, timeout: float) -> tuple[int, bytes]:
    """Run `llamarouter ARGS` until it exits by itself (killed after `timeout`, which then
    fails the caller's wait); its exit code and its output, stdout and stderr together."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "llamarouter", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=str(ROOT),
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out


@dataclass
class Router:
    proc: asyncio.subprocess.Process
    port: int
    log_path: Path
    session: aiohttp.ClientSession
    known_children: set[int] = field(default_factory=set)
    headers: dict[str, str] = field(default_factory=dict)  # sent with every helper request
    # The router's own model list: /models, or /llamarouter/models in -m/-hf mode, where
    # /models is the child's.
    models_path: str = "/models"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def children(self) -> list[psutil.Process]:
        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        self.known_children.update(k.pid for k in kids)
        return kids

    async def get(self, path: str, **kw: Any) -> tuple[int, Any]:
        kw["headers"] = {**self.headers, **kw.get("headers", {})}
        async with self.session.get(self.url + path, **kw) as resp:
            return resp.status, await _body(resp)

    async def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any]:
        if body is not None and "data" not in kw:
            kw["json"] = body
        kw["headers"] = {**self.headers, **kw.get("headers", {})}
        async with self.session.post(self.url + path, **kw) as resp:
            return resp.status, await _body(resp)

    async def models(self) -> dict[str, dict[str, Any]]:
        status, body = await self.get(self.models_path)
        assert status == 200, body
        return {m["id"]: m for m in body["data"]}

    async def status_of(self, name: str) -> str:
        return (await self.models())[name]["status"]["value"]

    async def wait_status(self, name: str, value: str, timeout: float = 15) -> dict[str, Any]:
        async def check() -> dict[str, Any] | None:
            item = (await self.models())[name]
            return item if item["status"]["value"] == value else None

        return await wait_for(check, timeout, interval=0.02, message=f"{name} to be {value}")

    async def chat(self, model: str, **extra: Any) -> tuple[int, Any]:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
        return await self.post("/v1/chat/completions", body)

    async def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.returncode is None:
            self.children()
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
                raise AssertionError(f"router did not exit within {timeout}s\n{self.log()[-3000:]}")
        return self.proc.returncode  # type: ignore[return-value]

    def leftover_children(self) -> list[int]:
        alive = []
        for pid in self.known_children:
            try:
                p = psutil.Process(pid)
                if p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        return alive


async def overlapping_streams(
    r: Router, body: dict[str, Any], stop: asyncio.Event, limit: int, lead: int,
    step_timeout: float = 30.0,
) -> list[tuple[int, bool]]:
    """Streamed requests (`body`) that overlap, two at a time: the next is sent once the one
    before it has ended and the current one has sent `lead` events, so the current one still
    has the rest of its stream to run while the next is admitted (make `lead` about half of
    its events). The model is never idle while this runs, unless the router holds the next
    one back. Runs until `stop` or `limit` requests; each stream's status and whether it
    ended with [DONE] (not cut)."""
    results: list[tuple[int, bool]] = []

    async def one(s: aiohttp.ClientSession, started: asyncio.Event) -> None:
        async with s.post(r.url + "/v1/chat/completions", json=body) as resp:
            done, events = False, 0
            async for line in resp.content:
                events += line.startswith(b"data: ")
                if events >= lead:
                    started.set()
                done = done or line.startswith(b"data: [DONE]")
            started.set()
            results.append((resp.status, done))

    async with aiohttp.ClientSession() as s:
        tasks: list[asyncio.Task[None]] = []
        for _ in range(limit):
            if stop.is_set():
                break
            started = asyncio.Event()
            tasks.append(asyncio.create_task(one(s, started)))
            await asyncio.wait_for(started.wait(), step_timeout)
            if len(tasks) > 1:  # at most two at a time: the one before this ends first
                await asyncio.wait_for(tasks[-2], step_timeout)
        await asyncio.wait_for(asyncio.gather(*tasks), step_timeout * 2)
    return results


async def _body(resp: aiohttp.ClientResponse) -> Any:
    raw = await resp.read()
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


StartRouter = Callable[..., Awaitable[Router]]


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    return write_fake_server_bin(tmp_path / "bin")


@pytest.fixture
async def start_router(tmp_path: Path, fake_bin: Path) -> AsyncIterator[StartRouter]:
    """Start `python -m llamarouter ARGS` on a free loopback port; stop it afterwards and
    check that no child outlived it."""
    routers: list[Router] = []
    session = aiohttp.ClientSession()

    async def start(
        *args: str,
        env: dict[str, str] | None = None,
        server_bin: Path | str | None = None,
        wait: bool = True,
        health_path: str = "/health",
    ) -> Router:
        port = free_port()
        cache = tmp_path / "hf-cache"
        cache.mkdir(exist_ok=True)
        full_env = dict(os.environ)
        full_env.pop("LLAMA_SERVER_DEBUG_FAKE_TIMING", None)  # only where a test asks for it
        # "{port}" in a value stands for the port chosen here (e.g. AIP_HTTP_PORT).
        full_env.update({"LLAMA_CACHE": str(cache), **{k: v.replace("{port}", str(port)) for k, v in (env or {}).items()}})
        argv = [sys.executable, "-m", "llamarouter", "--port", str(port)]
        argv += ["--server-bin", str(server_bin or fake_bin), *args]
        log_path = tmp_path / f"router-{port}.log"
        with open(log_path, "wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=log, stderr=asyncio.subprocess.STDOUT, env=full_env, cwd=str(ROOT)
            )
        router = Router(proc, port, log_path, session)
        routers.append(router)
        if wait:
            async def healthy() -> bool:
                if proc.returncode is not None:
                    raise AssertionError(f"router exited with {proc.returncode}:\n{router.log()}")
                async with session.get(router.url + health_path) as resp:
                    return resp.status == 200

            await wait_for(healthy, 20, interval=0.02, ignore=(aiohttp.ClientError,))
        return router

    try:
        yield start
    finally:
        for router in routers:
            await router.stop()
        await session.close()
        for router in routers:
            async def gone() -> bool:
                return not router.leftover_children()

            await wait_for(gone, 10, message="children of a stopped router to exit")


# ------------------------------------------------------------------ router test helpers
def make_models(tmp_path: Path, names: str, **knobs: object) -> Path:
    d = tmp_path / "models"
    for name in names.split():
        write_fake_model(d / f"{name}.gguf", **knobs)
    return d


@asynccontextmanager
async def open_stream(r: Router, model: str) -> AsyncIterator[aiohttp.ClientResponse]:
    """A streaming request held open (the model stays busy) until the block exits."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(r.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")
            yield resp


class Events:
    """Collects /models/sse events in the background."""

    def __init__(self, r: Router) -> None:
        self.r = r
        self.items: list[dict] = []
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()

    async def __aenter__(self) -> Events:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._connected.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        async with self.r.session.get(self.r.url + "/models/sse") as resp:
            self._connected.set()
            async for line in resp.content:
                if line.startswith(b"data: "):
                    self.items.append(json.loads(line[6:]))

    def spawns(self, model: str) -> int:
        return sum(1 for e in self.items if e["model"] == model and e["event"] == "model_status")

    def order(self, event: str, status: str) -> list[str]:
        return [
            e["model"] for e in self.items
            if e["event"] == event and e.get("data", {}).get("status") == status
        ]


def child_of(r: Router, name: str) -> psutil.Process | None:
    for proc in r.children():
        try:
            cmd = proc.cmdline()
        except psutil.Error:
            continue
        if "--alias" in cmd and cmd[cmd.index("--alias") + 1] == name:
            return proc
        # -m mode without --alias: the child gets no --alias, as a lone llama-server.
        if "--alias" not in cmd and "--model" in cmd and Path(cmd[cmd.index("--model") + 1]).stem == name:
            return proc
    return None


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(r: Router) -> Samples:
    async with r.session.get(r.url + "/metrics", headers=r.headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))
