"""Forward one request to a child and its response back, unparsed.

Hot path: one pooled keep-alive connection set per child (a shared ClientSession), no
parsing of the response, small bodies answered in one write, streams relayed chunk by
chunk as they arrive. A client that goes away cancels the handler (aiohttp handler
cancellation), which closes the upstream connection, which makes llama-server stop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from ..core.process import ModelProcess
from ..errors import ChildUnreachable, UpstreamError
from .metrics import PREDICTED_MARK, RequestTiming, predicted_tokens

log = logging.getLogger("llamarouter.web.proxy")

# Request headers not forwarded: hop-by-hop ones, plus what upstream drops
# (Accept-Encoding, Transfer-Encoding, Content-Length) and Host, which the client sets.
_DROP_REQUEST = frozenset(
    h.lower()
    for h in (
        "Accept-Encoding", "Transfer-Encoding", "Content-Length", "Host", "Connection",
        "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE", "Trailer", "Upgrade",
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


def _request_headers(request: web.Request) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in request.headers.items():
        if key.lower() not in _DROP_REQUEST:
            out.add(key, value)
    return out


def _response_headers(upstream: aiohttp.ClientResponse) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for key, value in upstream.headers.items():
        low = key.lower()
        if low in _DROP_RESPONSE or low.startswith("access-control-"):
            continue
        out.add(key, value)
    return out


def _sse_error(message: str) -> bytes:
    # llama-server itself reports a failed stream as a `data:` event holding an error object.
    body = {"error": {"code": 500, "message": message, "type": "server_error"}}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


class Proxy:
    def __init__(self, session: aiohttp.ClientSession, timeout: float) -> None:
        self._session = session
        # sock_read bounds the gap between two chunks, not the whole stream.
        limit = timeout if timeout > 0 else None
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=limit, sock_read=limit)

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
        url = f"http://127.0.0.1:{port}{request.rel_url}"
        try:
            upstream_cm = self._session.request(
                request.method,
                url,
                headers=_request_headers(request),
                data=body,
                timeout=self._timeout,
                allow_redirects=False,
                auto_decompress=False,
            )
            upstream = await upstream_cm.__aenter__()
        except aiohttp.ClientConnectorError as exc:
            raise ChildUnreachable(f"proxy error: {_describe(exc)}") from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise UpstreamError(f"proxy error: {_describe(exc)}") from exc
        now = proc.last_activity = time.monotonic()
        if timing is not None:
            timing.headers_at = now  # time to first byte: the same clock read, no extra cost
        try:
            return await self._relay(request, proc, upstream, timing)
        finally:
            await upstream_cm.__aexit__(None, None, None)

    async def _relay(
        self,
        request: web.Request,
        proc: ModelProcess,
        upstream: aiohttp.ClientResponse,
        timing: RequestTiming | None = None,
    ) -> web.StreamResponse:
        headers = _response_headers(upstream)
        length = upstream.content_length
        if length is not None and length <= _BUFFER_LIMIT:
            try:
                data = await upstream.read()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                raise UpstreamError(f"proxy error: {_describe(exc)}") from exc
            if timing is not None and PREDICTED_MARK in data:
                timing.tokens = predicted_tokens(data) or 0
            return web.Response(status=upstream.status, body=data, headers=headers)

        headers["X-Accel-Buffering"] = "no"
        resp = web.StreamResponse(status=upstream.status, headers=headers)
        await resp.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                if timing is not None and PREDICTED_MARK in chunk:
                    timing.tokens = predicted_tokens(chunk) or timing.tokens
                await resp.write(chunk)
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
                aiohttp.ClientConnectionError, TimeoutError) as exc:
            if isinstance(exc, (ConnectionResetError, aiohttp.ClientConnectionResetError)) and (
                request.transport is None or request.transport.is_closing()
            ):
                raise  # our client went away; nothing to tell it
            # The child died or broke mid-response: headers are gone, so end the stream with
            # an error event the client can see instead of a silent truncation.
            message = f"model name={proc.name}: upstream failed mid-response: {_describe(exc)}"
            log.warning("[%s] %s", proc.name, message)
            ctype = upstream.headers.get("Content-Type", "")
            if "text/event-stream" in ctype:
                await resp.write(_sse_error(message))
            with contextlib.suppress(ConnectionError):
                await resp.write_eof()
            return resp
        await resp.write_eof()
        return resp


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
