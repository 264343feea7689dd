"""Downloads (`POST /models`) and removals (`DELETE /models`) with the real llama-server,
against a local stand-in for the Hugging Face hub (tests/fakes/fake_hub.py) on a loopback
port, and side by side with upstream's router for the same requests.

About 40 s in all on 2 cores: the hub-dying case waits out llama.cpp's own retries (2 s
then 4 s), the rest are tiny generated GGUF files.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import pytest

from llamarouter.devtools.tinymodel import write_model
from tests.conftest import Router, StartRouter
from tests.fakes.fake_hub import FakeHub
from tests.fakes.helpers import free_port, wait_for
from tests.integration.conftest import StartPair, TinyModels

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

BASE_ARGS = ("-c", "512", "-np", "1")
REPO = "test-org/tiny-model"
NAME = REPO + ":F16"
FILE = "tiny-model-F16.gguf"
TOKEN = "hf_" + "a1" * 20  # the shape llama.cpp accepts as a token (hf_ + 34 or more alnum)


@pytest.fixture(scope="module")
def gguf_f16(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("hub-files") / FILE
    write_model(path, ftype="f16", seed=7)
    return path.read_bytes()


@pytest.fixture
async def hub() -> AsyncIterator[FakeHub]:
    h = await FakeHub().start()
    try:
        yield h
    finally:
        await h.stop()


class Sse:
    """/models/sse of a router, collected from the moment its headers arrive (so events
    of anything done after `async with` are all seen)."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.events: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None
        self._resp: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> Sse:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        self._resp = await self.router.session.get(self.router.url + "/models/sse", timeout=timeout)
        assert self._resp.status == 200
        self._task = asyncio.create_task(self._read(self._resp))
        return self

    async def _read(self, resp: aiohttp.ClientResponse) -> None:
        async for raw in resp.content:
            line = raw.decode().strip()
            if line.startswith("data: "):
                self.events.append(json.loads(line[6:]))

    async def __aexit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
                await self._task
        if self._resp is not None:
            self._resp.close()

    def of(self, event: str, model: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event and e.get("model") == model]

    async def wait(self, event: str, model: str, timeout: float) -> dict[str, Any]:
        async def seen() -> dict[str, Any] | None:
            found = self.of(event, model)
            return found[0] if found else None

        return await wait_for(seen, timeout, interval=0.02, message=f"{event} for {model} on /models/sse")


async def delete(router: Router, name: str) -> tuple[int, Any]:
    async with router.session.delete(router.url + "/models", params={"model": name}) as resp:
        return resp.status, json.loads(await resp.read())


def cache_of(router_tmp: Path) -> Path:
    return router_tmp / "hf-cache"  # where tests/conftest.py's start_router points LLAMA_CACHE


def partial_files(cache: Path) -> list[str]:
    return [str(p) for p in cache.rglob("*") if p.name.endswith(".downloadInProgress")]


