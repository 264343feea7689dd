"""Hangs and wedges of the old supervision core, reproduced against a real router process
with fake children. Each test drives the router only through HTTP and signals, so it runs
unchanged against any version of the core; each failed (hung, wedged or leaked) on the
core that had two writers of a model's state."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path

import aiohttp
import psutil

from tests.conftest import Events, Router, StartRouter, make_models, open_stream, run_router_to_exit
from tests.fakes.helpers import wait_for, write_fake_model


async def health_within(r: Router, limit: float) -> None:
    async with asyncio.timeout(limit):
        status, _ = await r.get("/health")
    assert status == 200


async def test_reload_removing_a_queued_model_answers_its_waiter(tmp_path: Path, start_router: StartRouter) -> None:
    """Was: the waiter loop spun without yielding once its model was gone; the event loop
    froze at 100 % CPU, /health stopped answering and SIGTERM could not end the router."""
    d = make_models(tmp_path, "a b", tokens=100000, tps=20)
    r = await start_router("--models-dir", str(d), "--models-max", "1")
    async with open_stream(r, "a"):  # a is busy: b must queue
        queued = asyncio.create_task(r.chat("b", max_tokens=1))
        await wait_for(lambda: _queued(r, "b"), 10, message="b to be queued")
        (d / "b.gguf").unlink()
        status, _ = await r.get("/models?reload=1")
        assert status == 200
        status, body = await asyncio.wait_for(queued, 10)
        assert status == 400 and "not found" in body["error"]["message"], body
        await health_within(r, 2)
    assert await r.stop(timeout=15) == 0


async def _queued(r: Router, name: str) -> bool:
    return (await r.models())[name]["queued"] > 0


async def test_single_model_mode_on_a_busy_port_exits_with_the_bind_error(tmp_path: Path, fake_bin: Path) -> None:
    """Was: the model went starting -> stopping and the process hung forever."""
    model = write_fake_model(tmp_path / "solo.gguf")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        rc, out = await run_router_to_exit("-m", str(model), "--port", str(port), "--server-bin", str(fake_bin), timeout=20)
    assert rc == 1, out
    assert b"couldn't bind" in out, out
    assert b"stopped -> starting" not in out  # nothing was spawned


async def test_single_model_mode_exits_when_its_model_cannot_load(tmp_path: Path, fake_bin: Path) -> None:
    """Was: the router stayed up answering 503 for good, where llama-server exits with 1
    (a typo in -m looked like a live service to systemd or Docker)."""
    model = write_fake_model(tmp_path / "solo.gguf", crash_on_start=True, exit_code=3)
    rc, out = await run_router_to_exit(
        "-m", str(model), "--port", "0", "--host", "127.0.0.1", "--server-bin", str(fake_bin), "--restart-max", "2",
        timeout=30,
    )
    assert rc == 1, out
    assert b"model name=solo: " in out and b"exiting, as llama-server does" in out, out
    assert b"giving up after 2 failures" in out, out  # supervised first: retried, then failed


async def test_single_model_mode_stays_up_when_a_model_that_served_fails(
    tmp_path: Path, start_router: StartRouter
) -> None:
    # Only a model that never served ends the router: once it has, crashes are the
    # supervisor's to restart, and a model that then fails for good answers 503.
    model = write_fake_model(tmp_path / "solo.gguf")
    r = await start_router("-m", str(model), "--restart-max", "2")
    r.models_path = "/llamarouter/models"
    await r.wait_status("solo", "loaded")
    write_fake_model(model, crash_on_start=True)  # its restarts fail from now on
    (child,) = psutil.Process(r.proc.pid).children()
    child.kill()
    async def failed() -> bool:
        return (await r.models())["solo"]["status"].get("state") == "failed"

    await wait_for(failed, 20, message="the restarts to fail")
    assert "giving up after 2 failures" in r.log()
    assert r.proc.returncode is None
    assert (await r.chat("solo", max_tokens=1))[0] == 503


async def test_second_signal_during_a_stream_exits_at_once(tmp_path: Path, start_router: StartRouter) -> None:
    """Was: "forced exit" was logged and the children died, but the process stayed in the
    loop's executor shutdown (5 of 6 tries)."""
    for attempt in range(2):
        d = make_models(tmp_path / str(attempt), "a", tokens=100000, tps=20)
        r = await start_router("--models-dir", str(d))
        async with open_stream(r, "a"):
            r.proc.send_signal(signal.SIGINT)
            await wait_for(lambda: "shutting down" in r.log(), 10)
            began = time.monotonic()
            r.proc.send_signal(signal.SIGINT)
            assert await asyncio.wait_for(r.proc.wait(), 10) == 1
            # The documented bound (force-exit setting, 2 s) plus process start-up slack.
            assert time.monotonic() - began < 5
        assert "forced exit" in r.log()


