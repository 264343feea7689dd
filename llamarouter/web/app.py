"""aiohttp application: middlewares (errors, auth), startup and the shutdown order.

Shutdown order (docs/design.md): stop accepting -> new requests get 503 -> in-flight
responses get `shutdown_grace` -> children stopped in parallel -> client session closed ->
instance lock released.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from . import webui
from .api import Api, error_body
from ..settings.childargs import ChildArgs
from ..settings.config import ModelSpec, RouterConfig
from ..errors import LlamaRouterError, NotFound, PayloadTooLarge, Unauthorized
from ..core.launcher import Launcher, OsLauncher
from ..core.memory import MemoryManager
from .metrics import RouterMetrics
from .proxy import Proxy
from ..core.statedir import StateDir
from ..core.supervisor import Supervisor

log = logging.getLogger("llamarouter.web.app")

SUPERVISOR = web.AppKey("supervisor", Supervisor)
CONFIG = web.AppKey("config", RouterConfig)
METRICS = web.AppKey("metrics", RouterMetrics)

# Exempt from the API key, as upstream exempts /health and /v1/health (server-http.cpp);
# the probes too, since kubelets and load balancers send no credentials.
# The web UI's static files are public too (upstream exempts its UI assets); the UI's own
# API calls send the key.
_PUBLIC_PATHS = frozenset({"/health", "/v1/health", "/livez", "/readyz", *webui.PUBLIC_PATHS})

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


def _key_ok(config: RouterConfig, request: web.Request, keys: tuple[str, ...] | None = None) -> bool:
    given = request.headers.get("Authorization") or request.headers.get("X-Api-Key") or ""
    if given.startswith("Bearer "):
        given = given[7:]
    given_b = given.encode()
    # Compare against every key without an early exit, so timing does not tell which
    # prefix matched.
    ok = False
    for key in config.api_keys if keys is None else keys:
        ok |= hmac.compare_digest(given_b, key.encode())
    return ok


def _is_admin_request(request: web.Request) -> bool:
    """Endpoints that change or reveal the set of running models (--admin-api-key)."""
    path, method = request.path, request.method
    if method == "POST" and path in ("/models/load", "/models/unload"):
        return True
    if method == "GET" and path == "/models/logs":
        return True
    return method == "GET" and path in ("/models", "/v1/models") and bool(request.query.get("reload", ""))


def _authorize(config: RouterConfig, request: web.Request) -> None:
    if request.path in _PUBLIC_PATHS or request.method == "OPTIONS":
        return
    if config.admin_api_keys and _is_admin_request(request):
        if not _key_ok(config, request, config.admin_api_keys):
            raise Unauthorized("Invalid API Key")
        return
    if config.api_keys:
        # Both comparisons always run (constant time across key sets too).
        normal = _key_ok(config, request)
        admin = _key_ok(config, request, config.admin_api_keys)
        if not (normal or admin):
            raise Unauthorized("Invalid API Key")


def _cors_origin(config: RouterConfig, request: web.Request) -> str | None:
    """The Origin to echo in Access-Control-Allow-Origin, or None (CORS off by default)."""
    origin = request.headers.get("Origin")
    if not origin or not config.cors_origins:
        return None
    if "*" in config.cors_origins or origin in config.cors_origins:
        return origin
    return None


def build_app(
    config: RouterConfig,
    discover: Discover,
    child_args: ChildArgs,
    launcher: Launcher | None = None,
) -> web.Application:
    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            _authorize(config, request)
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
            if exc.status == 413:
                return _error_response(PayloadTooLarge("request body is too large"))
            return _error_response(LlamaRouterError(exc.reason))
        except Exception as exc:  # a bug of ours: keep serving, answer in the API's shape
            log.exception("unhandled error on %s %s", request.method, request.path)
            return _error_response(LlamaRouterError(f"internal error: {type(exc).__name__}: {exc}"))

    async def cors_headers(request: web.Request, response: web.StreamResponse) -> None:
        if (origin := _cors_origin(config, request)) is not None:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers.add("Vary", "Origin")

    app = web.Application(middlewares=[errors], client_max_size=config.limits.max_body_bytes)
    if config.cors_origins:
        app.on_response_prepare.append(cors_headers)
    app[CONFIG] = config
    metrics = app[METRICS] = RouterMetrics(config.timeouts.metrics_scrape)
    api = Api(config, child_args, metrics)
    api.add_routes(app)  # the router freezes before startup, so routes go in now

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        state_dir = StateDir(config.state_dir) if config.state_dir is not None else None
        if state_dir is not None:
            state_dir.acquire()
        # Health probes and metrics scrapes: idle connections are dropped before llama-server's
        # 5 s keep-alive closes them, so a probe never meets a connection being closed.
        connector = aiohttp.TCPConnector(
            limit=0, keepalive_timeout=config.timeouts.proxy_idle, enable_cleanup_closed=False
        )
        # No cookie jar: children set no cookies, and the jar costs time on every request.
        session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        )
        memory = None
        if config.memory_budget is not None:
            memory = MemoryManager.from_setting(
                config.memory_budget, config.limits.memory_margin,
                config.timeouts.memory_recovery, config.timeouts.memory_poll,
            )
        sup = Supervisor(
            config, discover, launcher or OsLauncher(), session, child_args.argv, state_dir,
            observer=metrics.on_state, options_for=child_args.merged, memory=memory,
        )
        app[SUPERVISOR] = sup
        api.bind(sup, Proxy(config), session)
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
