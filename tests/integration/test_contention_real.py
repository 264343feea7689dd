"""Swapping under contention with the real llama-server: a small, bounded version of the
scheduling benchmark's thrash (six models through two slots, many clients), and the
starvation case (a request for B behind streams that keep A busy)."""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import aiohttp
import psutil
import pytest

from llamarouter.devtools.tinymodel import write_model
from tests.conftest import StartRouter, overlapping_streams
from tests.fakes.helpers import wait_for

pytestmark = pytest.mark.integration

MODELS = ("m1", "m2", "m3", "m4", "m5", "m6")
BASE = ("-c", "1024", "-np", "4")
# The thrash: a fixed number of requests and a deadline; every request must be answered.
THRASH_REQUESTS = 160
THRASH_CLIENTS = 16
DEADLINE_S = 180.0


@pytest.fixture(scope="module")
def six_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("six")
    src = write_model(d / "src.gguf.tmp", seed=7)[0]
    models = d / "models"
    models.mkdir()
    for name in MODELS:
        os.link(src, models / f"{name}.gguf")
    return models


def body(model: str, tokens: int, stream: bool = False) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": tokens, "ignore_eos": True, "stream": stream}



async def test_thrash_every_request_is_answered_and_no_child_outlives_the_router(
    six_models: Path, llama_server_bin: Path, start_router: StartRouter
) -> None:
    r = await start_router("--models-dir", str(six_models), "--models-max", "2", *BASE,
                           server_bin=llama_server_bin)
    rng = random.Random(6)
    picks = [rng.choice(MODELS) for _ in range(THRASH_REQUESTS)]
    statuses: list[int] = []
    seen_children: set[int] = set()
    deadline = time.monotonic() + DEADLINE_S

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s:
        async def client() -> None:
            while picks and time.monotonic() < deadline:
                model = picks.pop()
                async with s.post(r.url + "/v1/chat/completions", json=body(model, 4)) as resp:
                    await resp.read()
                    statuses.append(resp.status)
                seen_children.update(c.pid for c in r.children())

        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(THRASH_CLIENTS))), DEADLINE_S + 30)

    assert len(statuses) == THRASH_REQUESTS, f"only {len(statuses)} answered before the deadline"
    assert statuses == [200] * THRASH_REQUESTS, sorted(set(statuses))
    _, metrics = await r.get("/metrics")
    # Six models through two slots: the slots changed hands, and waits were measured.
    assert 'llamarouter_queue_wait_seconds_count{model="m1"}' in metrics
    loads = sum(
        float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
        if line.startswith("llamarouter_model_loads_total{") and 'outcome="ok"' in line
    )
    assert loads >= len(MODELS)
    listing = await r.models()
    assert sum(1 for m in listing.values() if m["status"]["value"] != "unloaded") <= 2
    assert all(not m["draining"] and m["queued"] == 0 for m in listing.values())

    seen_children.update(c.pid for c in r.children())
    assert await r.stop() == 0
    alive = [pid for pid in seen_children if psutil.pid_exists(pid)
             and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"children outlived the router: {alive}"


async def test_a_request_behind_streams_is_served_within_the_drain_bound(
    six_models: Path, llama_server_bin: Path, start_router: StartRouter
) -> None:
    # Overlapping streams keep m1 busy without an idle instant; m2's request passes
    # --drain-after, m1 drains (its streams finish, none is cut), m2 loads and answers.
    r = await start_router("--models-dir", str(six_models), "--models-max", "1", *BASE,
                           "--drain-after", "0.3", server_bin=llama_server_bin)
    assert (await r.chat("m1", max_tokens=1))[0] == 200
    stop = asyncio.Event()
    busy = asyncio.create_task(overlapping_streams(r, body("m1", 300, stream=True), stop, limit=40, lead=100))

    async def m1_busy() -> bool:
        return bool((await r.models())["m1"]["in_flight"])

    await wait_for(m1_busy, timeout=30)
    status, _ = await r.chat("m2", max_tokens=1)
    served_while_busy = not busy.done()
    stop.set()
    results = await asyncio.wait_for(busy, 90)
    assert status == 200
    assert served_while_busy, "m2 waited until m1's clients stopped"
    assert results and all(st == 200 and done for st, done in results), results
    assert "[m1] drained: unloading it for the waiting requests" in r.log(), r.log()[-1500:]
