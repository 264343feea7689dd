"""Connections from the router to its children fit the child: never more at once than it
has HTTP threads, and idle ones closed by the router before the child's keep-alive does;
and the relay itself: large responses, HTTP/1.0 clients, clients that stop reading."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from tests.conftest import Router, StartRouter
from tests.fakes.helpers import wait_for, write_fake_model

CHAT = "/v1/chat/completions"


async def _child_stats(r: Router, name: str) -> dict[str, Any]:
    args = (await r.models())[name]["status"]["args"]
    port = args[args.index("--port") + 1]
    async with r.session.get(f"http://127.0.0.1:{port}/fake/stats") as resp:
        return await resp.json()  # type: ignore[no-any-return]


async def test_idle_connections_close_before_the_childs_keepalive(
    tmp_path: Path, start_router: StartRouter
) -> None:
    # The child closes idle connections after 2 s (llama-server: 5 s); the router must
    # close its own idle ones first, so no request can meet a connection being closed.
    write_fake_model(tmp_path / "m" / "alpha.gguf", keepalive_secs=2.0)
    r = await start_router(
        "--models-dir", str(tmp_path / "m"), "--proxy-idle-timeout", "0.3",
        # Keeps the router's own health-probe connection busy, so that only the proxy's
        # connections can go idle for long.
        "--health-interval", "0.3",
    )
    for _ in range(3):
        status, body = await r.chat("alpha", max_tokens=2)
        assert status == 200, body

    async def closed_by_router() -> dict[str, Any] | None:
        conns = (await _child_stats(r, "alpha"))["connections"]
        return conns if CHAT in conns["closed_by_client_paths"] else None

    conns = await wait_for(closed_by_router, 10, message="the router to close its idle connection")
    assert CHAT not in conns["closed_by_server_paths"], conns
    # And the next request simply opens a new one.
    status, body = await r.chat("alpha", max_tokens=2)
    assert status == 200, body


async def test_connections_never_exceed_the_childs_http_threads(
    tmp_path: Path, start_router: StartRouter
) -> None:
    # The router believes the child has 3 HTTP threads (--threads-http 3, inherited), and
    # keeps one for its own probes: at most 2 proxied connections at once. The fake serves
    # 4 connections at once (one spare for this test's stats requests) and leaves any
    # further one unread, as llama-server's fixed worker threads do.
    write_fake_model(
        tmp_path / "m" / "alpha.gguf", http_threads=4, keepalive_secs=2.0, tokens=4, tps=40.0
    )
    r = await start_router("--models-dir", str(tmp_path / "m"), "--threads-http", "3", "-np", "2")
    status, body = await r.chat("alpha", max_tokens=1)  # loaded: the burst below finds it ready
    assert status == 200, body

    async def stream(i: int) -> str:
        body = {"model": "alpha", "stream": True, "messages": [{"role": "user", "content": str(i)}]}
        async with r.session.post(r.url + CHAT, json=body) as resp:
            assert resp.status == 200
            return (await resp.read()).decode()

    texts = await asyncio.wait_for(asyncio.gather(*(stream(i) for i in range(8))), 60)
    assert all(t.rstrip().endswith("data: [DONE]") for t in texts), texts
    conns = (await _child_stats(r, "alpha"))["connections"]
    assert conns["max_waiting"] == 0, conns
    # All 8 went through at most 2 connections (plus the router's probe and the stats one).
    assert conns["max_open"] <= 4, conns


async def test_a_large_response_is_relayed_whole(tmp_path: Path, start_router: StartRouter) -> None:
    # Over 1 MiB with a Content-Length: relayed as it arrives, not collected first.
    write_fake_model(tmp_path / "m" / "alpha.gguf", tokens=150_000)
    r = await start_router("--models-dir", str(tmp_path / "m"))
    async with r.session.post(r.url + CHAT, json={
        "model": "alpha", "messages": [{"role": "user", "content": "x"}],
    }) as resp:
        assert resp.status == 200
        assert resp.content_length is not None and resp.content_length > 1 << 20
        body = await resp.json()
    assert body["choices"][0]["message"]["content"].count("tok") == 150_000


async def test_an_http10_client_gets_the_stream_unframed(tmp_path: Path, start_router: StartRouter) -> None:
    # No chunked encoding for HTTP/1.0: the child's chunks are decoded, and the end of the
    # response is the end of the connection.
    write_fake_model(tmp_path / "m" / "alpha.gguf", tokens=3)
    r = await start_router("--models-dir", str(tmp_path / "m"))
    assert (await r.chat("alpha", max_tokens=1))[0] == 200
    body = json.dumps({"model": "alpha", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
    writer.write(
        f"POST {CHAT} HTTP/1.0\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    raw = await asyncio.wait_for(reader.read(), 10)  # until the router closes the connection
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")), head
    assert b"transfer-encoding" not in head.lower()
    events = [e for e in payload.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events), payload[:300]
    assert events[-1] == b"data: [DONE]"


async def test_a_client_that_stops_reading_pauses_the_child(tmp_path: Path, start_router: StartRouter) -> None:
    # 200,000 events (about 48 MB) at full speed to a client that reads nothing: the router
    # stops reading from the child once the client's socket is full, so its memory does not
    # grow with the stream (kernel socket buffers take some 10 MB); when the client reads
    # again, everything arrives.
    write_fake_model(tmp_path / "m" / "alpha.gguf", tokens=200_000)
    r = await start_router("--models-dir", str(tmp_path / "m"))
    assert (await r.chat("alpha", max_tokens=1))[0] == 200
    router = psutil.Process(r.proc.pid)
    before = router.memory_info().rss
    body = json.dumps({"model": "alpha", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
    writer.write(
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
    )
    await reader.readuntil(b"\r\n\r\n")
    grew: list[int] = []

    def router_grew() -> bool:
        grew.append(router.memory_info().rss - before)
        return grew[-1] > 24 << 20

    # Bounded poll: the stream would be in the router's memory well within this time.
    with pytest.raises(TimeoutError):
        await wait_for(router_grew, 4, interval=0.05)
    received = 0
    tail = b""
    while not tail.endswith(b"0\r\n\r\n"):
        chunk = await asyncio.wait_for(reader.read(1 << 20), 30)
        assert chunk, "connection closed before the stream ended"
        received += len(chunk)
        tail = (tail + chunk)[-64:]
    writer.close()
    assert received > 40 << 20 and b"data: [DONE]" in tail, (received, tail)


async def test_a_client_that_stops_reading_is_dropped_after_the_timeout(
    tmp_path: Path, start_router: StartRouter
) -> None:
    # llama-server's --timeout is also its write timeout: a client that makes no room for
    # that long loses its stream, and the model is free again (not held for good).
    write_fake_model(tmp_path / "m" / "alpha.gguf", tokens=200_000)
    r = await start_router("--models-dir", str(tmp_path / "m"), "--timeout", "2")
    assert (await r.chat("alpha", max_tokens=1))[0] == 200
    body = json.dumps({"model": "alpha", "stream": True, "messages": [{"role": "user", "content": "x"}]})
    reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
    try:
        writer.write(
            f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n{body}".encode()
        )
        await reader.readuntil(b"\r\n\r\n")

        async def in_flight() -> int:
            return int((await r.models())["alpha"]["in_flight"])

        await wait_for(lambda: in_flight(), 10)  # the stream is under way, unread

        async def freed() -> bool:
            return await in_flight() == 0

        await wait_for(freed, 30, message="the stalled stream to be dropped")
        assert "client read nothing for 2 s: stream dropped" in r.log()
        received = 0
        while chunk := await asyncio.wait_for(reader.read(1 << 20), 30):  # then EOF
            received += len(chunk)
        assert received < 40 << 20  # cut short, not the whole stream
    finally:
        writer.close()
    assert (await r.chat("alpha", max_tokens=1))[0] == 200


async def test_head_to_a_model_route_is_answered_from_the_childs_head(
    tmp_path: Path, start_router: StartRouter
) -> None:
    # No body follows the head of an answer to HEAD, whatever its Content-Length or
    # Transfer-Encoding says: waiting for one timed out into a 500.
    write_fake_model(tmp_path / "m" / "alpha.gguf", tokens=3)
    r = await start_router("--models-dir", str(tmp_path / "m"))
    assert (await r.chat("alpha", max_tokens=1))[0] == 200
    async with r.session.get(r.url + "/props?model=alpha") as resp:
        assert resp.status == 200
        length = len(await resp.read())
    for _ in range(3):  # on a pooled connection, again and again
        async with r.session.head(r.url + "/props?model=alpha", timeout=aiohttp.ClientTimeout(total=5)) as resp:
            assert resp.status == 200 and resp.headers["Content-Length"] == str(length)
            assert await resp.read() == b""
    assert (await r.chat("alpha", max_tokens=1))[0] == 200


async def test_a_half_close_after_the_request_is_taken_as_the_client_leaving(
    tmp_path: Path, start_router: StartRouter
) -> None:
    # A documented difference from llama-server, which answers: the end of the client's
    # input is how a client that went away is noticed (and its generation stopped).
    # A request whose answer takes seconds: with an instant one (GET /health) the answer
    # could be written before the end of input was read, and the test raced.
    write_fake_model(tmp_path / "m" / "alpha.gguf", tokens=200, tps=20)
    r = await start_router("--models-dir", str(tmp_path / "m"))
    body = b'{"model": "alpha", "messages": [{"role": "user", "content": "x"}]}'
    reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
    try:
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # well before the 10 s answer
    finally:
        writer.close()
    assert (await r.get("/health"))[0] == 200