async def test_download_then_serve_then_delete(
    start_router: StartRouter, llama_server_bin: Path, tiny_models: TinyModels, hub: FakeHub,
    gguf_f16: bytes, tmp_path: Path,
) -> None:
    hub.add(REPO, {FILE: gguf_f16, "README.md": b"# tiny\n"})
    router = await start_router(
        "--models-dir", str(tiny_models.dir), "--models-max", "1", *BASE_ARGS,
        server_bin=llama_server_bin, env={"MODEL_ENDPOINT": hub.url, "HF_TOKEN": TOKEN},
    )
    assert (await router.post("/models/load", {"model": "alpha"}))[0] == 200
    await router.wait_status("alpha", "loaded", timeout=30)
    async with Sse(router) as sse:
        status, body = await router.post("/models", {"model": NAME})
        assert (status, body) == (200, {"success": True})
        await sse.wait("download_finished", NAME, 30)
        progress = sse.of("download_progress", NAME)
        assert sse.of("download_failed", NAME) == []
    assert progress, sse.events
    last = progress[-1]["data"]["progress"]
    [(url, counts)] = last.items()
    assert url.startswith(hub.url) and url.endswith("/" + FILE), url
    assert counts == {"done": len(gguf_f16), "total": len(gguf_f16)}
    # Listed as soon as download_finished is out; the download took no --models-max slot.
    models = await router.models()
    assert models[NAME]["source"] == "cache" and models[NAME]["can_remove"] is True
    assert models[NAME]["status"]["value"] == "unloaded"
    assert models["alpha"]["status"]["value"] == "loaded"
    # The binary's own hub client did the work, with HF_TOKEN.
    assert any(s.headers.get("Authorization") == "Bearer " + TOKEN for s in hub.requests)
    assert partial_files(cache_of(tmp_path)) == []
    # The downloaded model serves.
    status, reply = await router.chat(NAME, max_tokens=2)
    assert status == 200, reply
    # DELETE stops it and removes its files; it leaves the listing.
    async with Sse(router) as sse:
        assert await delete(router, NAME) == (200, {"success": True})
        await sse.wait("model_remove", NAME, 10)
    assert NAME not in await router.models()

    async def stopped() -> bool:  # its child was stopped (alpha was evicted for it earlier)
        return router.children() == []

    await wait_for(stopped, 20, message="the removed model's child to stop")
    folder = cache_of(tmp_path) / "models--test-org--tiny-model"
    assert not list((folder / "snapshots").rglob("*.gguf"))
    assert not list((folder / "blobs").iterdir())
    # Deleting again: upstream's not-found error.
    status, body = await delete(router, NAME)
    assert status == 500 and body["error"]["message"] == f"model name={NAME} is not found"


async def test_failed_downloads_leave_nothing(
    start_router: StartRouter, llama_server_bin: Path, tiny_models: TinyModels, hub: FakeHub,
    gguf_f16: bytes, tmp_path: Path,
) -> None:
    """Unknown repo and unknown quant: a 400 with the downloader's reason, before any
    byte; a hub that drops every transfer part-way: download_failed after llama.cpp's
    retries. The cache is left as it was each time."""
    repo = hub.add(REPO, {FILE: gguf_f16})
    repo.drop_after[FILE] = len(gguf_f16) // 2
    router = await start_router(
        "--models-dir", str(tiny_models.dir), *BASE_ARGS,
        server_bin=llama_server_bin, env={"MODEL_ENDPOINT": hub.url},
    )
    cache = cache_of(tmp_path)
    status, body = await router.post("/models", {"model": "test-org/no-such-repo:F16"})
    assert status == 400, body
    assert "404" in body["error"]["message"] and "Repository not found" in body["error"]["message"], body
    status, body = await router.post("/models", {"model": REPO + ":Q4_K_M"})
    assert status == 400, body
    assert "no GGUF files found" in body["error"]["message"], body
    assert list(cache.iterdir()) == []
    async with Sse(router) as sse:
        status, body = await router.post("/models", {"model": NAME})
        assert (status, body) == (200, {"success": True})  # it began: bytes came
        failed = await sse.wait("download_failed", NAME, 40)
    assert failed["data"]["error"], failed
    assert sse.of("download_progress", NAME)
    assert sse.of("download_finished", NAME) == []
    assert list(cache.iterdir()) == [], list(cache.rglob("*"))
    assert NAME not in await router.models()
    # Bad names are refused before a child is started.
    for bad in ({"model": ""}, {"model": 5}, {}, {"model": "no-slash"}):
        status, body = await router.post("/models", bad)
        assert status == 400, (bad, body)


