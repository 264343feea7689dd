"""The child client (core/childclient.py) against the fake llama-server, and against a
small in-process stand-in for what the fake does not serve (slot save and restore,
stream lookup, a sleeping child, broken answers). Each method is checked for its answer,
and for what it makes of a child that is loading, refuses, answers garbage, hangs, or is
not there."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from llamarouter.core.childclient import NO_ANSWER, ChildClient, ChildError, child_host, child_url
from tests.fakes.helpers import fake_server_command, free_port, wait_for

pytestmark = pytest.mark.timeout(60)

# Bounds of the calls here: long enough for a loaded test machine, short for the hangs.
T = 10.0
SHORT = 0.3

Spawn = Callable[..., Awaitable[int]]


@pytest.fixture
async def spawn() -> AsyncIterator[Spawn]:
    """Start the fake llama-server (its own process group); its port once it listens."""
    started: list[asyncio.subprocess.Process] = []

    async def _spawn(*args: str) -> int:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_LLAMA_")}
        proc = await asyncio.create_subprocess_exec(
            *fake_server_command(), "--host", "127.0.0.1", "--port", str(port), "--alias", "fake-model", *args,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )
        started.append(proc)

        async def listening() -> bool:
            if proc.returncode is not None:
                raise AssertionError(f"the fake exited with {proc.returncode}")
            async with aiohttp.ClientSession() as s, s.get(child_url(port, "/fake/stats")) as r:
                return r.status == 200

        await wait_for(listening, 20, ignore=(aiohttp.ClientConnectionError,), message="the fake to listen")
        return port

    yield _spawn

    for proc in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
        proc._transport.close()  # type: ignore[attr-defined]  # avoid a ResourceWarning


@pytest.fixture
async def client() -> AsyncIterator[ChildClient]:
    async with aiohttp.ClientSession() as session:
        yield ChildClient(session)


class Stub:
    """Answers like llama-server where the fake does not; `mode` picks how."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.seen: list[tuple[str, str, Any]] = []
        self.release = asyncio.Event()  # lets a hanging handler end at teardown

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body: Any = await request.json() if request.can_read_body else None
        self.seen.append((request.method, request.path_qs, body))
        if self.mode == "hang":
            await self.release.wait()
        if self.mode == "refuse":
            return web.json_response({"error": {"code": 500, "message": "no space left", "type": "server_error"}}, status=500)
        if self.mode == "garbage":
            return web.Response(text="<html>not json</html>")
        if self.mode == "html-error":
            return web.Response(text="<html>bad gateway</html>", status=502)
        if self.mode == "odd":  # JSON, but not what llama-server answers
            return web.json_response({"unexpected": True})
        path = request.path
        if path == "/props":
            return web.json_response({"is_sleeping": True})
        if path == "/slots/3" and request.query.get("action") == "save":
            return web.json_response({"id_slot": 3, "filename": body["filename"], "n_saved": 120, "n_written": 4096})
        if path == "/slots/3" and request.query.get("action") == "restore":
            return web.json_response({"id_slot": 3, "filename": body["filename"], "n_restored": 120, "n_read": 4096})
        if path == "/v1/streams/lookup":
            return web.json_response([{"conversation_id": i, "done": False} for i in body["conversation_ids"]] + [7])
        return web.json_response({"error": {"code": 404, "message": "File Not Found"}}, status=404)


@pytest.fixture
async def stub() -> AsyncIterator[tuple[Stub, int]]:
    s = Stub()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", s.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # aiohttp keeps the bound socket here
    try:
        yield s, port
    finally:
        s.release.set()
        await runner.cleanup()


def test_the_child_address_is_built_here() -> None:
    assert child_host(8081) == "127.0.0.1:8081"
    assert child_url(8081, "/slots/0?action=save") == "http://127.0.0.1:8081/slots/0?action=save"
    assert child_url(8081) == "http://127.0.0.1:8081"


