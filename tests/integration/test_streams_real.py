"""Resumable streams through the router with the real llama-server, side by side with
upstream's router: the same stream resumed from its start, looked up, stopped, gone.
About 6 s on 2 cores."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import StartRouter
from tests.fakes.helpers import wait_for
from tests.integration.conftest import StartPair, TinyModels

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

CONV = "conv-stream-test::alpha"


async def test_resume_lookup_and_stop_side_by_side(start_pair: StartPair, tiny_models: TinyModels) -> None:
    pair = await start_pair("--models-dir", str(tiny_models.dir), "-c", "512", "-np", "1")
    answers = {}
    for who, router in pair.both():
        body = {"model": "alpha", "stream": True, "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "hello"}]}
        async with router.session.post(router.url + "/v1/chat/completions", json=body,
                                       headers={"X-Conversation-Id": CONV}) as resp:
            assert resp.status == 200, who
            live = (await resp.read()).decode()
        assert "data: " in live, who
        # The finished session replays from its start, through the router.
        status, replay = await router.get("/v1/stream", params={"conv_id": CONV, "from": "0"})
        assert status == 200, (who, replay)
        assert isinstance(replay, str) and "data: " in replay, (who, replay)
        # Only ids the caller names are looked up, at the child that served them.
        status, found = await router.post("/v1/streams/lookup", {"conversation_ids": ["alpha-other", CONV]})
        assert status == 200 and isinstance(found, list) and len(found) == 1, (who, found)
        assert found[0].get("conversation_id") == CONV, (who, found)
        async with router.session.delete(router.url + "/v1/stream", params={"conv_id": CONV}) as resp:
            assert resp.status == 204, who
        status, gone = await router.get("/v1/stream", params={"conv_id": CONV, "from": "0"})
        assert status == 404 and gone["error"]["message"] == "File Not Found", (who, gone)
        answers[who] = (sorted(found[0]), _events(replay))
    assert answers["upstream"][0] == answers["llamarouter"][0]
    # Same model, same binary, temperature 0: the replayed streams carry the same text.
    assert _text(answers["upstream"][1]) == _text(answers["llamarouter"][1])


async def test_a_client_gone_during_the_load_can_resume(
    start_router: StartRouter, llama_server_bin: Path, tiny_models: TinyModels,
) -> None:
    """The client drops while its model loads (a page reload): the request still reaches
    the child once it is ready, and the stream is there to resume from its start."""
    router = await start_router("--models-dir", str(tiny_models.dir), "-c", "512", "-np", "1",
                                server_bin=llama_server_bin)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with router.session.get(router.url + "/models/sse", timeout=timeout) as sse:
        body = json.dumps({"model": "alpha", "stream": True, "max_tokens": 8,
                           "messages": [{"role": "user", "content": "hello"}]}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", router.port)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"X-Conversation-Id: {CONV}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        await writer.drain()
        async for raw in sse.content:  # the load has begun: drop the client now
            if b'"model":"alpha"' in raw and b'"loading"' in raw:
                break
    writer.close()
    await writer.wait_closed()
    assert (await router.status_of("alpha")) == "loading"

    async def replay() -> str | None:
        status, text = await router.get("/v1/stream", params={"conv_id": CONV, "from": "0"})
        assert status in (200, 404, 503), (status, text)
        return text if status == 200 and "data: " in text else None

    text = await wait_for(replay, 30, interval=0.1, message="the stream to be resumable")
    assert _text(_events(text))


def _events(sse: str) -> list[dict[str, object]]:
    out = []
    for line in sse.splitlines():
        if line.startswith("data: ") and line[6:].strip() != "[DONE]":
            out.append(json.loads(line[6:]))
    return out


def _text(events: list[dict[str, object]]) -> str:
    parts = []
    for e in events:
        for choice in e.get("choices") or []:  # type: ignore[attr-defined]
            parts.append((choice.get("delta") or {}).get("content") or "")
    return "".join(parts)
