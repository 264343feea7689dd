"""Health from live traffic: a child that answers /health but fails its requests is
replaced; the client's own errors and disconnects never count. Fake children whose
completions start failing after N requests (500, or a reset before any head)."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.conftest import Router, StartRouter, child_of, make_models, scrape, value
from tests.fakes.helpers import wait_for


async def pid_of(r: Router, name: str) -> int:
    child = child_of(r, name)
    assert child is not None, f"{name} has no child"
    return child.pid


async def wait_replaced(r: Router, name: str, old: int) -> int:
    async def replaced() -> int | None:
        child = child_of(r, name)
        if child is None or child.pid == old or await r.status_of(name) != "loaded":
            return None
        return child.pid

    return await wait_for(replaced, 15, interval=0.02, message=f"{name}'s child to be replaced")


async def test_failing_completions_replace_the_child_then_fail_the_model(
    tmp_path: Path, start_router: StartRouter
) -> None:
    # Each child serves two completions, then answers 500 to every one while /health
    # (probed every 0.2 s here) keeps saying 200.
    d = make_models(tmp_path, "a", inference_fails_after=2)
    r = await start_router(
        "--models-dir", str(d), "--request-failures", "3", "--request-failure-window", "60",
        "--health-interval", "0.2", "--restart-max", "3", "--restart-window", "60",
    )
    pids = []
    for round_ in range(3):
        for _ in range(2):
            status, body = await r.chat("a", max_tokens=1)
            assert status == 200, body
        pid = await pid_of(r, "a")
        assert pid not in pids
        pids.append(pid)
        for _ in range(2):
            status, body = await r.chat("a", max_tokens=1)
            assert status == 500 and "fake: inference fails" in body["error"]["message"], body
        # Two failures are under the limit: the child stays, liveness probes pass.
        assert await pid_of(r, "a") == pid and await r.status_of("a") == "loaded"
        status, body = await r.chat("a", max_tokens=1)
        assert status == 500, body  # the third: past the limit
        if round_ < 2:
            await wait_replaced(r, "a", pid)
    # The third child failed the same way: with --restart-max 3 the model is failed now,
    # in upstream's words, and says why.
    item = await r.wait_status("a", "unloaded")
    assert item["status"]["failed"] is True and item["status"]["state"] == "failed"
    assert "requests in a row failed" in item["status"]["cause"]
    assert "HTTP 500" in item["status"]["error"]
    status, body = await r.chat("a", max_tokens=1)
    assert status == 503 and body["error"]["type"] == "unavailable_error", body
    kills = [line for line in r.log().splitlines() if line.startswith("ERROR llamarouter.process: [a] 3 requests")]
    assert len(kills) == 3, kills
    samples = await scrape(r)
    assert value(samples, "llamarouter_model_request_failure_kills_total", model="a") == 3


async def test_reset_before_the_head_replaces_the_child_and_the_request_is_served(
    tmp_path: Path, start_router: StartRouter
) -> None:
    # After one completion the child resets every completion's connection before answering.
    d = make_models(tmp_path, "a", inference_fails_after=1, inference_reset=True)
    r = await start_router(
        "--models-dir", str(d), "--request-failures", "2", "--health-timeout", "1",
    )
    assert (await r.chat("a", max_tokens=1))[0] == 200
    first = await pid_of(r, "a")
    status, body = await r.chat("a", max_tokens=1)
    # A reset is not retried while the child stays up: one failure, under the limit.
    assert status == 500 and "before answering" in body["error"]["message"], body
    assert await pid_of(r, "a") == first
    # The second reset takes the child out: this request is sent once more, to the
    # replacement, which serves its first completion.
    status, body = await r.chat("a", max_tokens=1)
    assert status == 200, body
    assert await pid_of(r, "a") != first
    item = (await r.models())["a"]
    assert item["status"]["value"] == "loaded" and item["restarts"] == 1
    assert "child closed the connection before answering" in item["status"]["cause"]


async def test_client_errors_and_disconnects_never_replace_the_child(
    tmp_path: Path, start_router: StartRouter
) -> None:
    d = make_models(tmp_path, "a", tokens=200, tps=50)
    r = await start_router("--models-dir", str(d), "--request-failures", "2")
    assert (await r.chat("a", max_tokens=1))[0] == 200
    first = await pid_of(r, "a")
    for _ in range(4):  # the child's own 400s
        status, body = await r.post("/v1/chat/completions", {"model": "a", "messages": "not a list"})
        assert status == 400, body
    stream = {"model": "a", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    for _ in range(3):  # clients that hang up mid-stream
        async with aiohttp.ClientSession() as s, s.post(r.url + "/v1/chat/completions", json=stream) as resp:
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")
    whole = {"model": "a", "messages": [{"role": "user", "content": "x"}]}
    for _ in range(3):  # clients that give up before a whole response's head
        async with aiohttp.ClientSession() as s:
            try:
                async with s.post(
                    r.url + "/v1/chat/completions", json=whole, timeout=aiohttp.ClientTimeout(total=0.3)
                ) as resp:
                    raise AssertionError(f"answered within 0.3 s: {resp.status}")
            except TimeoutError:
                pass

    async def settled() -> bool:
        return (await r.models())["a"]["in_flight"] == 0

    await wait_for(settled, 10, message="the abandoned requests to end")
    assert await pid_of(r, "a") == first
    assert (await r.chat("a", max_tokens=1))[0] == 200
    assert await pid_of(r, "a") == first
    assert "requests in a row failed" not in r.log()
    assert value(await scrape(r), "llamarouter_model_request_failure_kills_total", model="a") is None


async def test_an_answer_between_failures_starts_the_count_again(
    tmp_path: Path, start_router: StartRouter
) -> None:
    # Completions fail, tokenize still answers: failures interleaved with answers never
    # reach the limit of two in a row.
    d = make_models(tmp_path, "a", inference_fails=True)
    r = await start_router("--models-dir", str(d), "--request-failures", "2")
    status, body = await r.post("/tokenize", {"model": "a", "content": "x"})
    assert status == 200, body
    first = await pid_of(r, "a")
    for _ in range(3):
        assert (await r.chat("a", max_tokens=1))[0] == 500
        assert (await r.post("/tokenize", {"model": "a", "content": "x"}))[0] == 200
    assert await pid_of(r, "a") == first
    # Two in a row do.
    assert (await r.chat("a", max_tokens=1))[0] == 500
    assert (await r.chat("a", max_tokens=1))[0] == 500
    await wait_replaced(r, "a", first)
