"""Supervision end to end with the real llama-server and generated GGUF models."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.conftest import StartRouter, child_of, run_router_to_exit
from tests.fakes.helpers import wait_for
from tests.integration.conftest import TinyModels

pytestmark = pytest.mark.integration

BASE = ("-c", "512", "-np", "2")


async def test_kill_9_real_child_mid_stream(
    tiny_models: TinyModels, llama_server_bin: Path, start_router: StartRouter
) -> None:
    r = await start_router("--models-dir", str(tiny_models.dir), *BASE, server_bin=llama_server_bin)
    assert (await r.chat("beta", max_tokens=1))[0] == 200
    body = {"stream": True, "max_tokens": 400, "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(r.url + "/v1/chat/completions", json={**body, "model": "alpha"}) as ra, \
                s.post(r.url + "/v1/chat/completions", json={**body, "model": "beta", "max_tokens": 50}) as rb:
            assert ra.status == 200 and rb.status == 200
            await ra.content.readuntil(b"\n\n")
            victim = child_of(r, "alpha")
            assert victim is not None and "llama-server" in victim.name()
            victim.kill()
            events_a = [e for e in (await asyncio.wait_for(ra.read(), 10)).split(b"\n\n") if e]
            events_b = [e for e in (await rb.read()).split(b"\n\n") if e]
    # alpha's stream either finished before the kill landed or ends with our error event.
    if events_a[-1] != b"data: [DONE]":
        assert "error" in json.loads(events_a[-1][len(b"data: "):])
    assert events_b[-1] == b"data: [DONE]"
    status, reply = await r.chat("alpha", max_tokens=4)
    assert status == 200 and reply["usage"]["completion_tokens"] == 4


async def test_router_sigkill_takes_real_children_down(
    tiny_models: TinyModels, llama_server_bin: Path, start_router: StartRouter
) -> None:
    r = await start_router("--models-dir", str(tiny_models.dir), *BASE, server_bin=llama_server_bin)
    await asyncio.gather(r.chat("alpha", max_tokens=1), r.chat("beta", max_tokens=1))
    kids = [k for k in r.children() if "llama-server" in k.name()]
    assert len(kids) == 2
    await r.stop(signal.SIGKILL)

    def gone() -> bool:
        return not any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids)

    await wait_for(gone, 5, message="llama-server children to die with the router")


async def test_eviction_with_real_children(
    tiny_models: TinyModels, llama_server_bin: Path, start_router: StartRouter
) -> None:
    r = await start_router(
        "--models-dir", str(tiny_models.dir), "--models-max", "1", *BASE, server_bin=llama_server_bin
    )
    for name in ("alpha", "beta", "split", "alpha"):
        status, reply = await r.chat(name, max_tokens=2)
        assert status == 200, reply
        models = await r.models()
        assert [m for m, item in models.items() if item["status"]["value"] == "loaded"] == [name]
    assert len([k for k in r.children() if "llama-server" in k.name()]) == 1


async def test_single_model_mode_with_a_missing_file_exits_like_llama_server(
    tmp_path: Path, llama_server_bin: Path
) -> None:
    # llama-server exits with 1 when it cannot load its model; so does the router, with
    # the child's own reason, instead of staying up to answer 503.
    missing = tmp_path / "nope.gguf"
    rc, out = await run_router_to_exit(
        "-m", str(missing), "--port", "0", "--host", "127.0.0.1", "--server-bin", str(llama_server_bin), *BASE,
        timeout=60,
    )
    assert rc == 1, out
    line = next(x for x in out.decode(errors="replace").splitlines() if "exiting, as llama-server does" in x)
    assert "model name=nope" in line and "cause:" in line, line
