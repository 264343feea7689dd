"""`replicas = 2` with the real llama-server: concurrent chats are answered by both
children, a replica that crashes is restarted while the other serves on, and an idle
extra replica goes away."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.conftest import Router, StartRouter
from tests.fakes.helpers import wait_for
from tests.integration.conftest import TinyModels

pytestmark = pytest.mark.integration

# One slot per child: a second request in flight is what starts the second replica.
BASE = ("-c", "512", "-np", "1", "--metrics")


def _alpha_children(r: Router) -> list[psutil.Process]:
    return [
        k for k in r.children()
        if "llama-server" in k.name() and any(a.endswith("alpha.gguf") for a in k.cmdline())
    ]


def _port(child: psutil.Process) -> int:
    args = child.cmdline()
    return int(args[args.index("--port") + 1])


async def _predicted(port: int) -> float:
    """Tokens this child generated, from its own /metrics."""
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/metrics") as resp:
        text = await resp.text()
    found = re.search(r"^llamacpp:tokens_predicted_total (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def _start(tmp_path: Path, tiny: TinyModels, server: Path, start: StartRouter, *extra: str) -> Router:
    preset = tmp_path / "presets.ini"
    preset.write_text(f"[alpha]\nmodel = {tiny.alpha}\nreplicas = 2\nreplica-ttl = 3\n")
    return await start("--models-preset", str(preset), "--models-max", "3", *BASE, *extra, server_bin=server)


async def test_48_concurrent_chats_are_answered_by_both_replicas(
    tmp_path: Path, tiny_models: TinyModels, llama_server_bin: Path, start_router: StartRouter,
) -> None:
    r = await _start(tmp_path, tiny_models, llama_server_bin, start_router)
    results = await asyncio.gather(*(r.chat("alpha", max_tokens=24) for _ in range(48)))
    assert [status for status, _ in results] == [200] * 48
    kids = _alpha_children(r)
    assert len(kids) == 2, [k.cmdline() for k in kids]
    predicted = [await _predicted(_port(k)) for k in kids]
    assert all(n > 0 for n in predicted), predicted  # each child did work
    item = (await r.models())["alpha"]
    replicas = item["replicas"]
    assert [x["replica"] for x in replicas] == [1, 2]
    assert {x["port"] for x in replicas} == {_port(k) for k in kids}
    status, memory = await r.get("/memory")
    assert status == 200 and {"alpha", "alpha#2"} <= set(memory["models"]), memory  # each child's memory


async def test_a_crashed_replica_is_restarted_while_the_other_serves_and_idle_extras_go(
    tmp_path: Path, tiny_models: TinyModels, llama_server_bin: Path, start_router: StartRouter,
) -> None:
    r = await _start(tmp_path, tiny_models, llama_server_bin, start_router)
    await asyncio.gather(*(r.chat("alpha", max_tokens=32) for _ in range(8)))
    await wait_for(lambda: len(_alpha_children(r)) == 2, 30, message="two alpha children")
    item = (await r.models())["alpha"]
    second = next(x for x in item["replicas"] if x["replica"] == 2)
    victim = next(k for k in _alpha_children(r) if _port(k) == second["port"])
    victim.kill()
    # The other child serves on while the crashed one comes back.
    status, _ = await r.chat("alpha", max_tokens=4)
    assert status == 200

    async def restarted() -> bool:
        replicas = (await r.models())["alpha"]["replicas"]
        return any(x["replica"] == 2 and x["restarts"] == 1 for x in replicas)

    await wait_for(restarted, 30, message="replica 2 to be restarted")
    await wait_for(lambda: len(_alpha_children(r)) == 2, 30, message="replica 2's new child")

    # Idle past its replica-ttl (3 s), the extra child stops; the first one stays.
    async def extra_gone() -> bool:
        replicas = (await r.models())["alpha"]["replicas"]
        return [x["status"] for x in replicas] == ["loaded", "unloaded"]

    await wait_for(extra_gone, 30, interval=0.2, message="the idle extra replica to stop")
    assert len(_alpha_children(r)) == 1


async def test_each_replica_keeps_its_own_slot_caches(
    tmp_path: Path, tiny_models: TinyModels, llama_server_bin: Path, start_router: StartRouter,
) -> None:
    kv = tmp_path / "kv"
    preset = tmp_path / "presets.ini"
    preset.write_text(f"[alpha]\nmodel = {tiny_models.alpha}\nreplicas = 2\nkeep-cache = true\n")
    r = await start_router(
        "--models-preset", str(preset), "--models-max", "3", "--keep-cache-dir", str(kv), "--no-watch",
        *BASE, server_bin=llama_server_bin,
    )

    async def two_at_once() -> None:
        """One request on each child: a stream holds the first child's only slot while a
        second request waits for (and is served by) the second child."""
        body = {"model": "alpha", "prompt": "a story about a river " * 5, "n_predict": 400, "cache_prompt": True}
        async with aiohttp.ClientSession() as s, \
                s.post(r.url + "/completion", json={**body, "stream": True}) as streamed:
            assert streamed.status == 200
            await streamed.content.readuntil(b"\n\n")  # the stream holds its slot now
            status, reply = await r.post("/completion", {**body, "n_predict": 8})
            assert status == 200, reply
            await streamed.read()

    await two_at_once()  # one slot each: the second request starts the second child
    assert len(_alpha_children(r)) == 2
    status, body = await r.post("/models/unload", {"model": "alpha"})
    assert status == 200, body
    await wait_for(lambda: _alpha_children(r) == [], 30, interval=0.1, message="both children to stop")
    saved = sorted(p.parent.name.split("-")[0] for p in kv.glob("*/*") if not p.name.endswith(".json"))
    assert saved == ["alpha", "alpha_2"], (saved, r.log()[-3000:])  # a directory each
    await two_at_once()
    _, metrics = await r.get("/metrics")
    restores = re.search(r'^llamarouter_keep_cache_operations_total\{operation="restore"\} (\S+)$', metrics, re.MULTILINE)
    assert restores is not None and float(restores.group(1)) == 2.0, metrics[-2000:]
