"""The child connection pool and the response relay (llamarouter.web.pool and
llamarouter.web.relay), against a small in-process HTTP server on loopback and a
recording client transport."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from llamarouter.web.pool import ChildPool
from llamarouter.web.proxy import child_http_threads
from llamarouter.web.relay import Exchange
from tests.fakes.helpers import wait_for

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


class Child:
    """Answers every request on a connection with a small JSON body, or, for /stream, with
    a chunked event stream after which it closes the connection (as llama-server does);
    `writers` lets a test close a connection from the child's side, as a keep-alive
    expiry does."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0
        self.requests = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.pools: list[ChildPool] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                self.requests += 1
                if head.startswith(b"GET /stream "):
                    writer.write(SSE_HEAD + _chunk(b"data: 1\n\n") + b"0\r\n\r\n")
                    await writer.drain()
                    writer.close()
                    return
                body = b'{"n":%d}' % self.requests
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@pytest.fixture
async def child() -> AsyncIterator[Child]:
    c = Child()
    c.server = await asyncio.start_server(c.handle, "127.0.0.1", 0)
    c.port = c.server.sockets[0].getsockname()[1]
    try:
        yield c
    finally:
        c.server.close()
        for pool in c.pools:
            pool.close()
        for writer in c.writers:
            writer.close()
        # Every connection of every pool is gone once the child closed its ends.
        await wait_for(lambda: all(p.open == 0 for p in c.pools), 5)
        for writer in c.writers:
            await writer.wait_closed()


def _pool(child: Child, limit: int, idle: float = 60.0, connect_timeout: float = 5.0) -> ChildPool:
    pool = ChildPool(child.port, limit=limit, idle=idle, connect_timeout=connect_timeout)
    child.pools.append(pool)
    return pool


async def _get(pool: ChildPool, path: str = "/x") -> bytes:
    conn = await pool.acquire()
    exchange = conn.send([f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()], 1 << 20, 5.0)
    await asyncio.wait_for(exchange.wait(), 5)
    assert exchange.error is None and exchange.body is not None, exchange.error
    return exchange.body


async def test_a_connection_the_child_closed_is_never_used(child: Child) -> None:
    pool = _pool(child, 4, 60.0, 5.0)
    assert await _get(pool) == b'{"n":1}'
    conn = pool.idle[-1]
    # The child closes the idle connection, and the event loop has not looked at the
    # socket since (reading is paused): only the kernel knows. The request must go out on
    # a new connection.
    assert conn.transport is not None
    conn.transport.pause_reading()
    child.writers[0].close()
    await child.writers[0].wait_closed()
    assert await _get(pool) == b'{"n":2}'
    assert child.connections == 2 and pool.opened == 2


async def test_waiters_get_connections_in_arrival_order(child: Child) -> None:
    pool = _pool(child, 1, 60.0, 5.0)
    first = await pool.acquire()
    order: list[int] = []

    async def take(i: int) -> None:
        conn = await pool.acquire()
        order.append(i)
        pool.release(conn)

    tasks = []
    for i in range(4):
        tasks.append(asyncio.create_task(take(i)))
        await wait_for(lambda i=i: len(pool.waiters) == i + 1, 5)
    pool.release(first)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == [0, 1, 2, 3]
    assert pool.opened == 1


async def test_never_more_connections_than_the_limit(child: Child) -> None:
    pool = _pool(child, 2, 60.0, 5.0)
    bodies = await asyncio.wait_for(asyncio.gather(*(_get(pool) for _ in range(10))), 10)
    assert len(bodies) == 10
    assert pool.opened == 2 and child.connections == 2


async def test_idle_connections_are_closed_after_the_idle_timeout(child: Child) -> None:
    pool = _pool(child, 2, 0.05, 5.0)
    await _get(pool)
    await wait_for(lambda: not pool.idle and pool.open == 0, 5)
    await _get(pool)
    assert child.connections == 2