async def test_stop_during_the_post_ready_info_fetch_settles(tmp_path: Path, start_router: StartRouter) -> None:
    """Was: READY was set after the stop, raising InvalidTransition in an unobserved task;
    the model stayed `stopping` holding a slot, and shutdown hung."""
    d = make_models(tmp_path, "a", models_delay=3.0)
    r = await start_router("--models-dir", str(d))
    assert (await r.post("/models/load", {"model": "a"}))[0] == 200
    # The child answers /health; the router is inside its slow /v1/models fetch.
    await wait_for(lambda: _child_says(r, "a", "all slots are idle"), 10)
    assert (await r.models())["a"]["status"]["value"] == "loading"
    status, body = await r.post("/models/unload", {"model": "a"})
    assert status == 200, body
    await r.wait_status("a", "unloaded", timeout=10)
    assert (await r.models())["a"]["status"]["state"] == "stopped"
    assert "InvalidTransition" not in r.log()
    assert await r.stop(timeout=15) == 0


async def _child_says(r: Router, name: str, text: str) -> bool:
    status, body = await r.get(f"/models/logs?model={name}")
    return status == 200 and text in body


async def test_cancelled_start_is_never_reported_loaded(tmp_path: Path, start_router: StartRouter) -> None:
    """Was: starting -> stopping showed as `loaded` on /models/sse, then `unloaded` with
    exit_code -9, which reads as a crash."""
    d = make_models(tmp_path, "a", load_secs=2.0)
    r = await start_router("--models-dir", str(d))
    async with Events(r) as events:
        assert (await r.post("/models/load", {"model": "a"}))[0] == 200
        assert (await r.post("/models/unload", {"model": "a"}))[0] == 200
        await wait_for(lambda: "a" in events.order("status_change", "unloaded"), 10)
    statuses = [e["data"]["status"] for e in events.items if e["model"] == "a" and "data" in e]
    assert "loaded" not in statuses, events.items
    final = [e for e in events.items if e["model"] == "a" and e.get("data", {}).get("status") == "unloaded"]
    assert final[-1]["data"]["exit_code"] == 0, final


async def test_pinned_model_comes_back_after_unload_and_reload(tmp_path: Path, start_router: StartRouter) -> None:
    """Was: a pinned model stayed unloaded after an unload or a reload that changed it."""
    d = make_models(tmp_path, "p")
    preset = tmp_path / "p.ini"
    preset.write_text("[p]\npin = true\nc = 1000\n")
    r = await start_router("--models-dir", str(d), "--models-preset", str(preset))
    await r.wait_status("p", "loaded", timeout=15)
    assert (await r.post("/models/unload", {"model": "p"}))[0] == 200
    await wait_for(lambda: r.log().count("[p] stopped -> starting") >= 2, 15,
                   message="p to be started again after the unload")
    await r.wait_status("p", "loaded", timeout=15)
    preset.write_text("[p]\npin = true\nc = 2000\n")
    assert (await r.get("/models?reload=1"))[0] == 200
    await wait_for(lambda: r.log().count("[p] stopped -> starting") >= 3, 15,
                   message="p to be started with its new definition")
    item = await r.wait_status("p", "loaded", timeout=15)
    assert "2000" in item["status"]["args"], item["status"]["args"]


async def test_bad_memory_budget_releases_everything(tmp_path: Path, start_router: StartRouter) -> None:
    """Was: the HTTP client session leaked and the state-dir lock was not released."""
    d = make_models(tmp_path, "a")
    state = tmp_path / "state"
    r = await start_router(
        "--models-dir", str(d), "--state-dir", str(state),
        "--memory-budget", "auto", "--memory-margin", "1000000TiB", wait=False,
    )
    assert await asyncio.wait_for(r.proc.wait(), 20) != 0
    assert "margin" in r.log()
    assert "Unclosed client session" not in r.log()
    # The lock is free: a router on the same state dir starts.
    r2 = await start_router("--models-dir", str(d), "--state-dir", str(state))
    assert (await r2.get("/health"))[0] == 200