# ----------------------------------------------------------------- the fake llama-server
async def test_a_ready_child(spawn: Spawn, client: ChildClient) -> None:
    port = await spawn()
    await wait_for(lambda: _is(client.health(port, T), 200), 20, message="/health 200")
    assert (await client.info(port, T))["id"] == "fake-model"
    assert await client.canary(port, T) is True
    assert await client.sleeping(port, T) is False
    slots = await client.slots(port, T)
    assert [s["id"] for s in slots] == [0] and slots[0]["is_processing"] is False
    text = await client.metrics(port, T)
    assert text is not None and "llamacpp:requests_deferred 0" in text
    # This fake has neither stream buffers nor slot files: llama-server's own 404s.
    assert await client.lookup_streams(port, ["c1"], T) == []
    await client.stop_stream(port, "c1", T)  # an answer, whatever it says, is not an error
    with pytest.raises(ChildError, match=r"^HTTP 404: File Not Found$") as refused:
        await client.save_slot(port, 0, "slot-0.slot", T)
    assert refused.value.status == 404
    with pytest.raises(ChildError, match="HTTP 404"):
        await client.restore_slot(port, 0, "slot-0.slot", T)
    async with client.forward("GET", port, "/v1/models?x=1", data=None, headers={"X-Test": "1"}, timeout=T) as up:
        assert up.status == 200
        assert (await up.json())["data"][0]["id"] == "fake-model"


async def _is(call: Awaitable[Any], expected: Any) -> bool:
    return bool(await call == expected)


async def test_a_loading_child(spawn: Spawn, client: ChildClient) -> None:
    port = await spawn("--fake-load-secs", "60")
    assert await client.health(port, T) == 503
    assert await client.info(port, T) == {}
    assert await client.canary(port, T) is False
    assert await client.metrics(port, T) is None
    assert await client.lookup_streams(port, ["c1"], T) == []
    with pytest.raises(ChildError, match=r"^HTTP 503: Loading model$") as loading:
        await client.sleeping(port, T)
    assert loading.value.status == 503
    with pytest.raises(ChildError, match="HTTP 503"):
        await client.slots(port, T)


async def test_a_child_that_is_not_there(client: ChildClient) -> None:
    port = free_port()
    assert await client.health(port, T) is None
    assert await client.info(port, T) == {}
    assert await client.canary(port, T) is False
    assert await client.metrics(port, T) is None
    assert await client.lookup_streams(port, ["c1"], T) == []
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: client.sleeping(port, T),
        lambda: client.slots(port, T),
        lambda: client.save_slot(port, 0, "f", T),
        lambda: client.restore_slot(port, 0, "f", T),
        lambda: client.stop_stream(port, "c1", T),
    ]
    for call in calls:
        with pytest.raises(ChildError, match="ClientConnectorError") as gone:
            await call()
        assert gone.value.status is None
    with pytest.raises(NO_ANSWER):
        async with client.forward("GET", port, "/health", data=None, headers={}, timeout=T):
            pass


# ----------------------------------------------------------------- the stand-in
async def test_slot_save_and_restore(stub: tuple[Stub, int], client: ChildClient) -> None:
    s, port = stub
    assert await client.save_slot(port, 3, "slot-3.slot", T) == (120, 4096)
    assert await client.restore_slot(port, 3, "slot-3.slot", T) == 120
    assert s.seen == [
        ("POST", "/slots/3?action=save", {"filename": "slot-3.slot"}),
        ("POST", "/slots/3?action=restore", {"filename": "slot-3.slot"}),
    ]


async def test_a_sleeping_child_and_stream_lookup(stub: tuple[Stub, int], client: ChildClient) -> None:
    s, port = stub
    assert await client.sleeping(port, T) is True
    found = await client.lookup_streams(port, ["a", "b"], T)
    assert found == [{"conversation_id": "a", "done": False}, {"conversation_id": "b", "done": False}]
    await client.stop_stream(port, "a", T)
    assert s.seen[-1][:2] == ("DELETE", "/v1/stream?conv_id=a")
    s.mode = "odd"
    assert await client.sleeping(port, T) is None  # answered, but does not say
    assert await client.slots(port, T) == []
    assert await client.lookup_streams(port, ["a"], T) == []
    assert await client.canary(port, T) is False  # no "content"
    assert await client.info(port, T) == {}
    with pytest.raises(ChildError, match=r"^unexpected answer: KeyError"):
        await client.save_slot(port, 3, "f", T)
    with pytest.raises(ChildError, match=r"^unexpected answer: KeyError"):
        await client.restore_slot(port, 3, "f", T)


