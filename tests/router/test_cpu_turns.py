"""CPU turns with fake children (`--cpu-budget`): a request to a child on the CPU budget
waits while another child computes past it, and is served once that child's requests end;
children that fit together, a budget of 0, or a build with GPU devices change nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Router, StartRouter
from tests.fakes.helpers import wait_for, write_fake_model

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
    """Whether b's request was answered while a streamed, and its status. Answered, or
    listed as queued on its loaded model (waiting for its turn): whichever comes first."""
    assert (await r.chat("b", max_tokens=1))[0] == 200  # b loaded and idle
    async with a_streaming(r):
        b_task = asyncio.create_task(r.chat("b", max_tokens=1))

        async def answered_or_queued() -> bool:
            return b_task.done() or (await r.models())["b"]["queued"] == 1

        await wait_for(answered_or_queued, timeout=10, message="b answered or queued")
        answered_during = b_task.done()
        if not answered_during:
            assert (await r.models())["b"]["status"]["value"] == "loaded"
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


@pytest.mark.parametrize(
    ("threads", "budget", "env"),
    [
        ("1", "2", CPU_BUILD),  # children that fit the budget together compute at once
        ("2", "0", CPU_BUILD),  # a budget of 0 lets every child compute at once
        ("2", "2", {}),  # the fake lists a device by default: its children are not on the budget
    ],
    ids=["threads-fit", "budget-0", "gpu-build"],
)
async def test_no_turn_is_waited_for(
    tmp_path: Path, start_router: StartRouter, threads: str, budget: str, env: dict[str, str],
) -> None:
    r = await start_router("--models-dir", str(models(tmp_path)), "--models-max", "2", "-t", threads,
                           "--cpu-budget", budget, env=env)
    assert await b_while_a_streams(r) == (True, 200)


def test_a_bad_budget_is_refused_at_startup(tmp_path: Path) -> None:
    from llamarouter.cli import build_config
    from llamarouter.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        build_config(["--models-dir", str(tmp_path), "--cpu-budget", "lots"], {})
    assert "--cpu-budget" in refused.value.message
