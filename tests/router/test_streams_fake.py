"""Resumable streams in router mode, the router's part (the conversation -> model map),
with the fake llama-server: a resume while the owner loads is a 503 to retry, a stop
during the load cancels the request that waits for it, and bad requests get upstream's
answers. The child's part (the stream buffers) is tested with the real llama-server in
tests/integration/test_streams_real.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.conftest import StartRouter
from tests.fakes.helpers import write_fake_model

CONV = "conv-1::alpha"


async def test_stop_during_the_load_cancels_the_waiting_request(start_router: StartRouter, tmp_path: Path) -> None:
    write_fake_model(tmp_path / "models" / "alpha.gguf", load_secs=2.0)
    r = await start_router("--models-dir", str(tmp_path / "models"))
    post = asyncio.create_task(r.post(
        "/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "hi"}]},
        headers={"X-Conversation-Id": CONV},
    ))
    await r.wait_status("alpha", "loading", timeout=10)
    status, body = await r.get("/v1/stream", params={"conv_id": CONV, "from": "0"})
    assert (status, body["error"]["type"]) == (503, "unavailable_error"), body
    assert body["error"]["message"] == "Stream owner model is loading, retry later"
    async with r.session.delete(r.url + "/v1/stream", params={"conv_id": CONV}) as resp:
        assert resp.status == 204
    status, body = await asyncio.wait_for(post, 20)
    assert status == 400, body
    assert body["error"]["message"] == "request cancelled by a stop while the model was loading"
    status, body = await r.get("/v1/stream", params={"conv_id": CONV})
    assert status == 404 and body["error"]["message"] == "File Not Found"
    # A request of the same conversation after the stop is served as usual.
    status, _ = await r.chat("alpha")
    assert status == 200


async def test_bad_stream_requests(start_router: StartRouter, tmp_path: Path) -> None:
    write_fake_model(tmp_path / "models" / "alpha.gguf")
    r = await start_router("--models-dir", str(tmp_path / "models"))
    assert await r.post("/v1/streams/lookup", data=b"{not json") == (200, [])
    assert await r.post("/v1/streams/lookup", {"conversation_ids": ["never-seen", 5, ""]}) == (200, [])
    for method in ("GET", "DELETE"):
        async with r.session.request(method, r.url + "/v1/stream") as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["message"] == "Missing conversation id in path"
    status, body = await r.get("/v1/stream", params={"conv_id": "never-seen"})
    assert status == 404 and body["error"]["message"] == "File Not Found"
