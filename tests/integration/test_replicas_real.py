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
    # Idle past its replica-ttl (3 s), the extra child stops; the first one stays.
    await wait_for(lambda: len(_alpha_children(r)) == 1, 30, interval=0.2, message="the idle extra replica to stop")
    replicas = (await r.models())["alpha"]["replicas"]
    assert [x["status"] for x in replicas] == ["loaded", "unloaded"]
