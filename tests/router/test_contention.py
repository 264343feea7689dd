"""Swapping under contention with fake children: the drain bound (a busy model gives way
to a request that has waited past --drain-after), requests queued behind a drain, and what
GET /models and /metrics show of it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from tests.conftest import Router, StartRouter, overlapping_streams
from tests.fakes.helpers import wait_for, write_fake_model

# Every client loop below is bounded by this many requests and by per-step deadlines.
MAX_REQUESTS_PER_CLIENT = 60


def make_models(tmp_path: Path, names: str, **knobs: object) -> Path:
    d = tmp_path / "models"
    for name in names.split():
        write_fake_model(d / f"{name}.gguf", **knobs)
    return d


def stream_body(model: str) -> dict[str, object]:
    return {"model": model, "stream": True, "max_tokens": 60, "messages": [{"role": "user", "content": "x"}]}


async def starve(r: Router) -> tuple[int, bool, list[tuple[int, bool]]]:
    """A kept busy by overlapping streams; one request for B. B's status, whether it was
    answered while A's clients were still going, and every A result."""
    assert (await r.chat("a", max_tokens=1))[0] == 200
    stop = asyncio.Event()
    busy = asyncio.create_task(overlapping_streams(r, stream_body("a"), stop, MAX_REQUESTS_PER_CLIENT, lead=30))
    await wait_for(lambda: _in_flight(r, "a"), timeout=10, message="a busy")
    status, _ = await r.chat("b", max_tokens=1)
    served_while_busy = not busy.done()
    stop.set()
    results = await asyncio.wait_for(busy, 60)
    return status, served_while_busy, results


@contextlib.asynccontextmanager
async def a_drained_for_b(r: Router) -> AsyncIterator[asyncio.Task[tuple[int, Any]]]:
    """One endless stream keeps `a` busy; a request for `b` passes the bound and drains `a`.
    Yields b's request; the stream is closed when the block exits."""
    body = {"model": "a", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as s, s.post(r.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        await resp.content.readuntil(b"\n\n")
        b_task = asyncio.create_task(r.chat("b", max_tokens=1))

        async def drained() -> bool:
            return bool((await r.models())["a"]["draining"])

        await wait_for(drained, timeout=10, message="a draining")
        yield b_task


async def _in_flight(r: Router, name: str) -> bool:
    return (await r.models())[name]["in_flight"] > 0


async def test_a_request_past_the_bound_is_served_while_others_keep_the_slot_busy(
    tmp_path: Path, start_router: StartRouter,
) -> None:
    d = make_models(tmp_path, "a b", tokens=60, tps=400)
    r = await start_router("--models-dir", str(d), "--models-max", "1", "--drain-after", "0.2")
    status, served_while_busy, results = await starve(r)
    assert status == 200
    assert served_while_busy, "b waited until a's clients stopped"
    # A's requests queued behind the swap were served after it, none lost or cut.
    assert results and all(s == 200 and done for s, done in results), results
    assert "draining: a request has waited" in r.log()
    assert "[a] drained: unloading it for the waiting requests" in r.log()
    _, metrics = await r.get("/metrics")
    assert 'llamarouter_model_drains_total{model="a"}' in metrics
    assert 'llamarouter_queue_wait_seconds_count{model="b"} 1.0' in metrics


async def test_without_a_bound_the_busy_model_keeps_its_slot(
    tmp_path: Path, start_router: StartRouter,
) -> None:
    # Upstream's rule (--drain-after none): B is served only once A has an idle instant,
    # which overlapping streams never leave it; so B waits until they stop.
    d = make_models(tmp_path, "a b", tokens=60, tps=400)
    r = await start_router("--models-dir", str(d), "--models-max", "1", "--drain-after", "none")
    status, served_while_busy, results = await starve(r)
    assert status == 200
    assert not served_while_busy, r.log()[-4000:]
    assert all(s == 200 and done for s, done in results)


async def test_models_listing_shows_the_drain_and_what_queues_behind_it(
    tmp_path: Path, start_router: StartRouter,
) -> None:
    # One long stream keeps a busy; b's request passes the bound and drains a; a second
    # request for a then queues behind the swap instead of joining the stream.
    d = make_models(tmp_path, "a b", tokens=100000, tps=20)
    r = await start_router("--models-dir", str(d), "--models-max", "1", "--drain-after", "0.1")
    async with a_drained_for_b(r) as b_task:
        a_task = asyncio.create_task(r.chat("a", max_tokens=1))

        async def queued_behind() -> bool:
            return (await r.models())["a"]["queued"] == 1

        await wait_for(queued_behind, timeout=10, message="a's request queued")
        listing = await r.models()
        assert listing["a"]["in_flight"] == 1 and listing["a"]["status"]["value"] == "loaded"
    # The stream ends (client closed): a leaves, b loads, then a comes back for its request.
    assert (await asyncio.wait_for(b_task, 30))[0] == 200
    assert (await asyncio.wait_for(a_task, 30))[0] == 200
    listing = await r.models()
    assert listing["a"]["draining"] is False and listing["a"]["queued"] == 0
    status, hist = await r.get("/dashboard/history")
    assert status == 200
    kinds = {(m["model"], m["kind"]) for m in hist["marks"]}
    assert ("a", "drain") in kinds and ("a", "drained") in kinds


async def test_a_drain_is_called_off_when_the_waiting_client_leaves(
    tmp_path: Path, start_router: StartRouter,
) -> None:
    # upstream's test_router_queue_client_disconnect_keeps_model with a drain in between:
    # b's request drains a, then b's client gives up; a must keep its slot.
    d = make_models(tmp_path, "a b", tokens=100000, tps=20)
    r = await start_router("--models-dir", str(d), "--models-max", "1", "--drain-after", "0.1", "-np", "2")
    async with a_drained_for_b(r) as b_task:
        b_task.cancel()  # b's client goes away
        with contextlib.suppress(asyncio.CancelledError):
            await b_task

        async def called_off() -> bool:
            return not (await r.models())["a"]["draining"]

        await wait_for(called_off, timeout=10, message="the drain called off")
        # a takes requests again while its stream still runs.
        assert (await r.chat("a", max_tokens=1))[0] == 200
    listing = await r.models()
    assert listing["a"]["status"]["value"] == "loaded"
    assert listing["b"]["status"]["value"] == "unloaded"
    assert "[a] no longer draining" in r.log()