async def test_unreachable_hub_is_a_clear_error(
    start_router: StartRouter, llama_server_bin: Path, tmp_path: Path,
) -> None:
    router = await start_router(*BASE_ARGS, server_bin=llama_server_bin,
                                env={"MODEL_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    status, body = await router.post("/models", {"model": NAME})
    assert status == 400, body
    assert "HTTPLIB failed" in body["error"]["message"], body
    assert list(cache_of(tmp_path).iterdir()) == []


async def test_download_cut_by_stall_and_by_sigterm(
    start_router: StartRouter, llama_server_bin: Path, tiny_models: TinyModels, hub: FakeHub,
    gguf_f16: bytes, tmp_path: Path,
) -> None:
    """A hub that stops sending: --download-timeout cancels the download; SIGTERM during
    another one ends the router in its stop bound. Neither leaves a partial file."""
    repo = hub.add(REPO, {FILE: gguf_f16})
    repo.stall_after[FILE] = len(gguf_f16) // 3
    router = await start_router(
        "--models-dir", str(tiny_models.dir), *BASE_ARGS, "--download-timeout", "2",
        server_bin=llama_server_bin, env={"MODEL_ENDPOINT": hub.url},
    )
    cache = cache_of(tmp_path)
    async with Sse(router) as sse:
        assert (await router.post("/models", {"model": NAME}))[0] == 200
        failed = await sse.wait("download_failed", NAME, 20)
    assert "no progress for 2 s" in failed["data"]["error"], failed
    assert list(cache.iterdir()) == [], list(cache.rglob("*"))
    # Listed while it runs, then cancelled by SIGTERM.
    async with Sse(router) as sse:
        assert (await router.post("/models", {"model": NAME}))[0] == 200
        await sse.wait("download_progress", NAME, 20)
        assert (await router.models())[NAME]["status"]["value"] == "downloading"
        assert list(cache.rglob("*.downloadInProgress"))
        router.children()
        assert await router.stop(signal.SIGTERM, timeout=20) == 0
    assert list(cache.iterdir()) == [], list(cache.rglob("*"))
    assert router.leftover_children() == []


async def test_unload_cancels_a_download(
    start_router: StartRouter, llama_server_bin: Path, hub: FakeHub, gguf_f16: bytes, tmp_path: Path,
) -> None:
    repo = hub.add(REPO, {FILE: gguf_f16})
    repo.stall_after[FILE] = len(gguf_f16) // 3
    router = await start_router(*BASE_ARGS, server_bin=llama_server_bin, env={"MODEL_ENDPOINT": hub.url})
    async with Sse(router) as sse:
        assert (await router.post("/models", {"model": NAME}))[0] == 200
        await sse.wait("download_progress", NAME, 20)
        # A second download of the same model, or a load of it, while it runs.
        status, body = await router.post("/models", {"model": NAME})
        assert status == 400 and body["error"]["message"] == f"model '{NAME}' already exists"
        # Not a model until its files are in: a load answers as for an unknown model.
        status, body = await router.post("/models/load", {"model": NAME})
        assert status == 404, body
        assert (await router.post("/models/unload", {"model": NAME})) == (200, {"success": True})
        failed = await sse.wait("download_failed", NAME, 10)
    assert failed["data"]["error"] == "cancelled (unloaded)"
    assert NAME not in await router.models()
    assert list(cache_of(tmp_path).iterdir()) == []


async def test_download_and_delete_side_by_side(
    start_pair: StartPair, hub: FakeHub, gguf_f16: bytes, tiny_models: TinyModels,
) -> None:
    """The same requests to upstream's router and to llamarouter: the same answers and
    events for a download and a delete. A repo that does not exist is where the two
    differ (documented): upstream answers 200 and then download_finished with nothing
    downloaded; llamarouter answers 400 with the hub's reason."""
    hub.add(REPO, {FILE: gguf_f16})
    pair = await start_pair("--models-dir", str(tiny_models.dir), *BASE_ARGS, env={"MODEL_ENDPOINT": hub.url})
    for who, router in pair.both():
        async with Sse(router) as sse:
            status, body = await router.post("/models", {"model": NAME})
            assert (status, body) == (200, {"success": True}), who
            await sse.wait("download_finished", NAME, 30)
            assert sse.of("download_progress", NAME), (who, sse.events)
            assert sse.of("download_failed", NAME) == [], who
        item = (await router.models())[NAME]
        assert (item["source"], item["can_remove"], item["status"]["value"]) == ("cache", True, "unloaded"), who
        status, body = await router.post("/models", {"model": NAME})
        assert status == 400 and body["error"] == {
            "code": 400, "message": f"model '{NAME}' already exists", "type": "invalid_request_error",
        }, (who, body)
        assert await delete(router, NAME) == (200, {"success": True}), who
        assert NAME not in await router.models(), who
        status, body = await delete(router, NAME)
        assert status == 500 and body["error"]["message"] == f"model name={NAME} is not found", (who, body)
        status, body = await delete(router, "alpha")
        assert status == 500, (who, body)
        assert body["error"]["message"] == "model name=alpha is not removable (not from cache)", (who, body)
    # The documented difference.
    async with Sse(pair.upstream) as sse:
        assert (await pair.upstream.post("/models", {"model": "test-org/nothing:F16"}))[0] == 200
        await sse.wait("download_finished", "test-org/nothing:F16", 30)
    assert "test-org/nothing:F16" not in await pair.upstream.models()
    status, body = await pair.ours.post("/models", {"model": "test-org/nothing:F16"})
    assert status == 400 and "Repository not found" in body["error"]["message"], body
    assert os.environ.get("MODEL_ENDPOINT") is None  # the hub reached both only through env=


PRESET_REPO = "test-org/preset-repo"


async def test_remote_preset_side_by_side(
    start_pair: StartPair, start_router: StartRouter, llama_server_bin: Path, hub: FakeHub, gguf_f16: bytes,
    tiny_models: TinyModels,
) -> None:
    """`-hf REPO` where the repo holds a preset.ini: both routers start in router mode
    with the preset's models, and a model of it (itself on the hub) loads and serves."""
    hub.add(REPO, {FILE: gguf_f16})
    preset = (
        f"[tiny-preset]\nhf-repo = {NAME}\nctx-size = 512\n\n"
        f"[alpha-local]\nmodel = {tiny_models.alpha}\nctx-size = 512\n"
    )
    hub.add(PRESET_REPO, {"preset.ini": preset.encode(), "README.md": b"presets\n"})
    pair = await start_pair("-hf", PRESET_REPO, "-np", "1", env={"MODEL_ENDPOINT": hub.url})
    for who, router in pair.both():
        ids = set(await router.models())
        assert {"tiny-preset", "alpha-local"} <= ids, (who, ids)
        status, body = await router.post("/models/load", {"model": "tiny-preset"})
        assert (status, body) == (200, {"success": True}), who
        await router.wait_status("tiny-preset", "loaded", timeout=40)
        status, reply = await router.chat("tiny-preset", max_tokens=2)
        assert status == 200, (who, reply)
    # --offline with the hub gone: the cached preset still makes a router, as llama-server does.
    await hub.stop()
    offline = await start_router("-hf", PRESET_REPO, "-np", "1", "--offline", server_bin=llama_server_bin,
                                 env={"MODEL_ENDPOINT": hub.url})
    assert {"tiny-preset", "alpha-local"} <= set(await offline.models())


async def test_hf_model_repo_stays_single_model(
    start_router: StartRouter, llama_server_bin: Path, hub: FakeHub, gguf_f16: bytes, tmp_path: Path,
) -> None:
    """`-hf REPO:QUANT` of a model repo: single-model mode as before (the preset check
    stops as soon as the binary starts on a model file), and the model serves."""
    hub.add(REPO, {FILE: gguf_f16})
    router = await start_router(
        "-hf", NAME, *BASE_ARGS, server_bin=llama_server_bin, env={"MODEL_ENDPOINT": hub.url},
    )
    status, reply = await router.chat(NAME, max_tokens=2)
    assert status == 200, reply
    status, props = await router.get("/props")
    assert status == 200 and props.get("role") != "router", props
    assert partial_files(cache_of(tmp_path)) == []
