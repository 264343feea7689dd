"""HTTP/1.1 connections to one child, and the byte relay from a child to our client.

Why not aiohttp's client: its per-chunk machinery (a StreamReader, a task wake-up and a
write per chunk) costs router CPU on every relayed SSE event, and on a small machine that
CPU is taken from generation. Here the child's response bytes are copied to the client's
transport inside the child connection's `data_received` callback: no task switch, no copy
and no parse per event beyond finding chunk boundaries. Whatever arrived in one read goes
out in one write, so events that are ready together are coalesced and a lone event is
never held back.

Connections fit the child (llama-server, cpp-httplib):
* At most `limit` connections are open to a child at once, idle ones included, because
  every open connection holds one of the child's HTTP worker threads for its whole life.
  Connections beyond the child's threads sit unread in its socket (older builds) while
  counting as in flight; the router queues instead, per child, first come first served.
* An idle pooled connection is reused only if it has been idle for less than `idle`
  seconds (well inside the child's keep-alive) and the child has not closed it: the
  socket is peeked right before the request is written, so a request never goes out on a
  connection the child has already closed, and one that finds its connection gone is
  sent on another one instead (it provably never reached the child).
* llama-server closes the connection after every streamed response. The pool opens a
  replacement right away, off the request path, so the next stream finds an open
  connection instead of connecting first: a loopback connect does the whole TCP
  handshake inside the system call, about a fifth of the router's busy time while a
  burst of streams comes in, and the request then goes out in its handler's first pass.
  Replacements are only made for connections that served a complete response, and
  expire like any idle connection, so they stop once the traffic does.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from collections.abc import Iterable
from typing import cast

from ..core.childclient import child_host

log = logging.getLogger("llamarouter.web.relay")

# Response heads larger than this are a protocol error (llama-server's are < 1 KiB).
_MAX_HEAD = 64 * 1024

_HEAD, _BODY, _TRAILER, _DONE = range(4)
_NONE, _LENGTH, _CHUNKED, _CLOSE = range(4)


class ConnectFailed(Exception):
    """No connection to the child could be opened: the request never reached it."""


# Reads of a response body kept to find llama-server's closing `timings` event.
_TAIL_READS = 8

class ExchangeFailed(Exception):
    """The exchange with the child failed (connection lost, timeout, bad response)."""


class Head:
    """A child's response status line and headers."""

    __slots__ = ("chunked", "headers", "keep_alive", "length", "status")

    def __init__(self, status: int, headers: list[tuple[str, str]], length: int | None,
                 keep_alive: bool, chunked: bool) -> None:
        self.status = status
        self.headers = headers
        self.length = length
        self.keep_alive = keep_alive
        self.chunked = chunked

    def get(self, name: str, default: str = "") -> str:
        low = name.lower()
        for key, value in self.headers:
            if key.lower() == low:
                return value
        return default


def _parse_head(raw: bytes) -> Head:
    lines = raw.decode("utf-8", "surrogateescape").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ExchangeFailed(f"bad status line from child: {lines[0][:100]!r}")
    try:
        status = int(parts[1])
    except ValueError:
        raise ExchangeFailed(f"bad status line from child: {lines[0][:100]!r}") from None
    headers: list[tuple[str, str]] = []
    length: int | None = None
    chunked = False
    keep_alive = parts[0] == "HTTP/1.1"
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ExchangeFailed(f"bad header line from child: {line[:100]!r}")
        value = value.strip()
        headers.append((name, value))
        low = name.lower()
        if low == "content-length":
            if not value.isdigit() or (length is not None and length != int(value)):
                raise ExchangeFailed(f"bad Content-Length from child: {value[:40]!r}")
            length = int(value)
        elif low == "transfer-encoding":
            chunked = value.lower().endswith("chunked")
        elif low == "connection" and "close" in value.lower():
            keep_alive = False
    if chunked:
        length = None
    return Head(status, headers, length, keep_alive, chunked)


