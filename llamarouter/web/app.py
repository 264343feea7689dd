"""The aiohttp application: middlewares (errors, auth, CORS), routes and the web UIs.

HTTP only: the core (supervisor, memory, keep-cache, watcher) is a `Runtime` built,
started and stopped by the caller (server.py); the app registers its listeners on it.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Middleware

from ..core.process import ModelProcess
from ..core.runtime import Runtime
from ..core.states import State
from ..errors import ConfigError, LlamaRouterError, NotFound, PayloadTooLarge, Unauthorized
from ..settings.config import CorsPolicy, RouterConfig
from . import llamaui, webui
from .api import Api, error_body
from .history import History
from .metrics import RouterMetrics
from .proxy import Proxy

log = logging.getLogger("llamarouter.web.app")

class ActiveRequests:
    """The handlers running now, so shutdown can wait for them (bounded) and then cancel
    what is left, instead of aiohttp's per-connection waits that add up past the grace."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def count(self) -> int:
        return len(self._tasks)

    def enter(self) -> asyncio.Task[object] | None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            self._idle.clear()
        return task

    def leave(self, task: asyncio.Task[object] | None) -> None:
        if task is not None:
            self._tasks.discard(task)
            if not self._tasks:
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
            return True
        except TimeoutError:
            return False

    async def cancel_all(self, timeout: float) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)


RUNTIME = web.AppKey("runtime", Runtime)
ACTIVE = web.AppKey("active", ActiveRequests)
CONFIG = web.AppKey("config", RouterConfig)
METRICS = web.AppKey("metrics", RouterMetrics)

# Exempt from the API key, as upstream exempts /health and /v1/health (server-http.cpp);
# the probes too, since kubelets and load balancers send no credentials.
# The web UI's static files are public too (upstream exempts its UI assets); the UI's own
# API calls send the key.
# The llama.cpp UI's files are added to these when it is built (build_app).
_PUBLIC_PATHS = frozenset({"/health", "/v1/health", "/livez", "/readyz", "/", "/sw.js", *webui.PUBLIC_PATHS})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
    if method == "POST" and path in ("/models/load", "/models/unload", "/models/pin"):
        return True
    if method in ("POST", "DELETE") and path == "/models":
        return True  # downloads and removals write to the cache
    if method == "GET" and path == "/models/logs":
        return True
    return method == "GET" and path in ("/models", "/v1/models") and bool(request.query.get("reload", ""))


def _authorize(config: RouterConfig, request: web.Request, public: frozenset[str] = _PUBLIC_PATHS) -> None:
    if request.path in public or request.method == "OPTIONS":
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


def _is_localhost_origin(origin: str) -> bool:
    # As upstream: the URL's host is localhost, 127.0.0.1 or ::1, whatever the port.
    try:
        host = urlsplit(origin).hostname
    except ValueError:
        return False
    return host in ("localhost", "127.0.0.1", "::1")


def cors_headers(cors: CorsPolicy, method: str, origin: str | None) -> dict[str, str]:
    """The CORS headers llama-server puts on every answer (and, for OPTIONS, the preflight
    ones), from its settings and the request's Origin."""
    out: dict[str, str] = {}
    if cors.credentials and cors.origins == "*":
        # Echoed whatever it is, even absent (an empty header), as upstream does.
        out["Access-Control-Allow-Origin"] = origin or ""
    elif cors.origins == "localhost":
        if origin and _is_localhost_origin(origin):
            out["Access-Control-Allow-Origin"] = origin
    else:
        out["Access-Control-Allow-Origin"] = cors.origins
    if method == "OPTIONS":
        out["Access-Control-Allow-Credentials"] = "true" if cors.credentials else "false"
        out["Access-Control-Allow-Methods"] = cors.methods
        out["Access-Control-Allow-Headers"] = cors.headers
    return out


def _llama_ui(config: RouterConfig) -> llamaui.LlamaUi | None:
    if config.ui_dir is None:
        return None
    try:
        return llamaui.LlamaUi(config.ui_dir)
    except OSError as exc:
        raise ConfigError(f"--ui-dir: {exc}") from None


