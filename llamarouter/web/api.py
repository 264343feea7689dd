"""HTTP handlers: the route table, the router's own endpoints and the routing of proxied
ones. The model endpoints are in api_models.py, the model listing in listing.py and the
Vertex AI predict route in vertex.py.

Paths, JSON shapes, messages and status codes follow llama-server's router
(tools/server/server-models.cpp, `server_models_routes`), so clients cannot tell us apart;
where upstream answers a broken child with plain text we answer with the JSON error shape.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web

from ..core.childclient import ChildClient
from ..core.downloads import Downloads
from ..core.process import ModelProcess
from ..core.reqhealth import status_fault
from ..core.runtime import Runtime
from ..core.states import State
from ..core.supervisor import Supervisor
from ..core.toolserver import ui_mcp_proxy
from ..errors import (
    ChildBroke,
    ChildUnreachable,
    InvalidRequest,
    LlamaRouterError,
    ModelNotFound,
    NotFound,
    Unavailable,
    UpstreamError,
)
from ..settings.config import RouterConfig
from . import api_models, streams, vertex
from . import tools as tools_relay
from .bodies import error_body as error_body  # re-exported: app.py imports it from here
from .bodies import is_true, json_response, model_from_body, query_model, read_body
from .listing import ModelListing
from .mediatypes import media_type
from .metrics import CONTENT_TYPE, RequestTiming, RouterMetrics
from .paths import DISABLED_FEATURES, PROXIED_GET, PROXIED_POST, ROUTER_METRICS_PATH, ROUTER_MODELS_PATH
from .proxy import Proxy

if TYPE_CHECKING:
    pass

log = logging.getLogger("llamarouter.api")

_R = TypeVar("_R", bound=web.StreamResponse)

class _Prefixed:
    """Route registration under a path prefix (llama-server's --api-prefix)."""

    def __init__(self, router: web.UrlDispatcher, prefix: str) -> None:
        self._router = router
        self._prefix = prefix

    def add_route(self, method: str, path: str, handler: Any) -> None:
        self._router.add_route(method, self._prefix + path, handler)

    def add_get(self, path: str, handler: Any) -> None:
        # allow_head as aiohttp's add_get does by default.
        self._router.add_get(self._prefix + path, handler)

    def add_post(self, path: str, handler: Any) -> None:
        self.add_route("POST", path, handler)

    def add_delete(self, path: str, handler: Any) -> None:
        self.add_route("DELETE", path, handler)


# llama-server's answer to every request before its model is loaded (server-http.cpp).
_LOADING = {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}

# What /readyz?model= says about a model that is not loaded.
_NOT_READY = {
    State.STOPPED: "model is not loaded",
    State.STARTING: "model is loading",
    State.STOPPING: "model is unloading",
    State.BACKOFF: "model is restarting after a crash",
    State.FAILED: "model failed to load",
    State.SHUTDOWN: "server is shutting down",
}


class Api:
    """Handlers are registered before startup; they read the core off the runtime, which
    has started before the first request comes (server.py)."""

    def __init__(self, config: RouterConfig, runtime: Runtime, proxy: Proxy, metrics: RouterMetrics) -> None:
        self.config = config
        self.runtime = runtime
        self.child_args = runtime.child_args
        self.proxy = proxy
        self.metrics = metrics
        self.listing = ModelListing(config, runtime.child_args)
        self.conversations = streams.Conversations(config.limits.stream_conversations)
        self._detached_tasks: set[asyncio.Task[web.StreamResponse]] = set()

    @property
    def sup(self) -> Supervisor:
        return self.runtime.supervisor

    @property
    def children(self) -> ChildClient:
        return self.runtime.children

    @property
    def downloads(self) -> Downloads | None:
        return self.runtime.downloads

    @property
    def _started(self) -> Supervisor | None:
        """The supervisor once the runtime runs (a probe may come before)."""
        return self.runtime.supervisor if self.runtime.started else None

    def add_routes(self, app: web.Application) -> None:
        # --api-prefix: every route is served under it, as llama-server serves its own.
        r = _Prefixed(app.router, self.config.api_prefix)
        # The router's own endpoints, on paths llama-server does not use (both modes).
        r.add_get("/livez", self.livez)
        r.add_get("/readyz", self.readyz)
        r.add_post("/models/load", self._with(api_models.load))
        r.add_post("/models/unload", self._with(api_models.unload))
        r.add_post("/models/pin", self._with(api_models.pin))
        r.add_get("/models/sse", self._with(api_models.sse))
        r.add_get("/models/logs", self._with(api_models.logs))
        r.add_get("/memory", self._with(api_models.memory))
        r.add_get("/openapi.json", self.openapi)
        r.add_get(ROUTER_METRICS_PATH, self.router_metrics)
        r.add_get(ROUTER_MODELS_PATH, self.list_models)
        if self.config.gcp_predict_route is not None:
            r.add_post(self.config.gcp_predict_route, self._with(vertex.predict))
        if self.config.gcp_health_route is not None:
            health = self.single_health if self.config.single_model is not None else self.health
            r.add_get(self.config.gcp_health_route, health)
        if self.config.single_model is not None:
            # -m/-hf: the one child answers every other path, as a llama-server would.
            r.add_get("/health", self.single_health)
            r.add_get("/v1/health", self.single_health)
            r.add_route("*", "/{tail:.*}", self.single_proxy)
            return
        r.add_get("/health", self.health)
        r.add_get("/v1/health", self.health)
        r.add_get("/metrics", self.metrics_endpoint)
        r.add_get("/models", self.list_models)
        r.add_get("/v1/models", self.list_models)
        r.add_get("/props", self.props)
        r.add_post("/models", self._with(api_models.download))
        r.add_delete("/models", self._with(api_models.delete))
        # Resumable streams: X-Conversation-Id of a routed POST -> its model (streams.py).
        r.add_post("/v1/streams/lookup", self.streams_lookup)
        r.add_get("/v1/stream", self.stream_get)
        r.add_delete("/v1/stream", self.stream_delete)
        r.add_get("/dashboard/history", self.history)
        for path in PROXIED_POST:
            r.add_post(path, self.proxy_post)
        for path in PROXIED_GET:
            r.add_get(path, self.proxy_get)
        for path in DISABLED_FEATURES:
            r.add_get(path, self.feature_disabled)
            r.add_post(path, self.feature_disabled)
        if self.config.webui and self.config.static_path is not None:
            # --path: that directory at /, instead of the built-in UI (registered last, so
            # the API's own paths win).
            r.add_get("/{tail:.*}", self.static_file)

    def _with(self, handler: Callable[[Api, web.Request], Awaitable[_R]]) -> Callable[[web.Request], Awaitable[_R]]:
        """A handler of another module (api_models.py, vertex.py), given this Api."""
        return functools.partial(handler, self)

    # ----------------------------------------------------------------- single-model mode
    async def single_health(self, request: web.Request) -> web.StreamResponse:
        """The child's own /health once it is ready; while it loads (or restarts) the
        answer llama-server gives before its model is loaded."""
        single = self.config.single_model
        assert single is not None
        sup = self._started
        proc = sup.find(single.name) if sup is not None else None
        if proc is None or proc.state != State.READY:
            return json_response(_LOADING, 503)
        if request.path.removeprefix(self.config.api_prefix) not in ("/health", "/v1/health"):
            # AIP_HEALTH_ROUTE: a path the child does not know; a ready child says ok.
            return json_response({"status": "ok"})
        return await self._route(self._for_child(request), single.name, None)

    async def single_proxy(self, request: web.Request) -> web.StreamResponse:
        """Any path, any method, any `model` value (or none): the one model's child."""
        single = self.config.single_model
        assert single is not None
        request = self._for_child(request)  # before the body is read: a clone cannot be made after
        body = await read_body(request, self.config.limits.max_body_bytes) if request.can_read_body else None
        return await self._route(request, single.name, body)

    async def static_file(self, request: web.Request) -> web.StreamResponse:
        root = self.config.static_path
        assert root is not None
        base = root.resolve()
        target = (base / request.match_info["tail"]).resolve()
        if target.is_dir():
            target = target / "index.html"
        # Nothing outside the directory, whatever the path says (.., symlinks).
        if not target.is_relative_to(base) or not target.is_file():
            raise web.HTTPNotFound()
        # The type llama-server gives the file, not aiohttp's guess from the host's MIME files.
        return web.FileResponse(target, headers={"Content-Type": media_type(target.name)})

    async def feature_disabled(self, request: web.Request) -> web.StreamResponse:
        # With --tools, MCP servers or --ui-mcp-proxy the tools server answers (it says 403
        # itself for what it was not given); otherwise what llama-server answers without them.
        tools = self.runtime.tools
        if tools is not None:
            return await tools_relay.relay(self._for_child(request), tools, self.children, self.config.timeouts.proxy)
        return json_response({"error": {"message": "this feature is disabled", "type": "feature_disabled"}}, 403)

    async def router_metrics(self, request: web.Request) -> web.StreamResponse:
        data = await self.metrics.render(self.sup, self.children)
        return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE})

    # ----------------------------------------------------------------- own endpoints
    async def health(self, request: web.Request) -> web.Response:
        return json_response({"status": "ok"})

    async def livez(self, request: web.Request) -> web.Response:
        # Answering at all is the proof: this handler runs on the event loop.
        return json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        sup = self._started
        if sup is None or not sup.started:
            return json_response({"status": "unavailable", "reason": "server is starting"}, 503)
        if sup.closing:
            return json_response({"status": "unavailable", "reason": "server is shutting down"}, 503)
        name = query_model(request)
        if not name:
            return json_response({"status": "ok"})
        try:
            proc = sup.resolve(name)
        except ModelNotFound as exc:
            return json_response({"status": "error", "reason": exc.message}, 400)
        body: dict[str, Any] = {"model": proc.name, "state": str(proc.state)}
        if proc.state == State.READY:
            return json_response({"status": "ok", **body})
        reason = _NOT_READY.get(proc.state, str(proc.state))
        if proc.state == State.FAILED and proc.failure:
            reason = f"{reason}: {proc.failure}"
        return json_response({"status": "unavailable", "reason": reason, **body}, 503)

    async def metrics_endpoint(self, request: web.Request) -> web.StreamResponse:
        if query_model(request):
            return await self.proxy_get(request)
        data = await self.metrics.render(self.sup, self.children)
        return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE})

    async def list_models(self, request: web.Request) -> web.Response:
        if request.query.get("reload", ""):
            await self.sup.reload()
        return web.Response(
            body=self.listing.body(self.sup, self.runtime.kv_cache, self.downloads),
            content_type="application/json",
            charset="utf-8",
        )

    def _default_name(self) -> str:
        """The model a request that names none goes to: --default-model, else the model
        whose preset says `default-model = true` (the first by name), else none."""
        if self.config.default_model:
            return self.config.default_model
        sup = self._started
        if sup is None:
            return ""
        return next((p.name for p in sorted(sup.models.values(), key=lambda p: p.name) if p.spec.default), "")

    async def props(self, request: web.Request) -> web.StreamResponse:
        if query_model(request):
            return await self.proxy_get(request)
        if default := self._default_name():
            return await self._route(request, default, None)
        return json_response(
            {
                "role": "router",
                "max_instances": self.config.limits.models_max,
                "models_autoload": self.config.models_autoload,
                "model_alias": "llama-server",
                "model_path": "none",
                "default_generation_settings": {"params": None, "n_ctx": 0},
                "ui_settings": json.loads(self.config.ui_settings),
                "build_info": self.config.build_info,
                "cors_proxy_enabled": ui_mcp_proxy(self.config.child_options),
            }
        )

    def _stream_owner(self, conv_id: str) -> ModelProcess | None:
        name = self.conversations.lookup(conv_id)
        return self.sup.find(name) if name else None

    async def streams_lookup(self, request: web.Request) -> web.Response:
        """Each id the router has seen goes to the child that served it; a body that is
        not JSON is an empty answer, as upstream's router gives."""
        ids = streams.requested_ids(await read_body(request, self.config.limits.max_body_bytes))
        owners: dict[int, list[str]] = {}
        for conv_id in ids or ():
            proc = self._stream_owner(conv_id)
            if proc is not None and proc.state == State.READY and proc.port is not None:
                owners.setdefault(proc.port, []).append(conv_id)
        found = await streams.lookup_children(self.children, owners, self.config.timeouts.stream_lookup) if owners else []
        return json_response(found)

    async def stream_get(self, request: web.Request) -> web.StreamResponse:
        conv_id = request.query.get("conv_id", "")
        if not conv_id:
            raise InvalidRequest("Missing conversation id in path")
        proc = self._stream_owner(conv_id)
        if proc is None or proc.state != State.READY:
            if streams.loading(proc):
                raise Unavailable("Stream owner model is loading, retry later")
            # upstream builds "Stream not found or expired"; its HTTP layer rewrites every 404 body
            raise NotFound("File Not Found")
        request = self._for_child(request)
        lease = await self.sup.acquire(proc, False)
        try:
            return await self.proxy.forward(request, lease.proc, None)
        finally:
            lease.release()

    async def stream_delete(self, request: web.Request) -> web.Response:
        conv_id = request.query.get("conv_id", "")
        if not conv_id:
            raise InvalidRequest("Missing conversation id in path")
        proc = self._stream_owner(conv_id)
        if proc is not None and proc.state == State.READY and proc.port is not None:
            await streams.delete_on_child(self.children, proc.port, conv_id, self.config.timeouts.stream_lookup)
        self.conversations.forget(conv_id)  # a request parked in a load wait is cancelled
        return web.Response(status=204)

    async def history(self, request: web.Request) -> web.Response:
        """The dashboard's timeline: the last minutes of requests, memory and load events."""
        return json_response(self.metrics.history_snapshot(self.sup))

    async def openapi(self, request: web.Request) -> web.Response:
        """docs/openapi.yaml (shipped as llamarouter/web/openapi.yaml) as JSON."""
        return json_response(openapi_spec())

    # ----------------------------------------------------------------- proxied endpoints
    def autoload(self, request: web.Request) -> bool:
        value = request.query.get("autoload")
        if value is None or value == "":
            return self.config.models_autoload
        return is_true(value)

    async def proxy_post(self, request: web.Request) -> web.StreamResponse:
        request = self._for_child(request)  # before the body is read: a clone cannot be made after
        body = await read_body(request, self.config.limits.max_body_bytes)
        name = model_from_body(request, body) or self._default_name()
        # Resumable streams: remembered before the load wait, so that a stop during the
        # load (DELETE /v1/stream) cancels this request, as upstream.
        conv = request.headers.get(streams.HEADER, "")
        ticket = self.conversations.remember(conv, name)
        if ticket and not self._ready(name):
            # It waits for a load: a client that goes away meanwhile (a page reload) must
            # not take the request with it, or the child never starts the stream the client
            # will come back to resume (upstream detaches it the same way).
            return await self._detached(self._route(request, name, body, (conv, ticket)))
        return await self._route(request, name, body, (conv, ticket))

    def _ready(self, name: str) -> bool:
        proc = self.sup.find(name)
        return proc is not None and proc.state == State.READY

    async def _detached(self, work: Coroutine[Any, Any, web.StreamResponse]) -> web.StreamResponse:
        task = asyncio.create_task(work, name="stream request waiting for its model")
        self._detached_tasks.add(task)
        task.add_done_callback(self._detached_done)
        return await asyncio.shield(task)

    def _detached_done(self, task: asyncio.Task[web.StreamResponse]) -> None:
        self._detached_tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Its client, if still there, got it through the shield; if gone, this is where it ends.
            log.debug("stream request ended: %r", exc)

    async def proxy_get(self, request: web.Request) -> web.StreamResponse:
        return await self._route(self._for_child(request), query_model(request) or self._default_name(), None)

    def _for_child(self, request: web.Request) -> web.Request:
        """The request as the child sees it: without --api-prefix, which children do not
        get (the router probes their /health)."""
        prefix = self.config.api_prefix
        if not prefix:
            return request
        return request.clone(rel_url=request.rel_url.with_path(request.path.removeprefix(prefix) or "/"))

    async def _route(
        self, request: web.Request, name: str, body: bytes | None, conv: tuple[str, int] = ("", 0)
    ) -> web.StreamResponse:
        # Counted per route pattern, not per raw path, so /slots/{id} stays one series.
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else request.path
        return await self.serve(
            name, self.autoload(request), request.method == "POST", endpoint,
            lambda proc, timing: self.proxy.forward(request, proc, body, timing), conv,
        )

    async def serve(
        self,
        name: str,
        autoload: bool,
        post: bool,
        endpoint: str,
        send: Callable[[ModelProcess, RequestTiming], Awaitable[_R]],
        conv: tuple[str, int] = ("", 0),
    ) -> _R:
        """A request for model `name`, sent to its child by `send`: the model is acquired
        (loaded if need be), the request sent once more if the child died under it before
        answering, and the outcome counted under `endpoint`."""
        if not name:
            raise InvalidRequest("model name is missing from the request")
        proc = self.sup.resolve(name)
        timing = RequestTiming()
        code = 500
        if post:
            self.sup.touch(proc)
        try:
            retried = False
            while True:
                lease = await self.sup.acquire(proc, autoload)
                if conv[1] and not self.conversations.alive(*conv):
                    lease.release()
                    raise InvalidRequest("request cancelled by a stop while the model was loading")
                # The grant may be on a newer process of the same name (a reload replaced
                # the definition while the request waited): serve from the one granted.
                proc = lease.proc
                port = proc.port
                try:
                    if self.config.fake_timing:
                        await asyncio.sleep(self.config.fake_timing_secs)
                    resp = await send(proc, timing)
                    code = resp.status
                    # Health from live traffic (reqhealth.py): the child's answer counts.
                    proc.note_request(port, status_fault(code))
                    return resp
                except UpstreamError as exc:
                    if isinstance(exc, ChildUnreachable | ChildBroke):
                        proc.note_request(port, exc.message)
                    # Nothing reached our client yet. Typically the child died and its exit
                    # is not processed yet (a request right after a crash, on a dead pooled
                    # connection). Send it once more when the child that may have seen it
                    # is gone, or when it never reached the child at all.
                    if retried:
                        raise
                    retried, failed = True, exc
                finally:
                    lease.release()
                if proc.stop_reason is not None and not proc.crashed:
                    # Stopped on purpose (an unload) while it ran: a replay would only load
                    # the model again.
                    raise failed
                await proc.wait_changed_from(port, self.config.timeouts.health_timeout)
                gone = proc.state != State.READY or proc.port != port
                if not (gone or isinstance(failed, ChildUnreachable)):
                    raise failed
                proc = self.sup.resolve(proc.name)  # a reload may have replaced it meanwhile
        except LlamaRouterError as exc:
            code = exc.status
            raise
        except (asyncio.CancelledError, ConnectionError):
            code = 499  # the client went away (nginx's code for it)
            raise
        finally:
            self.metrics.observe_request(proc.name, endpoint, code, timing)


@functools.cache
def openapi_spec() -> dict[str, Any]:
    import yaml

    text = (Path(__file__).with_name("openapi.yaml")).read_text(encoding="utf-8")
    return yaml.safe_load(text)  # type: ignore[no-any-return]  # yaml.safe_load returns Any; the file is our own spec
