"""Tiered idle (llama-server's own sleep under the router) and the canary probe, with the
real llama-server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llamarouter.core.childclient import ChildClient
from tests.conftest import Router, StartRouter
from tests.fakes.helpers import wait_for, write_fake_model
from tests.integration.conftest import TinyModels

pytestmark = pytest.mark.integration


def child_port(item: dict[str, Any]) -> int:
    args: list[str] = item["status"]["args"]
    return int(args[args.index("--port") + 1])


async def load(router: Router, name: str) -> None:
    status, body = await router.post("/completion", {"model": name, "prompt": "hi", "n_predict": 1})
    assert status == 200, body


@pytest.mark.parametrize("how", ["flag", "preset"])
async def test_sleeping_model_shows_sleeping_and_wakes_on_a_request(
    start_router: StartRouter, llama_server_bin: Path, tiny_models: TinyModels, tmp_path: Path, how: str,
) -> None:
    if how == "flag":
        args = ("--sleep-idle", "1")
    else:
        preset = tmp_path / "models.ini"
        preset.write_text("[alpha]\nsleep-idle = 1\n")
        args = ("--models-preset", str(preset))
    router = await start_router("--models-dir", str(tiny_models.dir), "--no-watch", *args,
                                server_bin=llama_server_bin)
    await load(router, "alpha")
    item = await router.wait_status("alpha", "sleeping", timeout=30)
    argv = item["status"]["args"]
    assert argv[argv.index("--sleep-idle-seconds") + 1] == "1"
    async with aiohttp.ClientSession() as session:
        assert await ChildClient(session).sleeping(child_port(item), 5) is True
        # A request wakes it: the router forwards to the running child, no new load.
        await load(router, "alpha")
        awake = (await router.models())["alpha"]
        assert child_port(awake) == child_port(item)
        assert awake["status"]["value"] in ("loaded", "sleeping")  # may doze off again at once
    if how == "preset":
        # Only the model whose preset asks for it sleeps.
        await load(router, "beta")
        beta = (await router.models())["beta"]
        assert "--sleep-idle-seconds" not in beta["status"]["args"]


async def test_awake_model_is_not_sleeping(
    start_router: StartRouter, llama_server_bin: Path, tiny_models: TinyModels,
) -> None:
    router = await start_router("--models-dir", str(tiny_models.dir), "--no-watch", server_bin=llama_server_bin)
    await load(router, "alpha")
    item = await router.wait_status("alpha", "loaded")
    async with aiohttp.ClientSession() as session:
        assert await ChildClient(session).sleeping(child_port(item), 5) is False


async def test_canary_passes_on_a_healthy_child(
    start_router: StartRouter, llama_server_bin: Path, tiny_models: TinyModels,
) -> None:
    router = await start_router("--models-dir", str(tiny_models.dir), "--no-watch", server_bin=llama_server_bin)
    await load(router, "alpha")
    item = await router.wait_status("alpha", "loaded")
    async with aiohttp.ClientSession() as session:
        assert await ChildClient(session).canary(child_port(item), 10) is True


async def test_canary_fails_in_time_on_a_child_that_hangs(
    start_router: StartRouter, tmp_path: Path,
) -> None:
    d = tmp_path / "models"
    write_fake_model(d / "alpha.gguf")
    write_fake_model(d / "stuck.gguf", hang_after=1)
    router = await start_router("--models-dir", str(d), "--no-watch")
    async with aiohttp.ClientSession() as session:
        for name in ("alpha", "stuck"):
            status, body = await router.chat(name)
            assert status == 200, body
        models = await router.models()
        assert await ChildClient(session).canary(child_port(models["alpha"]), 5) is True
        # Its completion never comes: the canary gives up after its limit and says so.
        assert await ChildClient(session).canary(child_port(models["stuck"]), 0.5) is False


async def test_sleeping_status_is_read_from_the_child_log_not_by_asking(
    start_router: StartRouter, llama_server_bin: Path, tiny_models: TinyModels,
) -> None:
    # GET /models never wakes a sleeping child: listing it repeatedly keeps it asleep.
    router = await start_router("--models-dir", str(tiny_models.dir), "--no-watch", "--sleep-idle", "1",
                                server_bin=llama_server_bin)
    await load(router, "alpha")
    item = await router.wait_status("alpha", "sleeping", timeout=30)
    for _ in range(20):
        assert (await router.models())["alpha"]["status"]["value"] == "sleeping"
    async with aiohttp.ClientSession() as session:
        assert await ChildClient(session).sleeping(child_port(item), 5) is True


async def test_a_child_that_passes_health_but_fails_inference_is_replaced(
    start_router: StartRouter, tmp_path: Path,
) -> None:
    d = tmp_path / "models"
    write_fake_model(d / "broken.gguf", inference_fails=True)
    router = await start_router(
        "--models-dir", str(d), "--no-watch", "--canary-interval", "0.2",
        "--health-interval", "0.1", "--health-failures", "2", "--restart-max", "100",
    )
    status, body = await router.post("/models/load", {"model": "broken"})
    assert status == 200, body

    async def replaced() -> bool:
        return bool((await router.models())["broken"]["restarts"] >= 1)

    await wait_for(replaced, 30, interval=0.05, message="the broken child to be replaced")
    assert "child failed its canary completion" in router.log()


async def test_without_canary_such_a_child_stays(
    start_router: StartRouter, tmp_path: Path,
) -> None:
    # The same child with canaries off: /health alone keeps it in service. Its liveness
    # probes run 50 times (bounded by their count, not by a sleep) and it is never replaced.
    d = tmp_path / "models"
    write_fake_model(d / "broken.gguf", inference_fails=True)
    router = await start_router(
        "--models-dir", str(d), "--no-watch", "--health-interval", "0.02", "--health-failures", "1",
    )
    status, body = await router.post("/models/load", {"model": "broken"})
    assert status == 200, body
    item = await router.wait_status("broken", "loaded")
    port = child_port(item)

    async def probed_enough() -> bool:
        async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}/fake/stats"
        ) as resp:
            stats = await resp.json()
        return bool(stats["requests"].get("/health", 0) >= 50)

    await wait_for(probed_enough, 30, interval=0.05)
    assert (await router.models())["broken"]["restarts"] == 0


async def test_a_sleeping_model_holds_no_budget(
    start_router: StartRouter, llama_server_bin: Path, tmp_path: Path,
) -> None:
    from llamarouter.core.gguf_info import RunSettings, estimate, read_facts
    from llamarouter.devtools.tinymodel import shape_for_size, write_model

    d = tmp_path / "models"
    shape = shape_for_size(25_000_000)
    for i, name in enumerate(("m1", "m2")):
        write_model(d / f"{name}.gguf", shape, seed=i)
    one = estimate(read_facts(d / "m1.gguf"), RunSettings.from_options({"-c": "512", "-np": "1"}), gpu=False).total
    preset = tmp_path / "models.ini"
    preset.write_text("[m1]\nsleep-idle = 1\n")
    router = await start_router(
        "--models-dir", str(d), "--models-preset", str(preset), "--no-watch", "--models-max", "0",
        "--memory-budget", str(int(1.5 * one)), "-c", "512", "-np", "1", server_bin=llama_server_bin,
    )
    await load(router, "m1")
    await router.wait_status("m1", "sleeping", timeout=30)
    status, mem = await router.get("/memory")
    assert status == 200 and mem["used"] == 0
    # The budget holds one model: with m1 asleep, m2 loads without evicting it.
    await load(router, "m2")
    models = await router.models()
    assert models["m1"]["status"]["value"] == "sleeping"
    assert models["m2"]["status"]["value"] == "loaded"
