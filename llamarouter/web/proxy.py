"""Forward one request to a child and its response back, unparsed.

Hot path: pooled keep-alive connections per child, sized to the child's HTTP threads
(relay.py); no parsing of the response beyond its head; small bodies answered in one
write; streams copied from the child's transport to the client's as bytes arrive, inside
the child connection's read callback. A client that goes away cancels the handler
(aiohttp handler cancellation), which closes the child connection, which makes
llama-server stop generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
import weakref
from collections.abc import Iterable, Mapping
from typing import cast

from aiohttp import web
from multidict import CIMultiDict

from ..core.childclient import child_host
from ..core.gguf_info import RunSettings
from ..core.http1 import Head
from ..core.process import ModelProcess
from ..core.states import State
from ..errors import ChildBroke, ChildUnreachable, UpstreamError
from ..settings.childargs import running_options
from ..settings.config import RouterConfig
from .metrics import PREDICTED_MARK, RequestTiming, predicted_tokens
from .pool import ChildConnection, ChildPool, ConnectFailed
from .relay import Exchange

log = logging.getLogger("llamarouter.web.proxy")

# Request headers not forwarded: hop-by-hop ones, plus what upstream drops
# (Accept-Encoding, Transfer-Encoding, Content-Length) and Host, which the client sets.
_DROP_REQUEST = frozenset(
    h.lower()
    for h in (
        "Accept-Encoding", "Transfer-Encoding", "Content-Length", "Host", "Connection",
        "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer", "Upgrade",
        # The body is read whole before it is forwarded, so there is nothing to continue.
        "Expect",
    )
)
# Response headers not forwarded: upstream drops Server, Transfer-Encoding, Content-Length,
# Keep-Alive and Access-Control-* (the router answers CORS itself); plus hop-by-hop ones.
_DROP_RESPONSE = frozenset(
    h.lower()
    for h in (
        "Server", "Transfer-Encoding", "Content-Length", "Keep-Alive", "Connection", "Date",
        "Trailer", "Upgrade", "Proxy-Authenticate",
    )
)
# A response with a Content-Length up to this size is read whole and sent in one write;
# anything else (SSE, chunked, large) is relayed chunk by chunk.
_BUFFER_LIMIT = 1 << 20
# A request body up to this size is joined to the head and sent in one write.
_JOIN_LIMIT = 1 << 16


def _request_head(request: web.Request, port: int, body: bytes | None) -> bytes:
    lines = [f"{request.method} {request.raw_path} HTTP/1.1\r\nHost: {child_host(port)}\r\n"]
    for key, value in request.headers.items():
        if key.lower() not in _DROP_REQUEST:
            lines.append(f"{key}: {value}\r\n")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}\r\n")
    lines.append("\r\n")
    # aiohttp decodes header bytes as UTF-8 with surrogateescape: this gives them back.
    return "".join(lines).encode("utf-8", "surrogateescape")


def _response_headers(head: Head) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in head.headers:
        low = key.lower()
        if low in _DROP_RESPONSE or low.startswith("access-control-"):
            continue
        out.add(key, value)
    return out


def _sse_error(message: str) -> bytes:
    # llama-server itself reports a failed stream as a `data:` event holding an error object.
    body = {"error": {"code": 500, "message": message, "type": "server_error"}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def child_http_threads(argv: Iterable[str], env: Mapping[str, str], cpus: int) -> int:
    """How many connections llama-server serves at once: its HTTP worker threads.

    Its default (server-http.cpp) is max(n_parallel + 4, hardware threads - 1), where an
    unset or negative n_parallel means auto, which is 4 (server.cpp) by then. Newer builds
    add short-lived threads beyond these, older ones leave further connections unread.
    """
    opts = running_options(argv, env)
    try:
        threads = int(opts.get("--threads-http", "0"))
    except ValueError:
        threads = 0
    if threads >= 1:
        return threads
    # -np read as the memory estimate reads it (-1 = auto).
    parallel = RunSettings.from_options(opts).n_parallel
    if parallel < 0:
        parallel = 4
    return max(parallel + 4, cpus - 1)


class Proxy:
    def __init__(self, config: RouterConfig) -> None:
        timeout = config.timeouts.proxy
        # Bounds connecting, waiting for a free connection, and the gap between two reads
        # (not the whole stream). 0 = none.
        self._timeout = timeout if timeout > 0 else 0.0
        self._idle = config.timeouts.proxy_idle
        self._reserve = config.limits.child_http_reserve
        self._env = dict(config.child_env)
        self._cpus = os.cpu_count() or 1
        self._pools: weakref.WeakKeyDictionary[ModelProcess, tuple[list[str], ChildPool]] = (
            weakref.WeakKeyDictionary()
        )

    def pool_for(self, proc: ModelProcess, port: int) -> ChildPool:
        entry = self._pools.get(proc)
        # A new process (a restart builds a new argv list) gets a pool sized to it.
        if entry is not None and entry[0] is proc.argv and entry[1].port == port:
            return entry[1]
        if entry is not None:
            entry[1].close()
        threads = child_http_threads(proc.argv, self._env, self._cpus)
        pool = ChildPool(port, threads - self._reserve, self._idle, self._timeout)
        self._pools[proc] = (proc.argv, pool)
        return pool

    def cut(self, proc: ModelProcess, reason: str) -> None:
        """The model is being stopped: end its requests in flight now, with `reason`,
        and close its connections (llama-server exits only once they are closed)."""
        entry = self._pools.pop(proc, None)
        if entry is not None:
            entry[1].cut(reason)

    async def forward(
        self,
        request: web.Request,
        proc: ModelProcess,
        body: bytes | None,
        timing: RequestTiming | None = None,
    ) -> web.StreamResponse:
        port = proc.port
        if port is None:
            raise UpstreamError(f"proxy error: model name={proc.name} is not running")
        conn = await self._acquire(proc, port)
        head = _request_head(request, port, body)
        # One buffer for a small body: one send, one segment.
        parts = (head + body,) if body and len(body) <= _JOIN_LIMIT else (head, body) if body else (head,)
        exchange = conn.send(parts, _BUFFER_LIMIT, self._timeout, request.method == "HEAD")
        try:
            await exchange.wait()
            _answered(exchange, proc, timing)
            assert exchange.head is not None
            if exchange.whole:
                if exchange.body is None:  # cut short: nothing reached our client yet
                    raise ChildBroke(f"proxy error: {exchange.error}")
                if timing is not None and PREDICTED_MARK in exchange.body:
                    timing.tokens = predicted_tokens(exchange.body) or 0
                headers = _response_headers(exchange.head)
                if request.method == "HEAD":
                    if exchange.head.length is not None:
                        headers["Content-Length"] = str(exchange.head.length)  # what a GET gets
                    return web.Response(status=exchange.head.status, headers=headers)
                return web.Response(status=exchange.head.status, body=exchange.body, headers=headers)
            try:
                return await self._stream(request, proc, exchange)
            finally:
                # Also when the client hangs up right after the last event (as browsers do).
                if timing is not None:
                    tail = b"".join(exchange.tail)
                    if PREDICTED_MARK in tail:
                        timing.tokens = predicted_tokens(tail) or 0
        finally:
            exchange.abort()  # a no-op once the exchange is complete

    async def fetch(
        self, proc: ModelProcess, path: str, body: bytes, timing: RequestTiming | None = None
    ) -> web.Response:
        """POST `body` (JSON) to the child's `path` and read its answer whole, whatever its
        framing or size. For an answer the router uses itself (the Vertex AI predict route
        collects several into one), so it is not relayed to any client as it comes."""
        port = proc.port
        if port is None:
            raise UpstreamError(f"proxy error: model name={proc.name} is not running")
        conn = await self._acquire(proc, port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {child_host(port)}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode("utf-8", "surrogateescape")
        exchange = conn.send((head + body,), _BUFFER_LIMIT, self._timeout)
        try:
            await exchange.wait()
            _answered(exchange, proc, timing)
            assert exchange.head is not None
            if exchange.whole:
                data = exchange.body
            else:
                sink = _Collector()
                exchange.attach(sink, client_chunked=False)
                while not exchange.done:
                    await exchange.wait()
                data = None if exchange.error is not None else b"".join(sink.parts)
            if data is None:
                raise ChildBroke(f"proxy error: {exchange.error}")
            if timing is not None and PREDICTED_MARK in data:
                timing.tokens = predicted_tokens(data) or 0
            return web.Response(status=exchange.head.status, body=data, headers=_response_headers(exchange.head))
        finally:
            exchange.abort()  # a no-op once the exchange is complete

    async def _acquire(self, proc: ModelProcess, port: int) -> ChildConnection:
        if proc.state == State.STOPPING:
            # Stopped between its grant and now (the cut has been): not sent at all.
            raise ChildBroke(f"proxy error: the model was stopped ({proc.stop_reason or 'stop'})")
        pool = self.pool_for(proc, port)
        try:
            conn = await pool.acquire()
        except ConnectFailed as exc:
            raise ChildUnreachable(f"proxy error: {exc}") from exc
        except TimeoutError as exc:
            raise UpstreamError(
                f"proxy error: no connection to model name={proc.name} became free "
                f"within {self._timeout:g} s"
            ) from exc
        if pool.closed:
            # The model was stopped (cut) while this request waited for its connection:
            # it must not reach a child that is exiting (llama-server waits for its open
            # connections, and would serve it to the end).
            conn.abort()
            raise ChildBroke(f"proxy error: the model was stopped ({proc.stop_reason or 'stop'})")
        return conn

    async def _stream(self, request: web.Request, proc: ModelProcess, exchange: Exchange) -> web.StreamResponse:
        head = exchange.head
        assert head is not None
        headers = _response_headers(head)
        headers["X-Accel-Buffering"] = "no"
        resp = web.StreamResponse(status=head.status, headers=headers)
        if head.length is not None:
            resp.content_length = head.length
        elif request.version >= (1, 1):
            resp.enable_chunked_encoding()
        writer = await resp.prepare(request)
        transport = request.transport
        if writer is None or transport is None or transport.is_closing():
            raise ConnectionResetError("the client went away")
        # The head is on the wire (StreamResponse sends it in prepare): from here on the
        # body bytes go straight to the client's transport in the child's read callback.
        # (uvloop's transports do not derive from asyncio's, hence the cast.)
        exchange.attach(cast("asyncio.WriteTransport", transport), resp.chunked)
        while not exchange.done:
            await exchange.wait()
            if exchange.paused:
                # A client that reads nothing would otherwise hold the model (its lease, its
                # slot, an eviction or a reload's drain) for good: like llama-server, whose
                # --timeout is also its write timeout, it gets -to seconds to make room.
                try:
                    async with asyncio.timeout(self._timeout or None):
                        await writer.drain()
                except TimeoutError:
                    log.warning(
                        "[%s] client read nothing for %g s: stream dropped", proc.name, self._timeout
                    )
                    raise ConnectionResetError("the client stopped reading") from None
                exchange.resume()
        if exchange.client_gone:
            raise ConnectionResetError("the client went away")
        if exchange.error is not None:
            # The child died or broke mid-response: headers are gone, so end the stream with
            # an error event the client can see instead of a silent truncation.
            message = f"model name={proc.name}: upstream failed mid-response: {exchange.error}"
            log.warning("[%s] %s", proc.name, message)
            if "text/event-stream" in head.get("Content-Type"):
                with contextlib.suppress(ConnectionError):
                    await resp.write(_sse_error(message))
            with contextlib.suppress(ConnectionError):
                await resp.write_eof()
            return resp
        await resp.write_eof()
        return resp


def _answered(exchange: Exchange, proc: ModelProcess, timing: RequestTiming | None) -> None:
    """The child's response head is in (else ChildBroke: nothing reached our client yet)."""
    if exchange.head is None:
        raise ChildBroke(f"proxy error: {exchange.error or 'no response from child'}")
    now = proc.last_activity = time.monotonic()
    if timing is not None:
        timing.headers_at = now  # time to first byte: the same clock read, no extra cost


class _Collector(asyncio.WriteTransport):
    """Where `fetch` has a body relayed: kept whole, never full (the child is read at
    its own pace, as aiohttp's client read it before)."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.parts.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0)
