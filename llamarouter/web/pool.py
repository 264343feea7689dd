"""HTTP/1.1 connections to one child: a pool per child, sized to its HTTP threads.

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
from .relay import Exchange

# The name its messages had while the pool lived in relay.py, which log filters may match.
log = logging.getLogger("llamarouter.web.relay")


class ConnectFailed(Exception):
    """No connection to the child could be opened: the request never reached it."""


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
            log.warning("opening a spare connection to %s failed: %s", child_host(self.port), _describe(exc))

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