async def test_load_racing_a_reload_leaves_no_untracked_child(tmp_path: Path, start_router: StartRouter) -> None:
    """Was: the load answered success for a model the reload had just removed; its child
    ran untracked and a request for another model started a second child under
    --models-max 1."""
    d = make_models(tmp_path, "x y")
    r = await start_router("--models-dir", str(d), "--models-max", "1")
    assert (await r.chat("y", max_tokens=1))[0] == 200
    (d / "x.gguf").unlink()
    load, reload = await asyncio.gather(
        r.post("/models/load", {"model": "x"}), r.get("/models?reload=1")
    )
    assert reload[0] == 200
    models = await r.models()
    assert "x" not in models
    assert (await r.chat("y", max_tokens=1))[0] == 200

    def at_most_one_child() -> bool:
        return len([c for c in r.children() if c.status() != psutil.STATUS_ZOMBIE]) <= 1

    # Both the load and the chat have been answered: a leaked spawn would be running now.
    await wait_for(at_most_one_child, 10, message="no more children than --models-max")
    assert at_most_one_child()


async def test_shutdown_cuts_a_stream_after_one_grace_not_two(tmp_path: Path, start_router: StartRouter) -> None:
    """Was: with --shutdown-grace 2 / 4 / 30 the stream was cut after 4 / 8 / 61 s."""
    d = make_models(tmp_path, "a", tokens=100000, tps=20)
    r = await start_router("--models-dir", str(d), "--shutdown-grace", "3")
    async with open_stream(r, "a") as resp:
        began = time.monotonic()
        r.proc.send_signal(signal.SIGTERM)
        with_error = False
        try:
            await asyncio.wait_for(resp.read(), 15)
        except aiohttp.ClientPayloadError:
            with_error = True
        cut_after = time.monotonic() - began
    assert await asyncio.wait_for(r.proc.wait(), 15) == 0
    assert 2.5 < cut_after < 5.0, (cut_after, with_error)


async def test_client_disconnects_are_not_counted_as_errors(tmp_path: Path, start_router: StartRouter) -> None:
    """Was: a disconnect noticed while writing counted as a 500 in llamarouter_requests_total."""
    d = make_models(tmp_path, "a", tokens=1000000)  # as fast as the fake can write
    r = await start_router("--models-dir", str(d))
    body = {"model": "a", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    for _ in range(40):
        async with aiohttp.ClientSession() as s:
            async with s.post(r.url + "/v1/chat/completions", json=body) as resp:
                await resp.content.readuntil(b"\n\n")
            # Leaving the block closes the connection mid-stream.
    await wait_for(lambda: _idle(r), 10)
    status, text = await r.get("/metrics")
    assert status == 200
    lines = [ln for ln in text.splitlines() if ln.startswith("llamarouter_requests_total{")]
    assert lines, text
    assert not [ln for ln in lines if 'code="500"' in ln], lines


async def _idle(r: Router) -> bool:
    return (await r.models())["a"]["in_flight"] == 0


async def test_unloading_a_busy_model_ends_its_requests_at_once(tmp_path: Path, start_router: StartRouter) -> None:
    """Was: llama-server waits for its open connections before it exits, and the router
    kept them open, so a stream on a model being unloaded went silent for the whole
    --stop-timeout before the child was SIGKILLed; and a whole-response request in
    flight was replayed, which loaded the model again the admin had just unloaded."""
    d = make_models(tmp_path, "a", tokens=100000, tps=20, term_waits_for_clients=True)
    # Two slots: with the fake's one, whichever request reached it second waited behind
    # the other's endless generation, and the stream never sent its first event.
    r = await start_router("--models-dir", str(d), "--stop-timeout", "60", "-np", "2")
    async with aiohttp.ClientSession() as s:
        body = {"model": "a", "messages": [{"role": "user", "content": "x"}]}
        whole = asyncio.create_task(s.post(r.url + "/v1/chat/completions", json=body))
        async with open_stream(r, "a") as stream:
            await wait_for(lambda: _in_flight(r, "a", 2), 10, message="both requests to reach the model")
            assert (await r.post("/models/unload", {"model": "a"}))[0] == 200
            async with asyncio.timeout(15):  # a quarter of the stop timeout
                rest = await stream.content.read()
                await r.wait_status("a", "unloaded")
                resp = await whole
        assert b'"type": "server_error"' in rest and b"unloaded" in rest, rest[-500:]
        assert resp.status == 500
        assert "unloaded" in (await resp.json())["error"]["message"]
    assert "killing" not in r.log()
    assert (await r.models())["a"]["status"]["value"] == "unloaded"  # not loaded again


async def _in_flight(r: Router, name: str, n: int) -> bool:
    return (await r.models())[name]["in_flight"] == n
