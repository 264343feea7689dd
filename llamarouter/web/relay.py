"""The byte relay from a child to our client, on a pooled connection (pool.py).

Why not aiohttp's client: its per-chunk machinery (a StreamReader, a task wake-up and a
write per chunk) costs router CPU on every relayed SSE event, and on a small machine that
CPU is taken from generation. Here the child's response bytes are copied to the client's
transport inside the child connection's `data_received` callback: no task switch, no copy
and no parse per event beyond finding chunk boundaries. Whatever arrived in one read goes
out in one write, so events that are ready together are coalesced and a lone event is
never held back.
"""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING

from ..core.http1 import MAX_HEAD, ExchangeFailed, Head, parse_head

if TYPE_CHECKING:
    from .pool import ChildConnection

_HEAD, _BODY, _TRAILER, _DONE = range(4)
_NONE, _LENGTH, _CHUNKED, _CLOSE = range(4)

# Reads of a response body kept to find llama-server's closing `timings` event.
_TAIL_READS = 8


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
                if len(self._head_buf) > MAX_HEAD:
                    self._fail("response head from child is too large")
                return
            raw, data = self._head_buf[:end], self._head_buf[end + 4:]
            self._head_buf = b""
            try:
                head = parse_head(raw)
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
            if len(buf) > MAX_HEAD:
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
