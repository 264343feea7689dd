"""Supervision against fake children: crashes, hangs, crash loops, orphans, bounded
admission, idle TTL, pins, logs, graceful shutdown. Real subprocesses, no sleeps."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import psutil

from tests.conftest import Router, StartRouter, child_of, make_models, open_stream
from tests.fakes.helpers import wait_for, write_fake_model

FAST_HEALTH = ("--health-interval", "0.2", "--health-timeout", "0.3", "--health-failures", "2")


async def kill_and_wait_replaced(r: Router, name: str) -> None:
    """SIGKILL the model's child and wait until a new child serves it."""
    first = child_of(r, name)
    assert first is not None
    first.kill()

    async def back() -> bool:
        new = child_of(r, name)
        return new is not None and new.pid != first.pid and await r.status_of(name) == "loaded"

    await wait_for(back, 15, interval=0.05, message=f"{name} to be restarted")


async def read_stream(resp: aiohttp.ClientResponse) -> list[bytes]:
    return [e for e in (await resp.read()).split(b"\n\n") if e]


async def test_kill_9_during_stream(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a b", tokens=60, tps=40)
    r = await start_router("--models-dir", str(d))
    assert (await r.chat("b", max_tokens=1))[0] == 200
    body = {"stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(r.url + "/v1/chat/completions", json={**body, "model": "a"}) as ra, \
                s.post(r.url + "/v1/chat/completions", json={**body, "model": "b"}) as rb:
            await ra.content.readuntil(b"\n\n")
            victim = child_of(r, "a")
            assert victim is not None
            victim.kill()
            # The broken stream ends (bounded by the test timeout) with an error event.
            events_a = await asyncio.wait_for(read_stream(ra), 10)
            last = json.loads(events_a[-1][len(b"data: "):])
            assert "error" in last and "model name=a" in last["error"]["message"]
            # The other model's stream is untouched.
            events_b = await read_stream(rb)
            assert events_b[-1] == b"data: [DONE]"
            contents = [json.loads(e[6:])["choices"][0]["delta"].get("content") for e in events_b[:-1]]
            assert len([c for c in contents if c]) == 60
    # The crash was noticed and the model comes back; the next request succeeds.
    status, reply = await r.chat("a", max_tokens=2)
    assert status == 200, reply
    item = (await r.models())["a"]
    assert item["restarts"] >= 1 or item["status"]["value"] == "loaded"


async def test_sigstopped_child_is_replaced(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a")
    r = await start_router("--models-dir", str(d), *FAST_HEALTH)
    assert (await r.chat("a", max_tokens=1))[0] == 200
    stuck = child_of(r, "a")
    assert stuck is not None
    os.kill(stuck.pid, signal.SIGSTOP)

    async def replaced() -> bool:
        new = child_of(r, "a")
        item = (await r.models())["a"]
        return new is not None and new.pid != stuck.pid and item["status"]["value"] == "loaded"

    await wait_for(replaced, 15, interval=0.05, message="the stuck child to be replaced")
    assert not psutil.pid_exists(stuck.pid) or psutil.Process(stuck.pid).status() == psutil.STATUS_ZOMBIE
    assert (await r.chat("a", max_tokens=1))[0] == 200
    assert "stopped answering /health" in r.log()


async def test_request_to_hung_child_does_not_hang(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a", hang_after=1)
    r = await start_router("--models-dir", str(d), *FAST_HEALTH)
    assert (await r.chat("a", max_tokens=1))[0] == 200  # after this the child hangs
    first = child_of(r, "a")
    # The stuck child is killed by the liveness check; the request, which got no answer
    # from it, is sent again to the replacement (which hangs after its first request too).
    status, body = await asyncio.wait_for(r.chat("a", max_tokens=1), 20)
    assert status == 200, body
    assert first is not None and child_of(r, "a") is not None
    assert child_of(r, "a").pid != first.pid  # type: ignore[union-attr]
    assert "stopped answering /health" in r.log()


async def test_crash_loop_ends_failed_with_log_tail(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a", crash_on_start=True, exit_code=3)
    r = await start_router("--models-dir", str(d), "--restart-max", "3", "--restart-window", "60")
    status, body = await r.chat("a")
    # The waiting request gets upstream's "failed to load", with the cause.
    assert status == 503 and body["error"]["message"].startswith("model name=a failed to load")
    item = (await r.models())["a"]
    st = item["status"]
    assert st["value"] == "unloaded" and st["failed"] is True and st["exit_code"] == 3
    assert st["state"] == "failed" and item["restarts"] == 2
    assert any("exit" in line or "error" in line.lower() for line in st["log_tail"])
    # Further requests fail fast instead of looping.
    status, body = await r.chat("a")
    assert status == 503 and body["error"]["type"] == "unavailable_error"
    assert not r.children()
    # An explicit load resets the failure and tries again.
    assert (await r.post("/models/load", {"model": "a"}))[0] == 200


async def test_load_stall_is_failed(tmp_path: Path, start_router: StartRouter) -> None:
    # A loading child that neither prints nor answers (frozen) is failed after the window.
    d = make_models(tmp_path, "a", load_secs=600)
    r = await start_router("--models-dir", str(d), "--load-timeout", "1", "--restart-max", "1")
    request = asyncio.create_task(r.chat("a"))
    await wait_for(lambda: child_of(r, "a"), 10, message="the child to spawn")
    child = child_of(r, "a")
    assert child is not None
    child.suspend()
    status, body = await asyncio.wait_for(request, 30)
    assert status == 503 and "load stalled" in body["error"]["message"]
    assert not psutil.pid_exists(child.pid) or child.status() == psutil.STATUS_ZOMBIE


async def test_slow_load_with_progress_is_not_a_stall(tmp_path: Path, start_router: StartRouter) -> None:
    # Loads for 2 s with a progress line every 0.25 s: longer than the 1 s stall window.
    d = make_models(tmp_path, "a", load_secs=2, log_interval=0.25)
    r = await start_router("--models-dir", str(d), "--load-timeout", "1")
    status, _ = await asyncio.wait_for(r.chat("a", max_tokens=1), 30)
    assert status == 200


async def test_router_sigkill_leaves_no_children_and_restart_is_clean(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a b", spawn_grandchild=True)
    state = tmp_path / "state"
    r = await start_router("--models-dir", str(d), "--state-dir", str(state))
    await asyncio.gather(r.chat("a"), r.chat("b"))
    children = {p.pid for p in psutil.Process(r.proc.pid).children()}
    everything = {p.pid for p in r.children()}
    assert len(children) == 2 and len(everything) == 4  # each child has a grandchild
    await wait_for(lambda: _recorded(state) == 2, 10, message="children recorded in the state dir")
    await r.stop(signal.SIGKILL)

    def gone(pids: set[int]) -> bool:
        return not any(_alive(p) for p in pids)

    # The children die with the router (parent-death signal)...
    await wait_for(lambda: gone(children), 5, message="children of the SIGKILLed router to die")
    # ...and what they left in their process groups is stopped by the next start.
    r2 = await start_router("--models-dir", str(d), "--state-dir", str(state))
    await wait_for(lambda: gone(everything), 5, message="leftover grandchildren to be stopped")
    assert "leftover" in r2.log()
    assert (await r2.chat("a"))[0] == 200


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _recorded(state: Path) -> int:
    try:
        return len(json.loads((state / "children.json").read_text()))
    except (OSError, ValueError):
        return 0


async def test_second_router_on_same_state_dir_refuses(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a")
    state = tmp_path / "state"
    await start_router("--models-dir", str(d), "--state-dir", str(state))
    second = await start_router("--models-dir", str(d), "--state-dir", str(state), wait=False)
    assert await asyncio.wait_for(second.proc.wait(), 20) == 2
    assert "another llamarouter instance" in second.log() and str(state) in second.log()


async def test_queue_full_and_wait_exceeded_get_503_retry_after(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a b c", tokens=100000, tps=20)
    r = await start_router("--models-dir", str(d), "--models-max", "1", "--max-queue", "1", "--max-wait", "1")
    async with aiohttp.ClientSession() as s:
        async with open_stream(r, "a"):
            first = asyncio.create_task(r.chat("b", max_tokens=1))

            async def queued() -> bool:
                return (await r.models())["b"]["queued"] == 1

            await wait_for(queued, 10)
            async with s.post(r.url + "/v1/chat/completions", json={"model": "c", "messages": []}) as resp:
                assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
                assert (await resp.json())["error"]["type"] == "unavailable_error"
            status, body = await first  # waited past --max-wait behind the busy model
            assert status == 503 and "not ready within" in body["error"]["message"]


async def test_ttl_unloads_idle_model_but_not_a_busy_one(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a b", tokens=40, tps=20)
    preset = tmp_path / "p.ini"
    preset.write_text("[a]\nttl = 0.5\n")
    r = await start_router("--models-dir", str(d), "--models-preset", str(preset))
    async with open_stream(r, "a") as resp:
        # A 2 s stream on a 0.5 s TTL: in flight means not idle.
        rest = await resp.read()
    assert rest.rstrip().endswith(b"data: [DONE]")
    item = await r.wait_status("a", "unloaded", timeout=10)
    assert item["status"]["stop_reason"] == "ttl" and "failed" not in item["status"]
    assert (await r.chat("b", max_tokens=1))[0] == 200
    assert await r.status_of("b") == "loaded"  # no TTL configured for b


async def test_pinned_model_survives_eviction_and_restarts(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a b c")
    preset = tmp_path / "p.ini"
    preset.write_text("[a]\npin = true\n")
    r = await start_router("--models-dir", str(d), "--models-preset", str(preset), "--models-max", "2")
    await r.wait_status("a", "loaded")  # pinned models load at startup
    assert (await r.chat("b", max_tokens=1))[0] == 200
    assert (await r.chat("c", max_tokens=1))[0] == 200
    models = await r.models()
    assert models["a"]["status"]["value"] == "loaded" and models["a"]["pinned"] is True
    assert models["b"]["status"]["value"] == "unloaded"  # evicted instead of the pinned one
    await kill_and_wait_replaced(r, "a")


async def test_logs_endpoint(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a")
    r = await start_router("--models-dir", str(d))
    assert (await r.chat("a", max_tokens=1))[0] == 200
    status, text = await r.get("/models/logs?model=a&lines=500")
    assert status == 200 and "server is listening" in text and "[llamarouter] starting:" in text
    status, _ = await r.get("/models/logs?model=nope")
    assert status == 400
    async with r.session.get(r.url + "/models/logs?model=a&follow=1&lines=1") as resp:
        await resp.content.readline()  # the tail
        assert (await r.post("/models/unload", {"model": "a"}))[0] == 200
        line = await asyncio.wait_for(resp.content.readline(), 10)
        assert line  # new output (the child's shutdown lines) arrives live


async def test_sigterm_lets_stream_finish_then_exits_clean(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a", tokens=30, tps=30)
    r = await start_router("--models-dir", str(d))
    async with open_stream(r, "a") as resp:
        kids = r.children()
        r.proc.send_signal(signal.SIGTERM)
        rest = await resp.read()
    assert rest.rstrip().endswith(b"data: [DONE]")
    assert await asyncio.wait_for(r.proc.wait(), 30) == 0
    assert not any(k.is_running() and k.status() != psutil.STATUS_ZOMBIE for k in kids)


async def test_sighup_reloads(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a")
    r = await start_router("--models-dir", str(d))
    write_fake_model(d / "b.gguf")
    r.proc.send_signal(signal.SIGHUP)

    async def has_b() -> bool:
        return "b" in await r.models()

    await wait_for(has_b, 10, message="SIGHUP to rescan the models dir")


async def test_single_model_mode_is_supervised(tmp_path: Path, start_router: StartRouter) -> None:
    model = write_fake_model(tmp_path / "solo.gguf")
    r = await start_router("-m", str(model), "-c", "256")
    r.models_path = "/llamarouter/models"
    await r.wait_status("solo", "loaded")
    assert (await r.chat("solo", max_tokens=1))[0] == 200
    await kill_and_wait_replaced(r, "solo")


async def test_single_model_health_says_loading_until_ready(tmp_path: Path, start_router: StartRouter) -> None:
    # As llama-server: 503 "Loading model" until the model is loaded, then the child's own
    # answer; every path, any `model` value (or none), goes to the one child.
    model = write_fake_model(tmp_path / "solo.gguf", load_secs=4)
    r = await start_router("-m", str(model), wait=False)

    async def health() -> tuple[int, object] | None:
        try:
            return await r.get("/health")
        except aiohttp.ClientError:
            return None

    first = await wait_for(health, 20, interval=0.02, message="router to listen")
    assert first == (503, {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}})
    await wait_for(lambda: _is_ok(health), 20, interval=0.05, message="the model to load")
    for model_field in ({}, {"model": "gpt-3.5-turbo"}, {"model": "solo"}):
        body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1, **model_field}
        assert (await r.post("/v1/chat/completions", body))[0] == 200, model_field
    status, listing = await r.get("/v1/models")
    assert status == 200 and "status" not in listing["data"][0]  # the child's list, not the router's


async def _is_ok(health: Callable[[], Awaitable[tuple[int, object] | None]]) -> bool:
    got = await health()
    return got is not None and got[0] == 200


async def test_second_signal_forces_exit(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a", ignore_sigterm=True)
    r = await start_router("--models-dir", str(d), "--stop-timeout", "120")
    assert (await r.chat("a", max_tokens=1))[0] == 200
    kids = r.children()
    r.proc.send_signal(signal.SIGTERM)  # the child ignores SIGTERM: shutdown would take 120 s
    await wait_for(lambda: "shutting down" in r.log(), 10)
    await wait_for(lambda: "ready -> stopping" in r.log(), 10)
    r.proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(r.proc.wait(), 20) == 1
    assert "forced exit" in r.log()

    def gone() -> bool:
        return not any(_alive(k.pid) for k in kids)

    await wait_for(gone, 5, message="children to be killed by the forced exit")


async def test_request_right_after_a_crash_waits_for_the_restart(tmp_path: Path, start_router: StartRouter) -> None:
    """Regression: after a READY child crashed, a request arriving during the restart saw
    the old, settled ready-future and spun the event loop at 100 % forever."""
    d = make_models(tmp_path, "a", load_secs=0.5)
    r = await start_router("--models-dir", str(d))
    assert (await r.chat("a", max_tokens=1))[0] == 200
    victim = child_of(r, "a")
    assert victim is not None
    victim.kill()
    await wait_for(lambda: "restarting in" in r.log(), 10, message="the restart to begin")
    status, body = await asyncio.wait_for(r.chat("a", max_tokens=1), 20)
    assert status == 200, body
    assert (await r.get("/health"))[0] == 200


async def test_request_sent_the_instant_a_child_dies_is_served(tmp_path: Path, start_router: StartRouter) -> None:
    """A request may reach the router before the child's exit is processed: connecting to
    the dead child fails, and since the child never saw the request, it is sent again once
    the restart is under way (seen with the real llama-server in CI)."""
    d = make_models(tmp_path, "a")
    r = await start_router("--models-dir", str(d), "--restart-max", "10")
    for _ in range(3):
        assert (await r.chat("a", max_tokens=1))[0] == 200
        victim = child_of(r, "a")
        assert victim is not None
        victim.kill()
        status, body = await asyncio.wait_for(r.chat("a", max_tokens=1), 30)
        assert status == 200, body


async def test_request_is_not_sent_twice_to_a_live_child(tmp_path: Path, start_router: StartRouter) -> None:
    # 10 tokens at 1 token/s against a 1 s proxy timeout: the child is alive but too slow.
    d = make_models(tmp_path, "a", tokens=10, tps=1)
    r = await start_router("--models-dir", str(d), "-to", "1")
    await r.post("/models/load", {"model": "a"})
    await r.wait_status("a", "loaded")
    status, body = await asyncio.wait_for(r.chat("a"), 30)
    assert status == 500 and "proxy error" in body["error"]["message"]
    args = (await r.models())["a"]["status"]["args"]
    port = args[args.index("--port") + 1]
    async with r.session.get(f"http://127.0.0.1:{port}/fake/stats") as resp:
        stats = await resp.json()
    assert stats["requests"].get("/v1/chat/completions", 0) == 1, stats["requests"]