class Exchange:
    """One request and its response on one connection.

    The handler awaits `wait()`: it returns when the response head is known (a streamed
    response), when the whole response is in (a small one, `body` set), when the relay
    needs the client's transport drained (`paused`), or when it ended (`done`, with
    `error` set if it failed).
    """

    __slots__ = (
        "_buffer_limit",
        "_frame",
        "_head_buf",
        "_head_only",
        "_high",
        "_last_read",
        "_loop",
        "_lost",
        "_need",
        "_partial",
        "_parts",
        "_passthrough",
        "_pending",
        "_remaining",
        "_sink",
        "_timeout",
        "_timer",
        "_trailer",
        "_waiter",
        "_woken",
        "body",
        "client_gone",
        "conn",
        "done",
        "error",
        "head",
        "mode",
        "paused",
        "state",
        "tail",
        "whole",
    )

    def __init__(self, conn: ChildConnection, buffer_limit: int, timeout: float, head_only: bool = False) -> None:
        self.conn = conn
        # The answer to a HEAD request: its head says how long or chunked the body of a
        # GET would be, but no body follows.
        self._head_only = head_only
        self._loop = conn.loop
        self._buffer_limit = buffer_limit
        self.state = _HEAD
        self.mode = _NONE
        self.head: Head | None = None
        self.body: bytes | None = None  # set when a small response was read whole
        self.whole = False  # the body is read whole before the handler is woken
        self.error: str | None = None
        self.done = False
        self.paused = False
        self.client_gone = False
        # The last body bytes seen: llama-server's last event carries its `timings`, read
        # for the dashboard's tokens/s without looking at any other chunk. Several reads,
        # since the chunk size line, `[DONE]` and the terminator may each come on their own.
        self.tail: collections.deque[bytes] = collections.deque(maxlen=_TAIL_READS)
        self._head_buf = b""
        self._remaining = 0
        self._need = 0  # bytes left of the current chunk's data and its CRLF
        self._partial = b""  # an incomplete chunk-size line
        self._trailer = b""
        self._pending: list[bytes] | None = []  # body bytes that came before the sink
        self._parts: list[bytes] = []  # a small body being read whole
        self._lost: tuple[BaseException | None] | None = None
        self._sink: asyncio.WriteTransport | None = None
        self._passthrough = False
        self._frame = False
        self._waiter: asyncio.Future[None] | None = None
        self._woken = False
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self._last_read = self._loop.time()
        self._high = 0
        if timeout > 0:
            self._timer = self._loop.call_at(self._last_read + timeout, self._check_timeout)

    # ------------------------------------------------------------------ handler side
    async def wait(self) -> None:
        if self._woken:
            self._woken = False
            return
        waiter = self._waiter = self._loop.create_future()
        try:
            await waiter
        finally:
            # A wake that came after this one stays recorded in `_woken`: the handler
            # looks at the state after every wake, so one extra wake-up costs nothing.
            self._waiter = None

    def attach(self, sink: asyncio.WriteTransport, client_chunked: bool) -> None:
        """Start relaying the body to our client's transport, whose response head is
        written. `client_chunked`: our response to the client uses chunked framing."""
        assert self.head is not None
        self._sink = sink
        self._high = sink.get_write_buffer_limits()[1]
        self._passthrough = self.mode == _CHUNKED and client_chunked
        self._frame = self.mode == _CLOSE and client_chunked
        pending, self._pending = self._pending, None
        for data in pending or ():
            if self.done:
                break
            self._body(data)
        if self._lost is not None and not self.done:
            self._on_lost(self._lost[0])

    def resume(self) -> None:
        """The client's transport drained: read from the child again."""
        if self.paused:
            self.paused = False
            self._last_read = self._loop.time()
            if not self.done:
                self.conn.resume_reading()

    def abort(self) -> None:
        """Give up on this exchange (our client went away): close the child connection,
        which makes llama-server stop generating."""
        if not self.done:
            self._finish(reusable=False, clean=False)

    # ------------------------------------------------------------------ child side
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        else:
            self._woken = True

    def feed(self, data: bytes) -> None:
        if self._timer is not None:
            self._last_read = self._loop.time()
        if self.state == _HEAD:
            self._head_buf += data
            end = self._head_buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._head_buf) > _MAX_HEAD:
                    self._fail("response head from child is too large")
                return
            raw, data = self._head_buf[:end], self._head_buf[end + 4:]
            self._head_buf = b""
            try:
                head = _parse_head(raw)
            except ExchangeFailed as exc:
                self._fail(str(exc))
                return
            if 100 <= head.status < 200:  # an interim response: the real one follows
                if data:
                    self.feed(data)
                return
            self._start_body(head, bool(data))
            if self.done or not data:
                return
        if self._pending is not None:
            self._pending.append(data)
        else:
            self._body(data)

    def _start_body(self, head: Head, more: bool) -> None:
        self.head = head
        self.state = _BODY
        if head.status in (204, 304) or self._head_only:
            self.mode = _NONE
        elif head.chunked:
            self.mode = _CHUNKED
        elif head.length is not None:
            self.mode = _NONE if head.length == 0 else _LENGTH
            self._remaining = head.length
        else:
            self.mode = _CLOSE
        if self.mode == _NONE:
            self.whole = True
            self.body = b""
            self._finish(reusable=head.keep_alive and not more)
        elif self.mode == _LENGTH and head.length is not None and head.length <= self._buffer_limit:
            # Small: read whole, answered in one write; the handler wakes once, at the end.
            self.whole = True
            self._pending = None
        else:
            self._wake()

    def _body(self, data: bytes) -> None:
        self.tail.append(data)
        mode = self.mode
        if mode == _CHUNKED:
            self._chunked(data)
        elif mode == _LENGTH:
            n = len(data)
            if self.whole:
                if n >= self._remaining:
                    self._parts.append(data[: self._remaining] if n > self._remaining else data)
                    self.body = b"".join(self._parts)
                    self._parts = []
                    extra = n > self._remaining
                    self._finish(reusable=self.head is not None and self.head.keep_alive and not extra)
                else:
                    self._parts.append(data)
                    self._remaining -= n
                return
            if n >= self._remaining:
                self._out(data[: self._remaining])
                extra = n > self._remaining
                self._finish(reusable=self.head is not None and self.head.keep_alive and not extra)
            else:
                self._remaining -= n
                self._out(data)
        elif mode == _CLOSE:
            self._out(data)

    def _out(self, payload: bytes) -> None:
        sink = self._sink
        if sink is None or not payload:
            return
        if sink.is_closing():
            self._client_went_away()
            return
        if self._frame:
            sink.write(b"%x\r\n%b\r\n" % (len(payload), payload))
        else:
            sink.write(payload)
        self._check_backpressure(sink)

    def _check_backpressure(self, sink: asyncio.WriteTransport) -> None:
        if sink.get_write_buffer_size() > self._high and not self.paused:
            # The client reads slower than the child writes: stop reading the child until
            # the handler has drained the client's transport.
            self.paused = True
            self.conn.pause_reading()
            self._wake()

    def _chunked(self, data: bytes) -> None:
        if self.state == _TRAILER:
            self._trailers(data)
            return
        if self._partial:
            data = self._partial + data
            self._partial = b""
        passthrough = self._passthrough
        pos, n = 0, len(data)
        cut = n  # passthrough: forward data[:cut], the framing included
        while pos < n:
            need = self._need
            if need:
                take = min(n - pos, need)
                if not passthrough and need > 2:
                    self._out(data[pos: pos + min(take, need - 2)])
                    if self.done:
                        return
                pos += take
                self._need = need - take
                continue
            eol = data.find(b"\r\n", pos)
            if eol < 0:
                # Hold an incomplete size line back: the last chunk must not be forwarded.
                self._partial = data[pos:]
                cut = pos
                break
            try:
                size = int(data[pos:eol].split(b";", 1)[0], 16)
            except ValueError:
                self._fail("bad chunk size from child")
                return
            if size == 0:
                cut = pos
                if passthrough and cut:
                    self._write_raw(data[:cut])
                    if self.done:
                        return
                self.state = _TRAILER
                self._trailers(data[eol + 2:])
                return
            self._need = size + 2
            pos = eol + 2
        if passthrough and cut:
            self._write_raw(data if cut == n else data[:cut])

    def _write_raw(self, data: bytes) -> None:
        sink = self._sink
        if sink is None:
            return
        if sink.is_closing():
            self._client_went_away()
            return
        sink.write(data)
        self._check_backpressure(sink)

    def _trailers(self, data: bytes) -> None:
        # Trailers (llama-server sends none) are dropped; our last chunk is written by
        # the handler when it ends the response.
        buf = self._trailer + data
        if not buf.startswith(b"\r\n") and buf.find(b"\r\n\r\n") < 0:
            if len(buf) > _MAX_HEAD:
                self._fail("trailers from child are too large")
            else:
                self._trailer = buf
            return
        self._trailer = b""
        # Never reused: llama-server closes the connection right after a chunked response
        # (its stream provider reports the end like a cancel), so a request sent on it
        # would race with that close and fail without ever reaching the child.
        self._finish(reusable=False)

    def _client_went_away(self) -> None:
        self.client_gone = True
        self.abort()

    def _finish(self, reusable: bool, clean: bool = True) -> None:
        if self.done:
            return
        self.done = True
        self.state = _DONE
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.paused:
            # Everything is read: the connection may be reused whatever the client does.
            self.conn.resume_reading()
        self.conn.finished(self, reusable, clean)
        self._wake()

    def _fail(self, message: str) -> None:
        if self.done:
            return
        self.error = message
        self._finish(reusable=False, clean=False)

    def fail(self, message: str) -> None:
        """End this exchange with `message` as its error (the router stops the child)."""
        self._fail(message)

    def on_lost(self, exc: BaseException | None) -> None:
        if self.done:
            return
        if self._pending is not None and self.state == _BODY:
            self._lost = (exc,)  # handled once the sink is attached and pending is relayed
            return
        self._on_lost(exc)

    def _on_lost(self, exc: BaseException | None) -> None:
        if self.state == _BODY and self.mode == _CLOSE and exc is None:
            self._finish(reusable=False)
            return
        where = "before answering" if self.state == _HEAD else "mid-response"
        detail = f"{type(exc).__name__}: {exc}" if exc is not None else "connection closed"
        self._fail(f"child closed the connection {where} ({detail})")

    def _check_timeout(self) -> None:
        self._timer = None
        if self.done:
            return
        now = self._loop.time()
        if self.paused:
            self._last_read = now  # the client is slow, not the child
        due = self._last_read + self._timeout
        if now >= due:
            self._fail(f"no data from child for {self._timeout:g} s")
            return
        self._timer = self._loop.call_at(due, self._check_timeout)


