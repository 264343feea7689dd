"""GET /metrics: the router's own Prometheus series move with real traffic through the
router to fake children; GET /metrics?model= still reaches the child."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.conftest import Samples, StartRouter, child_of, make_models, open_stream, scrape, value
from tests.fakes.helpers import wait_for


async def test_requests_latency_and_state_series(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a b")
    r = await start_router("--models-dir", str(d), "--models-max", "3")
    before = await scrape(r)
    assert value(before, "llamarouter_models_loaded") == 0
    assert value(before, "llamarouter_models_max") == 3
    assert value(before, "llamarouter_model_state", model="a", state="stopped") == 1

    for _ in range(3):
        assert (await r.chat("a", max_tokens=2))[0] == 200
    # Refused before reaching a child: still counted, under the router's status code.
    status, _ = await r.post(
        "/v1/chat/completions?autoload=false",
        {"model": "b", "messages": [{"role": "user", "content": "x"}]},
    )
    assert status == 400
    assert (await r.post("/tokenize", {"model": "a", "content": "hello"}))[0] == 200

    m = await scrape(r)
    chat = "/v1/chat/completions"
    assert value(m, "llamarouter_requests_total", model="a", endpoint=chat, code="200") == 3
    assert value(m, "llamarouter_requests_total", model="b", endpoint=chat, code="400") == 1
    assert value(m, "llamarouter_requests_total", model="a", endpoint="/tokenize", code="200") == 1
    assert value(m, "llamarouter_request_duration_seconds_count", model="a") == 4
    assert value(m, "llamarouter_time_to_first_byte_seconds_count", model="a") == 4
    # b never reached a child: a duration, but no time to first byte.
    assert value(m, "llamarouter_request_duration_seconds_count", model="b") == 1
    assert not value(m, "llamarouter_time_to_first_byte_seconds_count", model="b")
    assert value(m, "llamarouter_model_loads_total", model="a", outcome="ok") == 1
    assert value(m, "llamarouter_model_load_duration_seconds_count", model="a") == 1
    assert value(m, "llamarouter_model_state", model="a", state="ready") == 1
    assert value(m, "llamarouter_model_state", model="a", state="stopped") == 0
    assert value(m, "llamarouter_model_in_flight_requests", model="a") == 0
    assert value(m, "llamarouter_model_queued_requests", model="a") == 0
    assert value(m, "llamarouter_models_loaded") == 1
    # Children without --metrics are not scraped: queue is ours only, no KV gauge.
    assert value(m, "llamarouter_model_total_queued_requests", model="a") == 0
    assert value(m, "llamarouter_model_kv_cache_usage_ratio", model="a") is None


async def test_eviction_unload_and_crash_counters(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a b")
    r = await start_router("--models-dir", str(d), "--models-max", "1")
    assert (await r.chat("a", max_tokens=1))[0] == 200
    assert (await r.chat("b", max_tokens=1))[0] == 200  # evicts a
    await r.wait_status("a", "unloaded")
    assert (await r.post("/models/unload", {"model": "b"}))[0] == 200
    await r.wait_status("b", "unloaded")

    m = await scrape(r)
    assert value(m, "llamarouter_model_evictions_total", model="a", reason="evicted") == 1
    assert value(m, "llamarouter_model_evictions_total", model="b", reason="unloaded") == 1
    assert value(m, "llamarouter_model_loads_total", model="a", outcome="ok") == 1
    assert value(m, "llamarouter_model_loads_total", model="b", outcome="ok") == 1
    assert value(m, "llamarouter_model_crashes_total", model="a") is None
    assert value(m, "llamarouter_models_loaded") == 0

    # A crash of a loaded model: counted, then the automatic restart and its load.
    assert (await r.chat("a", max_tokens=1))[0] == 200
    victim = child_of(r, "a")
    assert victim is not None
    victim.kill()

    async def restarted() -> Samples | None:
        s = await scrape(r)
        ok = value(s, "llamarouter_model_loads_total", model="a", outcome="ok")
        return s if ok == 3 else None

    m = await wait_for(restarted, 15, interval=0.05, message="a to be restarted")
    assert value(m, "llamarouter_model_crashes_total", model="a") == 1
    assert value(m, "llamarouter_model_restarts_total", model="a") == 1
    assert value(m, "llamarouter_model_state", model="a", state="ready") == 1


async def test_model_query_proxies_to_child(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a")
    r = await start_router("--models-dir", str(d))
    assert (await r.chat("a", max_tokens=1))[0] == 200
    status, body = await r.get("/metrics?model=a")
    assert status == 200
    assert "llamacpp:kv_cache_usage_ratio" in body and "llamarouter_" not in body
    own = await r.get("/metrics")
    assert "llamarouter_requests_total" in own[1]


async def test_inference_extension_gauges_from_child(tmp_path: Path, start_router: StartRouter) -> None:
    # One slot (the fake's default) and a slow stream: a second request is deferred by
    # the child, which only --metrics children report.
    d = make_models(tmp_path, "a", tokens=400, tps=40)
    r = await start_router("--models-dir", str(d), "--metrics")
    async with open_stream(r, "a"):
        second = asyncio.create_task(r.chat("a", max_tokens=1))

        async def deferred() -> Samples | None:
            s = await scrape(r)
            queued = value(s, "llamarouter_model_total_queued_requests", model="a")
            return s if queued == 1 else None

        m = await wait_for(deferred, 10, interval=0.05, message="the child to defer a request")
        kv = value(m, "llamarouter_model_kv_cache_usage_ratio", model="a")
        assert kv is not None and 0 < kv <= 1
        assert value(m, "llamarouter_model_queued_requests", model="a") == 0  # not ours
        assert value(m, "llamarouter_model_in_flight_requests", model="a") == 2
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)
