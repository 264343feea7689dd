"""CPU turns with fake children (`--cpu-budget`): a request to a child on the CPU budget
waits while another child computes past it, and is served once that child's requests end;
children that fit together, a budget of 0, or a build with GPU devices change nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from tests.conftest import Router, StartRouter
from tests.fakes.helpers import write_fake_model

CPU_BUILD = {"FAKE_BUILD_DEVICES": ""}  # the fake says what a CPU-only llama-server says


def models(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    for name in ("a", "b"):
        write_fake_model(d / f"{name}.gguf", tokens=100000, tps=20)
    return d


@contextlib.asynccontextmanager
async def a_streaming(r: Router) -> AsyncIterator[None]:
    """One endless stream keeps `a` computing until the block exits."""
    body = {"model": "a", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as s, s.post(r.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        yield


async def b_while_a_streams(r: Router) -> tuple[bool, int]:
    """Whether b's request was answered while a streamed, and its status."""
    assert (await r.chat("b", max_tokens=1))[0] == 200  # b loaded and idle
    async with a_streaming(r):
        b_task = asyncio.create_task(r.chat("b", max_tokens=1))
        done, _ = await asyncio.wait({b_task}, timeout=2.0)
        if not done:
            listing = await r.models()
            assert listing["b"]["queued"] == 1 and listing["b"]["status"]["value"] == "loaded", listing["b"]
        answered_during = bool(done)
    status, _ = await asyncio.wait_for(b_task, 30)
    return answered_during, status


async def test_a_request_waits_for_its_turn_while_another_cpu_child_computes(
    tmp_path: Path, start_router: StartRouter,
) -> None:
    r = await start_router("--models-dir", str(models(tmp_path)), "--models-max", "2", "-t", "2",
                           "--cpu-budget", "2", env=CPU_BUILD)
    answered_during, status = await b_while_a_streams(r)
    assert not answered_during, "b computed beside a past the budget"
    assert status == 200  # served once a's stream ended


async def test_children_that_fit_the_budget_together_compute_at_once(
    tmp_path: Path, start_router: StartRouter,
) -> None:
    r = await start_router("--models-dir", str(models(tmp_path)), "--models-max", "2", "-t", "1",
                           "--cpu-budget", "2", env=CPU_BUILD)
    assert await b_while_a_streams(r) == (True, 200)


async def test_a_budget_of_zero_lets_every_child_compute_at_once(
    tmp_path: Path, start_router: StartRouter,
) -> None:
    r = await start_router("--models-dir", str(models(tmp_path)), "--models-max", "2", "-t", "2",
                           "--cpu-budget", "0", env=CPU_BUILD)
    assert await b_while_a_streams(r) == (True, 200)


async def test_children_of_a_build_with_devices_are_not_on_the_budget(
    tmp_path: Path, start_router: StartRouter,
) -> None:
    r = await start_router("--models-dir", str(models(tmp_path)), "--models-max", "2", "-t", "2",
                           "--cpu-budget", "2")  # the fake lists a device by default
    assert await b_while_a_streams(r) == (True, 200)


async def test_a_bad_budget_is_refused_at_startup(tmp_path: Path) -> None:
    from llamarouter.cli import build_config
    from llamarouter.errors import ConfigError

    try:
        build_config(["--models-dir", str(tmp_path), "--cpu-budget", "lots"], {})
    except ConfigError as exc:
        assert "--cpu-budget" in exc.message
    else:
        raise AssertionError("--cpu-budget lots was accepted")
    await asyncio.sleep(0)