class ChildConnection(asyncio.Protocol):
    __slots__ = (
        "completed", "counted", "exchange", "idle_since", "loop", "lost", "pool", "sock", "transport",
    )

    def __init__(self, pool: ChildPool, sock: socket.socket) -> None:
        self.pool = pool
        self.loop = pool.loop
        self.sock = sock
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.idle_since = 0.0
        self.exchange: Exchange | None = None
        self.counted = True  # holds one of the pool's `limit` places
        self.completed = False  # closed after serving a whole response: worth replacing

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not derive from asyncio.Transport, so no isinstance check.
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            self.abort()  # bytes nobody asked for: the connection is out of step
            return
        exchange.feed(data)

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = True
        self.pool.forget(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.on_lost(exc)

    # exchanges
    def alive(self) -> bool:
        """Still connected as far as the kernel knows: the child may have closed it since
        the event loop last looked, so peek at the socket."""
        if self.lost or self.transport is None or self.transport.is_closing():
            return False
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return True  # nothing to read: open and quiet, as an idle connection should be
        except OSError:
            return False
        return False  # EOF, or bytes nobody asked for: either way not reusable

    def send(self, parts: Iterable[bytes], buffer_limit: int, timeout: float, head_only: bool = False) -> Exchange:
        assert self.transport is not None
        exchange = self.exchange = Exchange(self, buffer_limit, timeout, head_only)
        self.transport.writelines(parts)
        return exchange

    def finished(self, exchange: Exchange, reusable: bool, clean: bool) -> None:
        if self.exchange is exchange:
            self.exchange = None
        if reusable and not self.lost:
            self.pool.release(self)
        elif clean and self.transport is not None and not self.lost:
            self.completed = True
            self.transport.close()  # the response is complete; connection_lost frees the place
        else:
            if clean and self.lost:
                # The child closed the connection before the relay reached the end of the
                # response (a short one): its place is already free; take one for a spare.
                self.pool.add_spare()
            self.abort()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.resume_reading()

    def abort(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.abort()  # connection_lost follows and calls pool.forget
        else:
            self.pool.forget(self)

    def cut(self, reason: str) -> None:
        """Close at once, failing the exchange on it (if any) with `reason`."""
        exchange = self.exchange
        if exchange is not None:
            exchange.fail(reason)  # finishing it aborts the connection
        else:
            self.abort()


class ChildPool:
    """Keep-alive connections to one child: at most `limit` open at once; requests beyond
    that wait here in arrival order."""

    def __init__(self, port: int, limit: int, idle: float, connect_timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.port = port
        self.limit = max(1, limit)
        self.idle_timeout = idle
        self.connect_timeout = connect_timeout
        self.open = 0  # connections counted against `limit` (idle, busy or connecting)
        self.idle: list[ChildConnection] = []
        self.waiters: collections.deque[asyncio.Future[ChildConnection | None]] = collections.deque()
        self.opened = 0  # connections opened over the pool's life (tests, benchmarks)
        self._prune: asyncio.TimerHandle | None = None
        self._refills: set[asyncio.Task[None]] = set()
        self.closed = False
        self.live: set[ChildConnection] = set()  # every connection open now, idle or busy

    async def acquire(self) -> ChildConnection:
        conn = self._take_idle()
        if conn is not None:
            return conn
        if self.open < self.limit and not self.waiters:
            self.open += 1
            return await self._connect(self.connect_timeout)
        fut: asyncio.Future[ChildConnection | None] = self.loop.create_future()
        self.waiters.append(fut)
        try:
            if self.connect_timeout > 0:
                async with asyncio.timeout(self.connect_timeout):
                    got = await fut
            else:
                got = await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                handed = fut.result()  # handed over just as we gave up: pass it on
                if handed is not None:
                    self.release(handed)
                else:
                    self._free_place()
            else:
                # Cancelled before anything was handed over: leave the queue.
                try:
                    self.waiters.remove(fut)
                except ValueError:
                    pass
            raise
        if got is None:  # a place freed up and is ours: open a new connection
            return await self._connect(self.connect_timeout)
        if got.alive():
            got.idle_since = 0.0
            return got
        got.abort()  # it died on the way: its place goes to the next waiter, or to us
        return await self.acquire()

    def _take_idle(self) -> ChildConnection | None:
        idle = self.idle
        if not idle:
            return None
        now = self.loop.time()
        oldest_ok = now - self.idle_timeout
        # Oldest first: drop the ones idle too long (they only hold a child thread).
        while idle and idle[0].idle_since <= oldest_ok:
            idle.pop(0).abort()
        while idle:
            conn = idle.pop()  # the most recently used one: the furthest from expiry
            if conn.alive():
                return conn
            conn.abort()
        return None

    async def _connect(self, timeout: float) -> ChildConnection:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        # Requests and streamed events are small writes that must go out at once.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = ChildConnection(self, sock)
        try:
            if timeout > 0:
                async with asyncio.timeout(timeout):
                    await self.loop.sock_connect(sock, ("127.0.0.1", self.port))
            else:
                await self.loop.sock_connect(sock, ("127.0.0.1", self.port))
            await self.loop.create_connection(lambda: conn, sock=sock)
        except BaseException as exc:
            sock.close()
            conn.lost = True
            self.forget(conn)
            if isinstance(exc, (OSError, TimeoutError)):
                raise ConnectFailed(f"cannot connect to {child_host(self.port)}: {_describe(exc)}") from exc
            raise
        self.opened += 1
        self.live.add(conn)
        return conn

    def release(self, conn: ChildConnection) -> None:
        """A connection is free again: hand it to the first waiter, or keep it idle."""
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        conn.idle_since = self.loop.time()
        self.idle.append(conn)
        if self._prune is None:
            self._prune = self.loop.call_at(conn.idle_since + self.idle_timeout, self._prune_idle)

    def _prune_idle(self) -> None:
        """Close connections idle too long: each holds one of the child's threads, and
        the child would close it soon anyway."""
        self._prune = None
        idle = self.idle
        oldest_ok = self.loop.time() - self.idle_timeout
        while idle and idle[0].idle_since <= oldest_ok:
            idle.pop(0).abort()
        if idle:
            self._prune = self.loop.call_at(idle[0].idle_since + self.idle_timeout, self._prune_idle)

    def forget(self, conn: ChildConnection) -> None:
        """A connection is closed: its place goes to the first waiter, if any; else, if it
        had served a whole response, to a replacement opened now."""
        self.live.discard(conn)
        if not conn.counted:
            return
        conn.counted = False
        try:
            self.idle.remove(conn)
        except ValueError:
            pass
        if conn.completed and self._spares_wanted():
            self._refill()  # the place stays counted, now the replacement's
        else:
            self._free_place()

    def add_spare(self) -> None:
        """Open a replacement for a connection whose place is already free, if there is
        room and nobody waits for it."""
        if self.open < self.limit and self._spares_wanted():
            self.open += 1
            self._refill()

    def _spares_wanted(self) -> bool:
        # With no idle reuse (idle timeout 0) a spare would only be closed unused.
        return not self.waiters and not self.closed and self.idle_timeout > 0

    def _refill(self) -> None:
        """Open a connection in the place already counted for it."""
        task = self.loop.create_task(self._open_spare())
        self._refills.add(task)
        task.add_done_callback(self._refill_done)

    def _refill_done(self, task: asyncio.Task[None]) -> None:
        self._refills.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("opening a spare connection to 127.0.0.1:%d failed: %s", self.port, _describe(exc))

    async def _open_spare(self) -> None:
        """Open a connection for the next request and keep it idle. No request waits on
        it, so a failure only gives the place back. Bounded by the idle timeout (a spare
        is useless after that anyway), or the connect timeout if that is shorter."""
        if self.closed:
            self._free_place()
            return
        try:
            bound = self.idle_timeout
            if 0 < self.connect_timeout < bound:
                bound = self.connect_timeout
            conn = await self._connect(bound)
        except ConnectFailed:
            return  # the child is gone or going: _connect gave the place back
        if self.closed:
            conn.abort()  # the place is given back as the connection goes
        else:
            self.release(conn)

    def _free_place(self) -> None:
        while self.waiters:
            fut = self.waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the place stays counted, now the waiter's
                return
        self.open -= 1

    def close(self) -> None:
        # Spares being opened are not cancelled (a task cancelled before its first step
        # could not give its place back): each sees `closed` and lets go of its place.
        self.closed = True
        if self._prune is not None:
            self._prune.cancel()
            self._prune = None
        for conn in list(self.idle):
            conn.abort()

    def cut(self, reason: str) -> None:
        """Close every connection, the busy ones included, failing their exchanges with
        `reason`: the child is being stopped, and llama-server waits for its open
        connections before it exits."""
        self.close()
        for conn in list(self.live):
            conn.cut(reason)



def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