async def _stream(pool: ChildPool) -> None:
    conn = await pool.acquire()
    exchange = conn.send([b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n"], 1 << 20, 5.0)
    await asyncio.wait_for(exchange.wait(), 5)
    assert exchange.head is not None and not exchange.whole
    exchange.attach(Sink(), client_chunked=True)  # type: ignore[arg-type]  # records writes
    while not exchange.done:
        await asyncio.wait_for(exchange.wait(), 5)
    assert exchange.error is None, exchange.error


async def test_a_stream_the_child_closed_is_replaced_off_the_request_path(child: Child) -> None:
    pool = _pool(child, 4, 60.0, 5.0)
    await _stream(pool)
    # The child closed the connection after the stream: a replacement is opened and kept.
    await wait_for(lambda: len(pool.idle) == 1, 5, message="a replacement connection")
    assert pool.opened == 2 and pool.open == 1
    await _stream(pool)  # served on the replacement: nothing connects on the way
    await wait_for(lambda: len(pool.idle) == 1 and pool.opened == 3, 5)
    assert child.connections == 3 and pool.open == 1


async def test_replacements_respect_the_limit_and_end_with_the_traffic(child: Child) -> None:
    pool = _pool(child, 2, 0.2, 5.0)
    await asyncio.wait_for(asyncio.gather(*(_stream(pool) for _ in range(8))), 10)
    await wait_for(lambda: len(pool.idle) == 2, 5, message="two replacements")
    assert pool.open == 2
    # Replacements are not replaced when they expire unused.
    await wait_for(lambda: pool.open == 0 and not pool.idle, 5, message="the spares to expire")
    opened = pool.opened
    assert not pool._refills
    assert pool.opened == opened


async def test_no_replacement_after_a_client_gave_up_or_the_pool_closed(child: Child) -> None:
    pool = _pool(child, 4, 60.0, 5.0)
    conn = await pool.acquire()
    exchange = conn.send([b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n"], 1 << 20, 5.0)
    await asyncio.wait_for(exchange.wait(), 5)
    exchange.abort()  # our client went away mid-response
    await wait_for(lambda: pool.open == 0, 5)
    assert not pool._refills and pool.opened == 1
    await _stream(pool)
    pool.close()  # as for a child that is replaced
    await wait_for(lambda: not pool._refills and pool.open == 0, 5)
    assert not pool.idle


async def test_a_cancelled_waiter_leaves_the_queue(child: Child) -> None:
    pool = _pool(child, 1, 60.0, 5.0)
    first = await pool.acquire()
    task = asyncio.create_task(pool.acquire())
    await wait_for(lambda: len(pool.waiters) == 1, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not pool.waiters
    pool.release(first)
    assert pool.idle == [first]


async def test_waiting_for_a_connection_is_bounded(child: Child) -> None:
    pool = _pool(child, 1, 60.0, 0.05)
    await pool.acquire()
    with pytest.raises(TimeoutError):
        await pool.acquire()
    assert not pool.waiters


# ------------------------------------------------------------------ relay, no sockets
class Sink:
    """A client transport that records what is written to it."""

    def __init__(self, high: int = 1 << 16) -> None:
        self.data = bytearray()
        self.closing = False
        self.high = high

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return self.closing

    def get_write_buffer_size(self) -> int:
        return len(self.data)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, self.high)


class StubConn:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.finished_with: bool | None = None
        self.aborted = False
        self.reading = True

    def finished(self, exchange: Exchange, reusable: bool, clean: bool) -> None:
        self.finished_with = reusable
        self.aborted = not clean

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def _feed(exchange: Exchange, data: bytes, step: int) -> None:
    for i in range(0, len(data), step):
        exchange.feed(data[i: i + step])


def _exchange() -> tuple[Exchange, StubConn]:
    conn = StubConn()
    return Exchange(conn, 1 << 20, 0.0), conn  # type: ignore[arg-type]


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
async def test_chunked_events_pass_through_verbatim(step: int) -> None:
    events = [b"data: {\"a\":1}\n\n", b"data: " + b"x" * 300 + b"\n\n", b"data: [DONE]\n\n"]
    body = b"".join(_chunk(e) for e in events)
    exchange, conn = _exchange()
    _feed(exchange, SSE_HEAD, step)
    assert exchange.head is not None and exchange.head.status == 200 and not exchange.whole
    sink = Sink()
    exchange.attach(sink, client_chunked=True)  # type: ignore[arg-type]
    _feed(exchange, body + b"0\r\n\r\n", step)
    # The framing is the client's too; the last chunk is left to the handler.
    assert bytes(sink.data) == body
    # llama-server closes the connection after a stream: it is closed, not reused.
    assert exchange.done and exchange.error is None
    assert conn.finished_with is False and not conn.aborted


@pytest.mark.parametrize("step", [1, 5, 1000])
async def test_chunked_decoded_for_a_client_without_chunking(step: int) -> None:
    events = [b"data: a\n\n", b"data: bb\n\n"]
    exchange, conn = _exchange()
    _feed(exchange, SSE_HEAD + b"".join(_chunk(e) for e in events), step)
    sink = Sink()
    exchange.attach(sink, client_chunked=False)  # type: ignore[arg-type]
    _feed(exchange, b"0\r\n\r\n", step)
    assert bytes(sink.data) == b"".join(events)
    assert exchange.done and exchange.error is None and conn.finished_with is False


async def test_bytes_before_attach_are_relayed_on_attach() -> None:
    exchange, _ = _exchange()
    exchange.feed(SSE_HEAD + _chunk(b"data: early\n\n"))
    sink = Sink()
    exchange.attach(sink, client_chunked=True)  # type: ignore[arg-type]
    assert bytes(sink.data) == _chunk(b"data: early\n\n")


async def test_small_body_read_whole_and_connection_kept() -> None:
    exchange, conn = _exchange()
    _feed(exchange, b"HTTP/1.1 200 OK\r\nContent-Length: 13\r\nX-A: b\r\n\r\n{\"tokens\":[]}"[:-2], 4)
    exchange.feed(b"]}")
    assert exchange.whole and exchange.body == b"{\"tokens\":[]}"
    assert exchange.head is not None and exchange.head.get("x-a") == "b"
    assert conn.finished_with is True


async def test_connection_close_is_not_reused() -> None:
    exchange, conn = _exchange()
    exchange.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}")
    assert exchange.body == b"{}" and conn.finished_with is False


async def test_child_lost_mid_stream_is_an_error() -> None:
    exchange, conn = _exchange()
    exchange.feed(SSE_HEAD)
    sink = Sink()
    exchange.attach(sink, client_chunked=True)  # type: ignore[arg-type]
    exchange.feed(_chunk(b"data: a\n\n")[:5])
    exchange.on_lost(ConnectionResetError("reset"))
    assert exchange.done and exchange.error and "mid-response" in exchange.error
    assert conn.finished_with is False


async def test_client_gone_stops_the_child() -> None:
    exchange, conn = _exchange()
    exchange.feed(SSE_HEAD)
    sink = Sink()
    exchange.attach(sink, client_chunked=True)  # type: ignore[arg-type]
    sink.closing = True
    exchange.feed(_chunk(b"data: a\n\n"))
    assert exchange.client_gone and exchange.done and conn.aborted


async def test_slow_client_pauses_reading_the_child() -> None:
    exchange, conn = _exchange()
    exchange.feed(SSE_HEAD)
    sink = Sink(high=10)
    exchange.attach(sink, client_chunked=True)  # type: ignore[arg-type]
    exchange.feed(_chunk(b"data: " + b"y" * 20 + b"\n\n"))
    assert exchange.paused and not conn.reading
    sink.data.clear()
    exchange.resume()
    assert conn.reading and not exchange.paused


@pytest.mark.parametrize(
    ("argv", "env", "cpus", "expected"),
    [
        ([], {}, 2, 8),  # auto n_parallel is 4: 4 + 4
        (["-np", "1"], {}, 2, 5),
        (["--parallel=16"], {}, 2, 20),
        ([], {}, 32, 31),  # hardware threads - 1
        (["--threads-http", "3", "-np", "8"], {}, 32, 3),
        ([], {"LLAMA_ARG_THREADS_HTTP": "6"}, 2, 6),
        ([], {"LLAMA_ARG_N_PARALLEL": "2"}, 2, 6),
        (["--threads-http", "-1"], {}, 2, 8),
    ],
)
def test_child_http_threads(argv: list[str], env: dict[str, str], cpus: int, expected: Any) -> None:
    assert child_http_threads(argv, env, cpus) == expected


# --------------------------------------------------------------------------- a stop and the proxy
class _Proc:
    """What the proxy reads of a model: a READY child on `port`, stopped by the test."""

    def __init__(self, port: int, argv: list[str]) -> None:
        from llamarouter.core.states import State

        self.name = self.key = "m"
        self.port = port
        self.argv = argv
        self.state = State.READY
        self.stop_reason: str | None = None


async def test_a_request_waiting_for_a_connection_when_its_model_stops_never_reaches_it(child: Child) -> None:
    """Was: a request granted just before an unload, still waiting for a connection when
    the stop cut the model's requests, was sent afterwards to the exiting child, which
    (llama-server waits for its open connections) served it to the end."""
    from llamarouter.core.states import State
    from llamarouter.errors import ChildBroke
    from llamarouter.settings.config import RouterConfig
    from llamarouter.web.proxy import Proxy

    proxy = Proxy(RouterConfig())
    # --threads-http 2 less the router's reserve of 1: one connection at a time.
    proc: Any = _Proc(child.port, ["llama-server", "--threads-http", "2"])
    first = await proxy._acquire(proc, child.port)
    waiting = asyncio.create_task(proxy._acquire(proc, child.port))
    await wait_for(lambda: proxy.pool_for(proc, child.port).waiters, 5, message="a request waiting")
    proc.state, proc.stop_reason = State.STOPPING, "unloaded"
    proxy.cut(proc, "the model was stopped (unloaded)")
    with pytest.raises(ChildBroke, match=r"stopped \(unloaded\)"):
        await asyncio.wait_for(waiting, 5)
    assert child.requests == 0
    # And one granted before the stop but not yet sending: not sent either.
    with pytest.raises(ChildBroke, match=r"stopped \(unloaded\)"):
        await proxy._acquire(proc, child.port)
    first.abort()