def build_app(config: RouterConfig, runtime: Runtime) -> web.Application:
    """The HTTP side only: middlewares, routes and the web UIs, around a runtime that the
    caller starts and stops (server.py)."""
    active = ActiveRequests()
    ui = _ui_plan(config)
    app = web.Application(
        middlewares=[_errors_middleware(config, active, ui.public)],
        client_max_size=config.limits.max_body_bytes,
    )

    async def add_cors(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(cors_headers(config.cors, request.method, request.headers.get("Origin")))

    app.on_response_prepare.append(add_cors)
    app[CONFIG] = config
    app[ACTIVE] = active
    app[RUNTIME] = runtime
    history = History(config.limits.history_span, config.limits.history_step)
    metrics = app[METRICS] = RouterMetrics(config.timeouts.metrics_scrape, history)
    metrics.add_kv_cache(lambda: runtime.kv_cache)
    proxy = Proxy(config)
    api = Api(config, runtime, proxy, metrics)
    api.add_routes(app)  # the router freezes before startup, so routes go in now
    if ui.served:
        webui.add_routes(app, at_root=ui.built is None)
        llamaui.add_routes(app, ui.built)  # last: its `/{path}` must not shadow any other route
    runtime.listen(_WebListener(metrics, proxy))
    return app


@dataclass(frozen=True)
class _Ui:
    """Whether the router serves its UIs, llama.cpp's built UI if any, and the paths
    served without a key."""

    served: bool
    built: llamaui.LlamaUi | None
    public: frozenset[str]


def _ui_plan(config: RouterConfig) -> _Ui:
    # Router mode with its UI on: `/` is llama.cpp's UI when built, else the dashboard; the
    # dashboard is also at /dashboard/. In -m/-hf mode `/` is the child's own UI, with
    # --path it is that directory, and --no-ui or --api-prefix serve no UI (as llama-server).
    if (
        config.single_model is None and config.webui and not config.api_prefix
        and config.static_path is None
    ):
        ui = _llama_ui(config)
        return _Ui(True, ui, _PUBLIC_PATHS | (ui.public_paths if ui is not None else frozenset()))
    return _Ui(False, None, _PUBLIC_PATHS)


def _errors_middleware(config: RouterConfig, active: ActiveRequests, public: frozenset[str]) -> Middleware:
    """Errors in the API's shape, the key check, and the count of running handlers."""

    @web.middleware
    async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
        task = active.enter()
        try:
            if request.method == "OPTIONS":
                # Preflight, on any path and before the key check (browsers send no key):
                # an empty 200 carrying the CORS headers, as upstream.
                return web.Response(status=200, body=b"", content_type="text/html")
            _authorize(config, request, public)
            return await handler(request)
        except LlamaRouterError as exc:
            return _error_response(exc)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status in (404, 405):
                # Unknown path or method: upstream answers both with this 404.
                return _error_response(NotFound("File Not Found"))
            if exc.status == 413:
                return _error_response(PayloadTooLarge("request body is too large"))
            return _error_response(LlamaRouterError(exc.reason))
        except Exception as exc:  # a bug of ours: keep serving, answer in the API's shape
            log.exception("unhandled error on %s %s", request.method, request.path)
            return _error_response(LlamaRouterError(f"internal error: {type(exc).__name__}: {exc}"))
        finally:
            active.leave(task)

    return errors


class _WebListener:
    """What the web layer does on a model's transitions and the scheduler's actions."""

    def __init__(self, metrics: RouterMetrics, proxy: Proxy) -> None:
        self._metrics = metrics
        self._proxy = proxy

    def on_state(self, proc: ModelProcess, old: State, new: State) -> None:
        self._metrics.on_state(proc, old, new)
        if new == State.STOPPING:
            # llama-server exits only once its open connections are closed: requests still
            # running on a model being stopped (an unload) end now with an error, instead
            # of going silent until the SIGKILL.
            self._proxy.cut(proc, f"the model was stopped ({proc.stop_reason or 'stop'})")

    def waited(self, model: str, seconds: float) -> None:
        self._metrics.waited(model, seconds)

    def drained(self, model: str) -> None:
        self._metrics.drained(model)
