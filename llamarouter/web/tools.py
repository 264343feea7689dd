"""`/tools` and `/cors-proxy` relayed to the tools server (core/toolserver.py), streamed
both ways: MCP over HTTP answers with event streams."""

from __future__ import annotations

from aiohttp import web

from ..core.childclient import NO_ANSWER, ChildClient
from ..core.toolserver import ToolServer
from ..errors import Unavailable, UpstreamError

# Hop-by-hop and framing headers are the relay's own; CORS headers are the router's.
_DROP_REQUEST = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "content-length", "te", "upgrade"})
_DROP_RESPONSE = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "server", "date"})


async def relay(request: web.Request, tools: ToolServer, children: ChildClient, timeout: float) -> web.StreamResponse:
    """Send the request to the tools server and stream its answer back; `timeout` bounds
    each read (the proxy timeout, `-to`), not the whole exchange."""
    port = tools.port
    if port is None:
        raise Unavailable("the tools server is not running; try again later", retry_after=1.0)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_REQUEST}
    body = await request.read() if request.can_read_body else None
    resp = web.StreamResponse()
    try:
        async with children.forward(
            request.method, port, request.rel_url.path_qs, data=body, headers=headers, timeout=timeout
        ) as up:
            resp.set_status(up.status, up.reason)
            for k, v in up.headers.items():
                low = k.lower()
                if low not in _DROP_RESPONSE and not low.startswith("access-control-"):
                    resp.headers.add(k, v)
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp
    except NO_ANSWER as exc:
        if not resp.prepared:
            raise UpstreamError(f"proxy error: the tools server: {exc!r}") from exc
        # Headers are out: all that can be said is that the body ends short.
        if request.transport is not None:
            request.transport.close()
        return resp