async def test_refusals_and_garbage(stub: tuple[Stub, int], client: ChildClient) -> None:
    s, port = stub
    s.mode = "refuse"
    with pytest.raises(ChildError, match=r"^HTTP 500: no space left$") as refused:
        await client.save_slot(port, 3, "f", T)
    assert refused.value.status == 500
    assert await client.health(port, T) == 500
    assert await client.metrics(port, T) is None
    assert await client.canary(port, T) is False
    s.mode = "html-error"  # an error page that is not llama-server's JSON
    with pytest.raises(ChildError, match=r"^HTTP 502: $"):
        await client.sleeping(port, T)
    s.mode = "garbage"
    for call in (client.sleeping, client.slots):
        with pytest.raises(ChildError, match=r"^JSONDecodeError"):
            await call(port, T)
    assert await client.info(port, T) == {}
    assert await client.canary(port, T) is False
    assert await client.lookup_streams(port, ["a"], T) == []
    assert await client.metrics(port, T) == "<html>not json</html>"  # text is all it promises


async def test_a_child_that_hangs_is_given_up_on_in_time(stub: tuple[Stub, int], client: ChildClient) -> None:
    s, port = stub
    s.mode = "hang"
    started = time.monotonic()
    assert await client.health(port, SHORT) is None
    assert await client.info(port, SHORT) == {}
    assert await client.canary(port, SHORT) is False
    assert await client.metrics(port, SHORT) is None
    assert await client.lookup_streams(port, ["a"], SHORT) == []
    with pytest.raises(ChildError, match=r"^timed out$"):
        await client.sleeping(port, SHORT)
    with pytest.raises(ChildError, match=r"^timed out$"):
        await client.stop_stream(port, "a", SHORT)
    with pytest.raises(NO_ANSWER):
        async with client.forward("GET", port, "/tools", data=None, headers={}, timeout=SHORT) as up:
            await up.read()
    # Eight calls, each cut off at its bound (generous slack for a loaded machine).
    assert time.monotonic() - started < 8 * SHORT + 5


async def _raw_child(answer: Callable[[asyncio.StreamWriter], Awaitable[None]]) -> tuple[asyncio.Server, int]:
    """A child that reads one request head and answers with `answer`, byte by byte if it likes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        try:
            await answer(writer)
        except ConnectionError:
            pass  # the probe hung up, as it may
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        # In pieces, body and all, and the connection left open: the length says it is whole.
        ([b"HTTP/1.1 2", b"00 OK\r\nContent-Le", b"ngth: 15\r\n\r\n", b'{"status":', b'"ok"}'], 200),
        ([b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\n\r\n{}"], 503),
        # No length: the head is all it waits for.
        ([b"HTTP/1.1 200 OK\r\n\r\n"], 200),
        ([b"HTTP/1.1 200 OK\r\nContent-Le"], None),  # closed inside the head
        ([b"SSH-2.0-OpenSSH\r\n\r\n"], None),  # not HTTP
        ([b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n"], None),
        ([], None),  # closed without a word
    ],
)
async def test_the_liveness_probe_reads_one_whole_answer(
    client: ChildClient, answer: list[bytes], expected: int | None
) -> None:
    hold = asyncio.Event()

    async def reply(writer: asyncio.StreamWriter) -> None:
        for piece in answer:
            writer.write(piece)
            await writer.drain()
        if expected is not None:
            await hold.wait()  # whole: the probe must not wait for the close

    server, port = await _raw_child(reply)
    try:
        assert await client.health(port, T) == expected
    finally:
        hold.set()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    "head", [b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n", b"HTTP/1.1 200 OK\r\nX: " + b"x" * 70000]
)
async def test_the_liveness_probe_reads_no_more_than_a_bound(client: ChildClient, head: bytes) -> None:
    async def reply(writer: asyncio.StreamWriter) -> None:
        writer.write(head)
        for _ in range(30):  # bounded, past what the probe reads
            writer.write(b"x" * 4096)
            await writer.drain()

    server, port = await _raw_child(reply)
    try:
        assert await client.health(port, T) is None
    finally:
        server.close()
        await server.wait_closed()
