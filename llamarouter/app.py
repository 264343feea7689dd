"""aiohttp application: middlewares (errors, auth), startup and the shutdown order.

Shutdown order (docs/design.md): stop accepting -> new requests get 503 -> in-flight
responses get `shutdown_grace` -> children stopped in parallel -> client session closed ->
instance lock released.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import signal
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from .api import Api, error_body
from .childargs import ChildArgs
from .config import ModelSpec, RouterConfig
from .errors import LlamaRouterError, NotFound, Unauthorized
from .launcher import Launcher, OsLauncher
from .proxy import Proxy
from .statedir import StateDir
from .supervisor import Supervisor

log = logging.getLogger("llamarouter.app")

SUPERVISOR = web.AppKey("supervisor", Supervisor)
CONFIG = web.AppKey("config", RouterConfig)

# Exempt from the API key, as upstream exempts /health and /v1/health (server-http.cpp).
_PUBLIC_PATHS = frozenset({"/health", "/v1/health"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Discover = Callable[[], dict[str, ModelSpec]]


_PREFLIGHT = {
    "Access-Control-Allow-Credentials": "true",
    "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
    "Access-Control-Allow-Headers": "*",
}


def _error_response(exc: LlamaRouterError) -> web.Response:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(exc.retry_after + 0.999)))
    return web.Response(
        body=json.dumps(error_body(exc), separators=(",", ":")).encode(),
        status=exc.status,
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


def _key_ok(config: RouterConfig, request: web.Request) -> bool:
    given = request.headers.get("Authorization") or request.headers.get("X-Api-Key") or ""
    if given.startswith("Bearer "):
        given = given[7:]
    given_b = given.encode()
    # Compare against every key without an early exit, so timing does not tell which
    # prefix matched.
    ok = False
    for key in config.api_keys:
        ok |= hmac.compare_digest(given_b, key.encode())
    return ok


def build_app(
    config: RouterConfig,
    discover: Discover,
    child_args: ChildArgs,
    launcher: Launcher | None = None,
) -> web.Application:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            if config.api_keys and request.path not in _PUBLIC_PATHS and request.method != "OPTIONS":
                if not _key_ok(config, request):
                    raise Unauthorized("Invalid API Key")
            return await handler(request)
        except LlamaRouterError as exc:
            return _error_response(exc)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if request.method == "OPTIONS":
                # CORS preflight: answered like upstream, without naming an allowed origin.
                return web.Response(status=200, headers=_PREFLIGHT)
            if exc.status in (404, 405):
                # Unknown path or method: upstream answers both with this 404.
                return _error_response(NotFound("File Not Found"))
            return _error_response(LlamaRouterError(exc.reason))
        except Exception as exc:  # a bug of ours: keep serving, answer in the API's shape
            log.exception("unhandled error on %s %s", request.method, request.path)
            return _error_response(LlamaRouterError(f"internal error: {type(exc).__name__}: {exc}"))

    app = web.Application(middlewares=[errors], client_max_size=config.limits.max_body_bytes)
    app[CONFIG] = config
    api = Api(config, child_args)
    api.add_routes(app)  # the router freezes before startup, so routes go in now

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        state_dir = StateDir(config.state_dir) if config.state_dir is not None else None
        if state_dir is not None:
            state_dir.acquire()
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, enable_cleanup_closed=False)
        session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        sup = Supervisor(
            config, discover, launcher or OsLauncher(), session, child_args.argv, state_dir
        )
        app[SUPERVISOR] = sup
        api.bind(sup, Proxy(session, config.timeouts.proxy))
        try:
            await sup.start()
            yield
        finally:
            await sup.shutdown()
            await session.close()
            if state_dir is not None:
                state_dir.release()

    app.cleanup_ctx.append(lifecycle)
    return app
