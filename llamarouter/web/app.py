"""aiohttp application: middlewares (errors, auth), startup and the shutdown order.

Shutdown order (docs/design.md): stop accepting -> new requests get 503 -> in-flight
responses get `shutdown_grace` -> children stopped in parallel -> client session closed ->
instance lock released.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from ..core.downloads import Downloads
from ..core.kvcache import KvCache
from ..core.launcher import Launcher, OsLauncher
from ..core.memory import MemoryManager
from ..core.probes import HttpProbe
from ..core.process import ModelProcess
from ..core.statedir import StateDir
from ..core.states import State
from ..core.supervisor import Supervisor
from ..core.toolserver import ToolServer
from ..core.watch import Watcher
from ..errors import ConfigError, LlamaRouterError, NotFound, PayloadTooLarge, Unauthorized
from ..settings.childargs import ChildArgs, keeps_cache
from ..settings.config import CorsPolicy, ModelSpec, RouterConfig
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


SUPERVISOR = web.AppKey("supervisor", Supervisor)
ACTIVE = web.AppKey("active", ActiveRequests)
KV_CACHE = web.AppKey("kv_cache", KvCache)
CONFIG = web.AppKey("config", RouterConfig)
METRICS = web.AppKey("metrics", RouterMetrics)

# Exempt from the API key, as upstream exempts /health and /v1/health (server-http.cpp);
# the probes too, since kubelets and load balancers send no credentials.
# The web UI's static files are public too (upstream exempts its UI assets); the UI's own
# API calls send the key.
# The llama.cpp UI's files are added to these when it is built (build_app).
_PUBLIC_PATHS = frozenset({"/health", "/v1/health", "/livez", "/readyz", "/", "/sw.js", *webui.PUBLIC_PATHS})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Discover = Callable[[], dict[str, ModelSpec]]


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


def build_app(
    config: RouterConfig,
    discover: Discover,
    child_args: ChildArgs,
    launcher: Launcher | None = None,
) -> web.Application:
    active = ActiveRequests()

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

    async def add_cors(request: web.Request, response: web.StreamResponse) -> None:
        response.headers.update(cors_headers(config.cors, request.method, request.headers.get("Origin")))

    app = web.Application(middlewares=[errors], client_max_size=config.limits.max_body_bytes)
    app.on_response_prepare.append(add_cors)
    app[CONFIG] = config
    app[ACTIVE] = active
    history = History(config.limits.history_span, config.limits.history_step)
    metrics = app[METRICS] = RouterMetrics(config.timeouts.metrics_scrape, history)
    api = Api(config, child_args, metrics)
    api.add_routes(app)  # the router freezes before startup, so routes go in now
    # `/` is llama.cpp's UI when built, else the dashboard; the dashboard is at /dashboard/.
    # Router mode with its UI on: `/` is llama.cpp's UI when built, else the dashboard; the
    # dashboard is also at /dashboard/. In -m/-hf mode `/` is the child's own UI, with
    # --path it is that directory, and --no-ui or --api-prefix serve no UI (as llama-server).
    public = _PUBLIC_PATHS
    if (
        config.single_model is None and config.webui and not config.api_prefix
        and config.static_path is None
    ):
        ui = _llama_ui(config)
        webui.add_routes(app, at_root=ui is None)
        llamaui.add_routes(app, ui)  # last: its `/{path}` must not shadow any other route
        if ui is not None:
            public = _PUBLIC_PATHS | ui.public_paths

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        # Settings that can fail come first, so a bad one leaves nothing to undo; after that
        # every resource is released in reverse order whatever fails.
        memory = None
        if config.memory_budget is not None:
            memory = MemoryManager.from_setting(
                config.memory_budget, config.limits.memory_margin,
                config.timeouts.memory_recovery, config.timeouts.memory_poll,
                probe_timeout=config.timeouts.device_probe, start_timeout=config.timeouts.device_start,
            )
        state_dir = StateDir(config.state_dir) if config.state_dir is not None else None
        if state_dir is not None:
            state_dir.acquire()
        try:
            # Health probes and metrics scrapes: idle connections are dropped before
            # llama-server's 5 s keep-alive closes them, so a probe never meets a closing one.
            connector = aiohttp.TCPConnector(
                limit=0, keepalive_timeout=config.timeouts.proxy_idle, enable_cleanup_closed=False
            )
            # No cookie jar: children set no cookies, and the jar costs time on every request.
            session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
            )
            try:
                sup: Supervisor

                # Keep-cache: which models want it, their save directory made before a
                # spawn, and the store handed to each model when it starts.
                def wants(name: str) -> bool:
                    proc = sup.find(name)
                    return proc is not None and keeps_cache(config, proc.spec)

                def fingerprint(name: str) -> str | None:
                    proc = sup.find(name)
                    if proc is None:
                        return None
                    return kv_fingerprint(child_args.merged(proc.spec), proc.spec.model_path)

                kv = app[KV_CACHE] = KvCache(config, session, wants, fingerprint)
                metrics.add_kv_cache(kv)

                def build_argv(spec: ModelSpec, port: int) -> list[str]:
                    if port:
                        kv.ensure_dir(spec.name)
                    return child_args.argv(spec, port)

                proxy = Proxy(config)

                def on_state(proc: ModelProcess, old: State, new: State) -> None:
                    metrics.on_state(proc, old, new)
                    if new == State.STOPPING:
                        # llama-server exits only once its open connections are closed:
                        # requests still running on a model being stopped (an unload) end
                        # now with an error, instead of going silent until the SIGKILL.
                        proxy.cut(proc, f"the model was stopped ({proc.stop_reason or 'stop'})")

                sup = Supervisor(
                    config, discover, launcher or OsLauncher(config.limits.child_nice), HttpProbe(session),
                    build_argv, state_dir, observer=on_state,
                    options_for=child_args.merged, memory=memory, kv_cache=kv, watch=metrics,
                )
                app[SUPERVISOR] = sup
                api.bind(sup, proxy, session)
                api.kv_cache = kv
                downloads = api.downloads = Downloads(
                    config, OsLauncher(config.limits.child_nice), sup.events.publish, sup.reload,
                    lambda name: sup.find(name) is not None,
                )
                watcher: Watcher | None = None
                tools = ToolServer(config, OsLauncher(config.limits.child_nice), session)
                try:
                    if tools.enabled and config.single_model is None:
                        try:
                            await tools.start()
                        except (RuntimeError, OSError, TimeoutError) as exc:
                            raise LlamaRouterError(f"tools setup failed: {exc}") from None
                        api.tools = tools
                    await sup.start()
                    if config.watch and config.single_model is None:
                        watcher = Watcher(
                            config.models_dir, config.models_preset, sup.reload,
                            config.timeouts.watch_debounce, config.timeouts.watch_poll,
                        )
                        watcher.start()
                        # Serve only once the watcher has its first snapshot: a change made
                        # between then and now would be in that snapshot and never applied.
                        try:
                            await asyncio.wait_for(watcher.watching.wait(), config.timeouts.watch_poll)
                        except TimeoutError:
                            log.warning("the model watcher took over %gs to start", config.timeouts.watch_poll)
                    yield
                finally:
                    if watcher is not None:
                        await watcher.stop(config.timeouts.watch_poll)
                    await downloads.close()  # before the children: a cancelled one cleans up
                    await tools.close()
                    await sup.shutdown()
            finally:
                await session.close()
        finally:
            if state_dir is not None:
                state_dir.release()

    app.cleanup_ctx.append(lifecycle)
    return app


def kv_fingerprint(options: dict[str, str], model_path: str | None) -> str:
    """How a child is started, plus the identity of its model file: a saved KV cache is only
    valid in a child that matches it."""
    parts: list[object] = [*sorted(options.items())]
    if model_path:
        try:
            st = os.stat(model_path)
            parts.append((st.st_size, st.st_mtime_ns))
        except OSError:
            parts.append("missing")
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
