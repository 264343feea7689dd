"""The router's API against fake children: shapes, codes, routing, streaming."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from tests.conftest import StartRouter
from tests.fakes.helpers import wait_for, write_fake_model


def models_dir(tmp_path: Path, **models: dict) -> Path:
    d = tmp_path / "models"
    for name, knobs in models.items():
        write_fake_model(d / f"{name}.gguf", **knobs)
    return d


async def test_models_list_shape_and_cold_then_warm_chat(tmp_path: Path, start_router: StartRouter) -> None:
    d = models_dir(tmp_path, alpha={}, beta={})
    r = await start_router("--models-dir", str(d), "-c", "1024", "--temp", "0.5", "--jinja")
    models = await r.models()
    assert sorted(models) == ["alpha", "beta"]
    item = models["alpha"]
    assert item["object"] == "model" and item["owned_by"] == "llamacpp"
    assert item["source"] == "models_dir" and item["can_remove"] is False
    assert item["status"]["value"] == "unloaded"
    assert "failed" not in item["status"]
    args = item["status"]["args"]
    # Upstream shows the would-be command line with port 0 for a model not running.
    assert args[1:3] == ["--host", "127.0.0.1"]
    assert args[args.index("--port") + 1] == "0" and args[args.index("--alias") + 1] == "alpha"
    assert "--ctx-size" in args and args[args.index("--ctx-size") + 1] == "1024"
    assert "--jinja" in args and "--models-dir" not in args
    assert item["status"]["preset"].startswith("[alpha]\n")
    assert "ctx-size = 1024" in item["status"]["preset"]

    status, body = await r.chat("alpha", max_tokens=3)
    assert status == 200, body
    assert body["object"] == "chat.completion" and body["model"] == "alpha"
    loaded = (await r.models())["alpha"]
    assert loaded["status"]["value"] == "loaded"
    assert loaded["meta"]["n_ctx_train"] == 2048  # merged from the child's /v1/models
    port_args = loaded["status"]["args"]
    assert port_args[port_args.index("--port") + 1] != "0"
    status, body = await r.chat("alpha", max_tokens=2)
    assert status == 200 and body["usage"]["completion_tokens"] == 2


async def test_errors_match_upstream(tmp_path: Path, start_router: StartRouter) -> None:
    d = models_dir(tmp_path, alpha={})
    r = await start_router("--models-dir", str(d))
    cases = [
        ({"model": "nope"}, 400, "model 'nope' not found"),
        ({"messages": []}, 400, "model name is missing from the request"),
        ({"model": 7}, 400, "model name is missing from the request"),
        ([1, 2], 400, "model name is missing from the request"),
    ]
    for body, code, message in cases:
        status, got = await r.post("/v1/chat/completions", body)
        assert status == code, (body, got)
        assert got == {"error": {"code": code, "message": message, "type": "invalid_request_error"}}
    status, got = await r.post("/v1/chat/completions", data=b"{not json")
    assert status == 400 and got["error"]["type"] == "invalid_request_error"
    status, got = await r.post("/models/load", {"model": "nope"})
    # Upstream's HTTP layer rewrites every 404 body to "File Not Found".
    assert (status, got["error"]["message"], got["error"]["type"]) == (404, "File Not Found", "not_found_error")
    status, got = await r.post("/models/unload", {"model": "nope"})
    assert (status, got["error"]["message"]) == (400, "model is not found")
    status, got = await r.post("/models/unload", {"model": "alpha"})
    assert (status, got["error"]["message"]) == (400, "model is not running")
    status, got = await r.get("/no/such/path")
    assert status == 404 and got["error"]["type"] == "not_found_error"
    status, got = await r.get("/slots")  # GET routes take the model from ?model=
    assert status == 400 and got["error"]["message"] == "model name is missing from the request"
    # None of that started a child.
    assert not r.children()


async def test_load_unload_endpoints(tmp_path: Path, start_router: StartRouter) -> None:
    d = models_dir(tmp_path, alpha={"load_secs": 0.3})
    r = await start_router("--models-dir", str(d))
    status, body = await r.post("/models/load", {"model": "alpha"})
    assert (status, body) == (200, {"success": True})
    status, body = await r.post("/models/load", {"model": "alpha"})
    assert (status, body["error"]["message"]) == (400, "model is already running")
    await r.wait_status("alpha", "loaded")
    status, body = await r.post("/models/unload", {"model": "alpha"})
    assert (status, body) == (200, {"success": True})
    item = await r.wait_status("alpha", "unloaded")
    # An unload is not a crash (llama.cpp #23257): no failed flag.
    assert "failed" not in item["status"] and item["status"]["stop_reason"] == "unloaded"
    await wait_for(lambda: not r.children(), 10, message="child to exit")


async def test_autoload_off_and_per_request_override(tmp_path: Path, start_router: StartRouter) -> None:
    d = models_dir(tmp_path, alpha={})
    r = await start_router("--models-dir", str(d), "--no-models-autoload")
    status, body = await r.chat("alpha")
    assert (status, body["error"]["message"]) == (400, "model is not loaded")
    status, body = await r.get("/props")
    assert body["role"] == "router" and body["models_autoload"] is False and body["max_instances"] == 4
    status, body = await r.post("/v1/chat/completions?autoload=true", {"model": "alpha", "messages": [{"role": "user", "content": "x"}]})
    assert status == 200, body
    assert await r.status_of("alpha") == "loaded"
    status, body = await r.get("/props?model=alpha")
    assert status == 200 and "default_generation_settings" in body and "role" not in body


async def test_api_key(tmp_path: Path, start_router: StartRouter) -> None:
    d = models_dir(tmp_path, alpha={})
    keyfile = tmp_path / "keys"
    keyfile.write_text("second-key\n\nthird-key\n")
    r = await start_router("--models-dir", str(d), "--api-key", "first-key", "--api-key-file", str(keyfile))
    assert (await r.get("/health"))[0] == 200
    assert (await r.get("/v1/health"))[0] == 200
    status, body = await r.get("/models")
    assert status == 401
    assert body == {"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}}
    assert (await r.get("/models", headers={"Authorization": "Bearer wrong"}))[0] == 401
    for key in ("first-key", "second-key", "third-key"):
        assert (await r.get("/models", headers={"Authorization": f"Bearer {key}"}))[0] == 200
    assert (await r.get("/models", headers={"X-Api-Key": "third-key"}))[0] == 200
    status, body = await r.post(
        "/v1/chat/completions",
        {"model": "alpha", "messages": [{"role": "user", "content": "x"}]},
        headers={"Authorization": "Bearer first-key"},
    )
    assert status == 200
    # The key reaches the child too, as upstream forwards every header.
    r.headers = {"Authorization": "Bearer second-key"}
    stats = await _child_stats(r, "alpha")
    assert {k.lower(): v for k, v in stats["last_headers"].items()}["authorization"] == "Bearer first-key"


async def _child_stats(r, name: str) -> dict:  # type: ignore[no-untyped-def]
    args = (await r.models())[name]["status"]["args"]
    port = args[args.index("--port") + 1]
    async with r.session.get(f"http://127.0.0.1:{port}/fake/stats") as resp:
        return await resp.json()


async def test_stream_passes_through_unchanged(tmp_path: Path, start_router: StartRouter) -> None:
    d = models_dir(tmp_path, alpha={"tokens": 6})
    r = await start_router("--models-dir", str(d))
    body = {"model": "alpha", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with r.session.post(r.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers.get("X-Accel-Buffering") == "no"
        via_router = await resp.read()
    args = (await r.models())["alpha"]["status"]["args"]
    port = args[args.index("--port") + 1]
    async with r.session.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as resp:
        direct = await resp.read()
    events = [e for e in via_router.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    assert len(events) == len([e for e in direct.split(b"\n\n") if e])
    deltas = [json.loads(e[6:]) for e in events[:-1]]
    assert sum(1 for d_ in deltas if d_["choices"][0]["delta"].get("content")) == 6


async def test_client_disconnect_cancels_upstream(tmp_path: Path, start_router: StartRouter) -> None:
    d = models_dir(tmp_path, alpha={"tokens": 1000, "tps": 50})
    r = await start_router("--models-dir", str(d))
    body = {"model": "alpha", "stream": True, "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as own:
        async with own.post(r.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            await resp.content.readuntil(b"\n\n")  # the stream is flowing
    # Leaving the block closed our connection mid-stream.
    async def cancelled() -> bool:
        return (await _child_stats(r, "alpha"))["cancelled_streams"] >= 1

    await wait_for(cancelled, 10, message="the child to see the stream cancelled")
    item = (await r.models())["alpha"]
    assert item["in_flight"] == 0


async def test_aliases_and_presets(tmp_path: Path, start_router: StartRouter) -> None:
    d = models_dir(tmp_path, alpha={})
    other = write_fake_model(tmp_path / "elsewhere" / "gamma-file.gguf")
    preset = tmp_path / "presets.ini"
    preset.write_text(
        "[*]\nc = 2048\n\n"
        "[alpha]\nalias = a1,a2\ntags = small,test\nn-gpu-layers = 7\n\n"
        f"[gamma]\nmodel = {other}\nLLAMA_ARG_CTX_SIZE = 512\nno-jinja = true\n"
    )
    r = await start_router("--models-dir", str(d), "--models-preset", str(preset), "--temp", "0.1")
    models = await r.models()
    assert models["alpha"]["aliases"] == ["a1", "a2"] and models["alpha"]["tags"] == ["small", "test"]
    assert models["alpha"]["source"] == "preset" and models["gamma"]["source"] == "preset"
    args = models["alpha"]["status"]["args"]
    assert args[args.index("--ctx-size") + 1] == "2048"
    assert args[args.index("--n-gpu-layers") + 1] == "7"
    gamma = models["gamma"]["status"]["args"]
    assert gamma[gamma.index("--ctx-size") + 1] == "512"  # model section beats [*]
    assert "--no-jinja" in gamma and gamma[gamma.index("--temperature") + 1] == "0.1"
    status, body = await r.chat("a2")
    assert status == 200 and body["model"] == "a2"
    assert await r.status_of("alpha") == "loaded"


async def test_bad_preset_is_a_clear_startup_error(tmp_path: Path, start_router: StartRouter) -> None:
    d = models_dir(tmp_path, alpha={})
    preset = tmp_path / "bad.ini"
    preset.write_text("[alpha]\nsystem-prompt = hello\n")
    r = await start_router("--models-dir", str(d), "--models-preset", str(preset), wait=False)
    code = await asyncio.wait_for(r.proc.wait(), 20)
    assert code == 2
    log = r.log()
    assert "system-prompt" in log and "[alpha]" in log and str(preset) in log


async def test_reload_applies_changes(tmp_path: Path, start_router: StartRouter) -> None:
    d = models_dir(tmp_path, alpha={}, beta={})
    preset = tmp_path / "p.ini"
    preset.write_text("[beta]\nc = 1000\n")
    r = await start_router("--models-dir", str(d), "--models-preset", str(preset))
    assert (await r.chat("alpha"))[0] == 200
    assert (await r.chat("beta"))[0] == 200
    events: list[dict] = []
    subscribed = asyncio.Event()

    async def collect() -> None:
        async with r.session.get(r.url + "/models/sse") as resp:
            subscribed.set()  # the router subscribes before it sends the headers
            async for line in resp.content:
                if line.startswith(b"data: "):
                    events.append(json.loads(line[6:]))

    watcher = asyncio.create_task(collect())
    await asyncio.wait_for(subscribed.wait(), 10)
    try:
        write_fake_model(d / "gamma.gguf")
        preset.write_text("[beta]\nc = 2000\n")
        status, body = await r.get("/models?reload=1")
        assert status == 200
        ids = {m["id"]: m for m in body["data"]}
        assert "gamma" in ids
        assert ids["beta"]["status"]["value"] == "unloaded"  # its preset changed
        assert ids["alpha"]["status"]["value"] == "loaded"  # untouched
        (d / "alpha.gguf").unlink()
        status, body = await r.get("/models?reload=1")
        assert "alpha" not in {m["id"] for m in body["data"]}
        await wait_for(lambda: any(e["event"] == "models_reload" for e in events), 5)
    finally:
        watcher.cancel()
    await wait_for(lambda: len(r.children()) == 0, 10, message="children of changed models to exit")


async def test_multipart_audio_is_routed_by_its_model_field(tmp_path: Path, start_router: StartRouter) -> None:
    d = models_dir(tmp_path, alpha={})
    r = await start_router("--models-dir", str(d))
    audio = bytes(range(256)) * 40
    form = aiohttp.FormData()
    form.add_field("model", "alpha")
    form.add_field("file", audio, filename="a.wav", content_type="audio/wav")
    async with r.session.post(r.url + "/v1/audio/transcriptions", data=form) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body == {"text": "fake transcript", "model": "alpha", "file_bytes": len(audio)}
    form = aiohttp.FormData()
    form.add_field("file", b"x", filename="a.wav")
    async with r.session.post(r.url + "/v1/audio/transcriptions", data=form) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["message"] == "model name is missing from the request"


async def test_port_taken_before_bind_is_retried(tmp_path: Path, start_router: StartRouter) -> None:
    d = models_dir(tmp_path, alpha={"bind_fail": True})
    r = await start_router("--models-dir", str(d))
    status, body = await r.chat("alpha")
    # Every attempt lost its port: retried on fresh ports, then reported, not a crash loop.
    assert status == 503 and "could not bind a port" in body["error"]["message"]
    assert r.log().count("port taken before the child bound it") == 5
