"""--models-max scheduling against fake children: LRU of idle models, busy models never
evicted, a FIFO queue whose entries are shared per model and left by cancelled clients."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.conftest import Events, Router, StartRouter, make_models, open_stream
from tests.fakes.helpers import wait_for


async def test_lru_skips_busy_model(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a b c", tokens=100000, tps=20)
    r = await start_router("--models-dir", str(d), "--models-max", "2")
    assert (await r.chat("a", max_tokens=1))[0] == 200  # a: least recently used...
    assert (await r.chat("b", max_tokens=1))[0] == 200
    async with open_stream(r, "a"):  # ...but busy
        assert (await r.models())["a"]["in_flight"] == 1
        status, _ = await r.chat("c", max_tokens=1)
        assert status == 200
        models = await r.models()
        assert models["a"]["status"]["value"] == "loaded"
        assert models["c"]["status"]["value"] == "loaded"
        assert models["b"]["status"]["value"] == "unloaded"
        assert models["b"]["status"]["stop_reason"] == "evicted"


async def test_busy_models_make_requests_wait_in_fifo_order(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a b c", tokens=100000, tps=20)
    r = await start_router("--models-dir", str(d), "--models-max", "1")
    async with Events(r) as events:
        async with open_stream(r, "a"):
            first = asyncio.create_task(r.chat("b", max_tokens=1))
            await wait_for(lambda: _queued(r, "b"), 10, message="b to be queued")
            second = asyncio.create_task(r.chat("c", max_tokens=1))
            await wait_for(lambda: _queued(r, "c"), 10, message="c to be queued")
            assert not first.done() and not second.done()
            assert await r.status_of("a") == "loaded"
        # The stream on a ended: a is idle, evicted for b; c follows once b is idle.
        assert (await first)[0] == 200
        assert (await second)[0] == 200
        assert events.order("status_change", "loaded")[-2:] == ["b", "c"]
        assert events.order("model_status", "loading")[-2:] == ["b", "c"]


async def _queued(r: Router, name: str) -> bool:
    return (await r.models())[name]["queued"] >= 1


async def test_requests_for_one_model_share_one_load(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a b", load_secs=0.3)
    r = await start_router("--models-dir", str(d), "--models-max", "1")
    assert (await r.chat("a", max_tokens=1))[0] == 200
    async with Events(r) as events:
        results = await asyncio.gather(*(r.chat("b", max_tokens=1) for _ in range(5)))
        assert [status for status, _ in results] == [200] * 5
        assert events.spawns("b") == 1  # one load for all five
        assert events.order("status_change", "unloaded") == ["a"]  # one eviction
    models = await r.models()
    assert models["b"]["status"]["value"] == "loaded" and models["a"]["status"]["value"] == "unloaded"


async def test_cancelled_waiter_leaves_queue_and_costs_no_slot(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a b", tokens=100000, tps=20)
    r = await start_router("--models-dir", str(d), "--models-max", "1")
    async with open_stream(r, "a"):
        waiter = asyncio.create_task(r.chat("b", max_tokens=1))
        await wait_for(lambda: _queued(r, "b"), 10, message="b to be queued")
        waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)

        async def left() -> bool:
            return (await r.models())["b"]["queued"] == 0

        await wait_for(left, 10, message="the cancelled request to leave the queue")
    # a goes idle once the router has seen its client leave; with nobody waiting for b,
    # nothing was evicted and nothing loaded.
    async def idle() -> bool:
        return (await r.models())["a"]["in_flight"] == 0

    await wait_for(idle, 10, message="a to go idle")
    models = await r.models()
    assert models["a"]["status"]["value"] == "loaded"
    assert models["b"]["status"]["value"] == "unloaded"


async def test_load_endpoint_evicts_idle_lru_and_refuses_when_all_busy(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a b c", tokens=100000, tps=20)
    r = await start_router("--models-dir", str(d), "--models-max", "1")
    assert (await r.chat("a", max_tokens=1))[0] == 200
    status, body = await r.post("/models/load", {"model": "b"})
    assert (status, body) == (200, {"success": True})
    assert (await r.models())["a"]["status"]["value"] == "unloaded"
    await r.wait_status("b", "loaded")
    async with open_stream(r, "b"):
        status, body = await r.post("/models/load", {"model": "c"})
        # Upstream: a runtime error, so HTTP 500, with this message.
        assert status == 500 and body["error"]["message"] == "model limit reached, try again later"


async def test_unlimited_models_max_zero(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a b c d e")
    r = await start_router("--models-dir", str(d), "--models-max", "0")
    results = await asyncio.gather(*(r.chat(m, max_tokens=1) for m in "abcde"))
    assert all(status == 200 for status, _ in results)
    assert all(m["status"]["value"] == "loaded" for m in (await r.models()).values())


async def test_debug_fake_timing_counts_request_busy_while_sleeping(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a")
    r = await start_router("--models-dir", str(d), env={"LLAMA_SERVER_DEBUG_FAKE_TIMING": "1"})
    task = asyncio.create_task(r.chat("a", max_tokens=1))

    async def busy() -> bool:
        return (await r.models())["a"]["in_flight"] == 1

    # Upstream's hook: 2 s before the load and 2 s with the request counted in flight.
    await wait_for(busy, 15, message="the request to be counted in flight")
    assert not task.done()
    assert (await task)[0] == 200


async def test_an_explicit_load_counts_as_use(tmp_path: Path, start_router: StartRouter) -> None:
    """Upstream stamps last_used on every POST it routes, POST /models/load included: chat to
    alpha, load beta, chat to gamma evicts alpha (used longest ago), not the just-loaded beta."""
    d = make_models(tmp_path, "alpha beta gamma")
    r = await start_router("--models-dir", str(d), "--models-max", "2")
    assert (await r.chat("alpha", max_tokens=1))[0] == 200
    assert (await r.post("/models/load", {"model": "beta"}))[0] == 200
    await r.wait_status("beta", "loaded")
    assert (await r.chat("gamma", max_tokens=1))[0] == 200
    models = await r.models()
    assert models["alpha"]["status"]["value"] == "unloaded"
    assert models["beta"]["status"]["value"] == "loaded"


async def test_three_loads_in_a_row_evict_the_first_loaded(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "alpha beta gamma")
    r = await start_router("--models-dir", str(d), "--models-max", "2")
    # beta first, then alpha: the first loaded goes, whatever the names' order.
    for name in ("beta", "alpha"):
        assert (await r.post("/models/load", {"model": name}))[0] == 200
        await r.wait_status(name, "loaded")
    assert (await r.post("/models/load", {"model": "gamma"}))[0] == 200
    await r.wait_status("gamma", "loaded")
    models = await r.models()
    assert models["beta"]["status"]["value"] == "unloaded"
    assert models["alpha"]["status"]["value"] == "loaded"


async def test_runtime_pin_keeps_a_model_loaded_and_unpin_lets_it_go(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a b")
    r = await start_router("--models-dir", str(d), "--models-max", "1")
    assert await r.post("/models/pin", {"model": "a", "pin": True}) == (200, {"success": True, "pinned": True})
    item = await r.wait_status("a", "loaded")  # pinned: started without a request
    assert item["pinned"] is True
    assert (await r.post("/models/unload", {"model": "a"}))[0] == 200
    await wait_for(lambda: r.log().count("[a] stopped -> starting") >= 2, 10, message="a to come back")
    await r.wait_status("a", "loaded")
    assert await r.post("/models/pin", {"model": "a", "pin": False}) == (200, {"success": True, "pinned": False})
    assert (await r.chat("b", max_tokens=1))[0] == 200  # a is evictable again
    assert (await r.models())["a"]["status"]["value"] == "unloaded"
    assert (await r.post("/models/pin", {"model": "zzz"}))[0] == 400
    assert (await r.post("/models/pin", {"model": "a", "pin": "yes"}))[0] == 400
