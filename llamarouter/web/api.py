"""HTTP handlers: the router's own endpoints and the routing of proxied ones.

Paths, JSON shapes, messages and status codes follow llama-server's router
(tools/server/server-models.cpp, `server_models_routes`), so clients cannot tell us apart;
where upstream answers a broken child with plain text we answer with the JSON error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import re
import time
import weakref
from collections.abc import Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from ..core.downloads import Downloads
from ..core.failure import explain_failure
from ..core.process import ModelProcess
from ..core.reqhealth import status_fault
from ..core.sleep import sleeping_from_log
from ..core.states import State
from ..core.supervisor import Supervisor
from ..core.toolserver import ToolServer, ui_mcp_proxy
from ..errors import (
    ChildBroke,
    ChildUnreachable,
    InvalidRequest,
    LlamaRouterError,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    ShuttingDown,
    Unavailable,
    UpstreamError,
)
from ..settings.childargs import ChildArgs
from ..settings.config import RouterConfig
from . import api_models, streams
from . import tools as tools_relay
from .metrics import CONTENT_TYPE, RequestTiming, RouterMetrics
from .proxy import Proxy

if TYPE_CHECKING:
    from ..core.kvcache import KvCache

log = logging.getLogger("llamarouter.api")

# Routes upstream proxies by the body's "model" (server.cpp, router branch).
PROXIED_POST = (
    "/props",
    "/completion",
    "/completions",
    "/v1/completions",
    "/chat/completions",
    "/v1/chat/completions",
    "/v1/chat/completions/control",
    "/responses",
    "/v1/responses",
    "/audio/transcriptions",
    "/v1/audio/transcriptions",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/infill",
    "/embedding",
    "/embeddings",
    "/v1/embeddings",
    "/rerank",
    "/reranking",
    "/v1/rerank",
    "/v1/reranking",
    "/v1/systemone",
    "/tokenize",
    "/detokenize",
    "/apply-template",
    "/v1/responses/input_tokens",
    "/responses/input_tokens",
    "/chat/completions/input_tokens",
    "/v1/chat/completions/input_tokens",
    "/lora-adapters",
    "/slots/{id_slot}",
)
# Routes upstream proxies by ?model= (GET /props and GET /metrics without it are the
# router's own).
PROXIED_GET = ("/slots", "/lora-adapters")

# The router's own model list and metrics, also reachable in -m/-hf mode, where /models
# and /metrics are the child's.
ROUTER_MODELS_PATH = "/llamarouter/models"
ROUTER_METRICS_PATH = "/llamarouter/metrics"

# Features llama-server answers with 403 unless started with them (server.cpp): the MCP
# CORS proxy of its web UI and the built-in agent tools.
DISABLED_FEATURES = ("/cors-proxy", "/tools")

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


def _gcp_format(path: str) -> str:
    """llama-server's camelCase `@requestFormat` alias of a route: "/v1/chat/completions"
    -> "chatCompletions", "/apply-template" -> "applyTemplate"."""
    text = path.removeprefix("/v1").removeprefix("/")
    words = re.split(r"[/_-]", text)
    return words[0] + "".join(w[:1].upper() + w[1:] for w in words[1:])


# Alias -> route. Where two routes share an alias (/completions, /v1/completions), the
# OpenAI-style /v1 one is taken, so the choice is stable.
_PREDICT_FORMATS = {
    _gcp_format(p): p for p in sorted(PROXIED_POST, key=lambda p: p.startswith("/v1/")) if "{" not in p
}

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

_MULTIPART_MODEL = re.compile(
    rb'content-disposition:[^\r\n]*\bname="model"[^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n(.*?)\r\n--',
    re.IGNORECASE | re.DOTALL,
)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(data, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        charset="utf-8",
    )


def _is_true(value: str) -> bool:
    return value in ("true", "1")


class Api:
    """Handlers are registered before startup; `bind` hands them the live supervisor."""

    sup: Supervisor
    proxy: Proxy
    session: aiohttp.ClientSession
    kv_cache: KvCache | None = None
    downloads: Downloads | None = None
    tools: ToolServer | None = None

    def __init__(self, config: RouterConfig, child_args: ChildArgs, metrics: RouterMetrics) -> None:
        self.config = config
        self.child_args = child_args
        self.metrics = metrics
        self._item_cache: weakref.WeakKeyDictionary[
            ModelProcess, tuple[tuple[object, ...], tuple[bytes, bytes]]
        ] = weakref.WeakKeyDictionary()
        self.conversations = streams.Conversations(config.limits.stream_conversations)
        self._detached_tasks: set[asyncio.Task[web.StreamResponse]] = set()

    def bind(self, supervisor: Supervisor, proxy: Proxy, session: aiohttp.ClientSession) -> None:
        self.sup = supervisor
        self.proxy = proxy
        self.session = session

    def add_routes(self, app: web.Application) -> None:
        # --api-prefix: every route is served under it, as llama-server serves its own.
        r = _Prefixed(app.router, self.config.api_prefix)
        # The router's own endpoints, on paths llama-server does not use (both modes).
        r.add_get("/livez", self.livez)
        r.add_get("/readyz", self.readyz)
        r.add_post("/models/load", self.load)
        r.add_post("/models/unload", self.unload)
        r.add_post("/models/pin", self.pin)
        r.add_get("/models/sse", self.sse)
        r.add_get("/models/logs", self.logs)
        r.add_get("/memory", self.memory)
        r.add_get("/openapi.json", self.openapi)
        r.add_get(ROUTER_METRICS_PATH, self.router_metrics)
        r.add_get(ROUTER_MODELS_PATH, self.list_models)
        if self.config.gcp_predict_route is not None:
            r.add_post(self.config.gcp_predict_route, self.predict)
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
        r.add_post("/models", self.download)
        r.add_delete("/models", self.delete)
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

    # ----------------------------------------------------------------- single-model mode
    async def single_health(self, request: web.Request) -> web.StreamResponse:
        """The child's own /health once it is ready; while it loads (or restarts) the
        answer llama-server gives before its model is loaded."""
        single = self.config.single_model
        assert single is not None
        proc = self.sup.find(single.name) if getattr(self, "sup", None) is not None else None
        if proc is None or proc.state != State.READY:
            return _json(_LOADING, 503)
        if request.path.removeprefix(self.config.api_prefix) not in ("/health", "/v1/health"):
            # AIP_HEALTH_ROUTE: a path the child does not know; a ready child says ok.
            return _json({"status": "ok"})
        return await self._route(self._for_child(request), single.name, None)

    async def single_proxy(self, request: web.Request) -> web.StreamResponse:
        """Any path, any method, any `model` value (or none): the one model's child."""
        single = self.config.single_model
        assert single is not None
        request = self._for_child(request)  # before the body is read: a clone cannot be made after
        body = await _read_body(request, self.config.limits.max_body_bytes) if request.can_read_body else None
        return await self._route(request, single.name, body)

    async def predict(self, request: web.Request) -> web.Response:
        """Vertex AI's predict protocol (AIP_MODE=PREDICTION), as llama-server serves it:
        each instance names an endpoint in `@requestFormat` and is answered by it, the
        answers are collected in order (server-http.cpp, register_gcp_compat)."""
        raw = await _read_body(request, self.config.limits.max_body_bytes)
        try:
            data = parse_json(raw)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        if not isinstance(data, dict):
            raise InvalidRequest("request body must be a JSON object")
        instances = data.get("instances")
        if not isinstance(instances, list):
            raise InvalidRequest("request body must include an array field named instances")
        limit = self.config.limits.predict_instances
        if len(instances) > limit:
            raise InvalidRequest(f"instances array exceeds maximum size of {limit}")
        # Every instance runs to its end (each releases the model it acquired) before an
        # unexpected error of one is raised.
        answers = await asyncio.gather(
            *(self._predict_one(request, instance) for instance in instances), return_exceptions=True
        )
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        return _json({"predictions": answers})

    async def _predict_one(self, request: web.Request, instance: Any) -> Any:
        if not isinstance(instance, dict):
            return error_body(InvalidRequest("each instance must be a JSON object"))
        fmt = instance.get("@requestFormat")
        if not isinstance(fmt, str):
            return error_body(InvalidRequest("each instance must include a string @requestFormat"))
        payload = {k: v for k, v in instance.items() if k != "@requestFormat"}
        if "stream" in payload:
            payload["stream"] = False  # the predict route answers whole responses only
        path = _PREDICT_FORMATS.get(fmt) or (fmt if fmt in PROXIED_POST else None)
        if path is None:
            return error_body(InvalidRequest(f"no handler registered for @requestFormat: {fmt}"))
        single = self.config.single_model
        name = single.name if single is not None else _model_field(payload)
        try:
            if not name:
                raise InvalidRequest("model name is missing from the request")
            lease = await self.sup.acquire(self.sup.resolve(name), self._autoload(request))
            proc = lease.proc
            try:
                url = f"http://127.0.0.1:{proc.port}{path}"
                limit = self.config.timeouts.proxy or None
                timeout = aiohttp.ClientTimeout(total=None, sock_connect=limit, sock_read=limit)
                async with self.session.post(url, json=payload, timeout=timeout) as resp:
                    body = await resp.read()
            finally:
                lease.release()
        except LlamaRouterError as exc:
            return error_body(exc)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return error_body(UpstreamError(f"proxy error: {type(exc).__name__}: {exc}"))
        if not body:
            return None
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return body.decode("utf-8", "replace")

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
        return web.FileResponse(target)

    async def feature_disabled(self, request: web.Request) -> web.StreamResponse:
        # With --tools, MCP servers or --ui-mcp-proxy the tools server answers (it says 403
        # itself for what it was not given); otherwise what llama-server answers without them.
        if self.tools is not None:
            return await tools_relay.relay(self._for_child(request), self.tools, self.session, self.config.timeouts.proxy)
        return _json({"error": {"message": "this feature is disabled", "type": "feature_disabled"}}, 403)

    async def router_metrics(self, request: web.Request) -> web.StreamResponse:
        data = await self.metrics.render(self.sup, self.session)
        return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE})

    # ----------------------------------------------------------------- own endpoints
    async def health(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def livez(self, request: web.Request) -> web.Response:
        # Answering at all is the proof: this handler runs on the event loop.
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        sup = getattr(self, "sup", None)
        if sup is None or not sup.started:
            return _json({"status": "unavailable", "reason": "server is starting"}, 503)
        if sup.closing:
            return _json({"status": "unavailable", "reason": "server is shutting down"}, 503)
        name = _query_model(request)
        if not name:
            return _json({"status": "ok"})
        try:
            proc = sup.resolve(name)
        except ModelNotFound as exc:
            return _json({"status": "error", "reason": exc.message}, 400)
        body: dict[str, Any] = {"model": proc.name, "state": str(proc.state)}
        if proc.state == State.READY:
            return _json({"status": "ok", **body})
        reason = _NOT_READY.get(proc.state, str(proc.state))
        if proc.state == State.FAILED and proc.failure:
            reason = f"{reason}: {proc.failure}"
        return _json({"status": "unavailable", "reason": reason, **body}, 503)

    async def metrics_endpoint(self, request: web.Request) -> web.StreamResponse:
        if _query_model(request):
            return await self.proxy_get(request)
        data = await self.metrics.render(self.sup, self.session)
        return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE})

    async def list_models(self, request: web.Request) -> web.Response:
        if request.query.get("reload", ""):
            await self.sup.reload()
        created = b'"created":%d,' % int(time.time())
        items = []
        for proc in self.sup.visible():
            head, tail = self._item_json(proc)
            items.append(head + created + tail)
        if self.downloads is not None:
            now = int(time.time())
            items += [
                json.dumps(api_models.download_item(d, now), separators=(",", ":")).encode()
                for d in self.downloads.running.values()
            ]
        return web.Response(
            body=b'{"data":[' + b",".join(items) + b'],"object":"list"}',
            content_type="application/json",
            charset="utf-8",
        )

    def _item_json(self, proc: ModelProcess) -> tuple[bytes, bytes]:
        """A model's /models item as JSON, split around `created` (the only field that
        changes every second). Cached until something the item shows changes: a listing of
        1,000 models would otherwise rebuild and re-encode 1,000 items on every call."""
        key = (
            proc.spec, proc.state, proc.api_status, proc.port, proc.in_flight,
            self.sup.queued_for(proc), self.sup.draining(proc), proc.restarts, self.sup.usage(proc.name).last_used_wall,
            proc.crashed, proc.exit_code, proc.failure, proc.stop_reason,
            self.sup.estimate_of(proc), proc.measured_bytes, proc.device_bytes, id(proc.loaded_info),
            self._status_value(proc), self._saved_caches(proc.name), self.sup.pinned(proc),
        )
        cached = self._item_cache.get(proc)
        if cached is not None and cached[0] == key:
            return cached[1]
        text = json.dumps(self.model_item(proc, 0), separators=(",", ":")).encode()
        # Keys before `created` are fixed and strings are escaped, so this is the field.
        head, _, tail = text.partition(b'"created":0,')
        self._item_cache[proc] = (key, (head, tail))
        return head, tail

    def model_item(self, proc: ModelProcess, now: int) -> dict[str, Any]:
        spec = proc.spec
        status: dict[str, Any] = {
            "value": self._status_value(proc),
            # The last command line (upstream keeps it after an unload), or the would-be
            # one with port 0 for a model never started.
            "args": list(proc.argv) if proc.argv else self.child_args.argv(spec, 0),
        }
        status["preset"] = self.child_args.preset_ini(spec)
        if proc.crashed and proc.api_status == "unloaded":
            status["failed"] = True
            status["exit_code"] = proc.exit_code
        # Our additions, in fields upstream does not use (llama.cpp #23257: tell a crash from
        # an unload).
        status["state"] = str(proc.state)
        if proc.failure:
            status["error"] = proc.failure
            # The child's own words for why its last load failed ("No such file", "invalid
            # magic characters"), which the generic exit lines above do not say.
            cause = explain_failure(proc.log_tail(self.config.limits.log_lines))
            if cause is None and proc.sick_exit:
                cause = proc.failure  # its live requests said it, not its output
            if cause is not None:
                status["cause"] = cause
            status["log_tail"] = proc.log_tail(20)
        if proc.stop_reason and proc.api_status == "unloaded":
            status["stop_reason"] = proc.stop_reason
        item: dict[str, Any] = {
            "id": spec.name,
            "aliases": list(spec.aliases),
            "tags": list(spec.tags),
            "object": "model",
            "owned_by": "llamacpp",
            "created": now,
            "status": status,
            "architecture": {
                "input_modalities": list(spec.input_modalities),
                "output_modalities": ["text"],
            },
            "source": spec.source,
            "can_remove": spec.source == "cache",
            "in_flight": proc.in_flight,
            "queued": self.sup.queued_for(proc),
            "draining": self.sup.draining(proc),
            "restarts": proc.restarts,
            "pinned": self.sup.pinned(proc),
        }
        last_used_wall = self.sup.usage(proc.name).last_used_wall
        if last_used_wall:
            item["last_used"] = int(last_used_wall)
        if saved := self._saved_caches(proc.name):
            item["saved_caches"] = [dict(zip(("slot", "tokens", "bytes"), s, strict=True)) for s in saved]
        est = self.sup.estimate_of(proc)
        if est is not None:
            item["estimated_bytes"] = est.total
            item["estimate"] = est.as_dict()
        if proc.measured_bytes is not None and proc.api_status != "unloaded":
            item["measured_bytes"] = proc.measured_bytes
        if proc.device_bytes is not None and proc.api_status != "unloaded":
            item["device_bytes"] = proc.device_bytes
        if proc.api_status != "unloaded":
            for key, value in proc.loaded_info.items():
                item.setdefault(key, value)
        return item

    def _status_value(self, proc: ModelProcess) -> str:
        """Upstream's status word; "sleeping" while a loaded child sleeps (its own
        --sleep-idle-seconds), as upstream's router shows it."""
        value = proc.api_status
        if value == "loaded" and proc.state == State.READY and sleeping_from_log(proc.logs):
            return "sleeping"
        return value

    def _saved_caches(self, name: str) -> tuple[tuple[int, int, int], ...]:
        kv = self.kv_cache
        if kv is None:
            return ()
        return tuple((s.slot, s.tokens, s.bytes) for s in kv.saved(name))

    def _default_name(self) -> str:
        """The model a request that names none goes to: --default-model, else the model
        whose preset says `default-model = true` (the first by name), else none."""
        if self.config.default_model:
            return self.config.default_model
        sup = getattr(self, "sup", None)
        if sup is None:
            return ""
        return next((p.name for p in sorted(sup.models.values(), key=lambda p: p.name) if p.spec.default), "")

    async def props(self, request: web.Request) -> web.StreamResponse:
        if _query_model(request):
            return await self.proxy_get(request)
        if default := self._default_name():
            return await self._route(request, default, None)
        return _json(
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

    async def load(self, request: web.Request) -> web.Response:
        name = _model_field(await _json_body(request, self.config.limits.max_body_bytes, allow_empty=False))
        await self.sup.load(name)
        return _json({"success": True})

    async def unload(self, request: web.Request) -> web.Response:
        name = _model_field(await _json_body(request, self.config.limits.max_body_bytes, allow_empty=False))
        if name == "*":
            return self._unload_all()
        if self.downloads is not None and await self.downloads.cancel(name, "unloaded"):
            return _json({"success": True})  # upstream: unloading a download cancels it
        self.sup.unload(name)
        return _json({"success": True})

    def _unload_all(self) -> web.Response:
        """`{"model": "*"}`: unload every running model that is not pinned; the answer
        names them (an empty list when none ran)."""
        return _json({"success": True, "models": self.sup.unload_all()})

    async def pin(self, request: web.Request) -> web.Response:
        """llamarouter's own: {"model": NAME, "pin": true|false} keeps a model loaded or
        lets it go; the answer is {"success": true, "pinned": BOOL}."""
        body = await _json_body(request, self.config.limits.max_body_bytes)
        name = _model_field(body)
        on = body.get("pin", True) if isinstance(body, dict) else True
        if not isinstance(on, bool):
            raise InvalidRequest("pin must be true or false")
        proc = self.sup.pin(name, on)
        return _json({"success": True, "pinned": self.sup.pinned(proc)})

    async def memory(self, request: web.Request) -> web.Response:
        """Budget, use and free memory, and each model's estimate / measurement."""
        memory = self.sup.memory
        procs = list(self.sup.models.values())
        models = {}
        for proc in procs:
            entry: dict[str, Any] = {"status": proc.api_status}
            if memory is not None and proc.spec.model_path and memory.estimate_of(proc) is None:
                await memory.estimate_for(proc, self.child_args.merged(proc.spec))
            est = self.sup.estimate_of(proc)
            if est is not None:
                entry["estimated_bytes"] = est.total
                entry["estimate"] = est.as_dict()
            rss = self.sup.rss_of(proc)
            if rss is not None:
                entry["rss_bytes"] = rss
            if proc.measured_bytes is not None:
                entry["measured_bytes"] = proc.measured_bytes
                entry["measured"] = {f"{dev}:{kind}": n for (dev, kind), n in proc.measured.items()}
            if proc.device_bytes is not None:
                entry["device_bytes"] = proc.device_bytes
            if memory is not None and proc.holds_slot:
                entry["counted_bytes"] = memory.held(proc)
            models[proc.name] = entry
        body: dict[str, Any] = {"budget": None, "models": models}
        if memory is not None:
            body.update(memory.report(procs))
        return _json(body)

    def _stream_owner(self, conv_id: str) -> ModelProcess | None:
        name = self.conversations.lookup(conv_id)
        return self.sup.find(name) if name else None

    async def streams_lookup(self, request: web.Request) -> web.Response:
        """Each id the router has seen goes to the child that served it; a body that is
        not JSON is an empty answer, as upstream's router gives."""
        ids = streams.requested_ids(await _read_body(request, self.config.limits.max_body_bytes))
        owners: dict[int, list[str]] = {}
        for conv_id in ids or ():
            proc = self._stream_owner(conv_id)
            if proc is not None and proc.state == State.READY and proc.port is not None:
                owners.setdefault(proc.port, []).append(conv_id)
        found = await streams.lookup_children(self.session, owners, self.config.timeouts.stream_lookup) if owners else []
        return _json(found)

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
            await streams.delete_on_child(self.session, proc.port, conv_id, self.config.timeouts.stream_lookup)
        self.conversations.forget(conv_id)  # a request parked in a load wait is cancelled
        return web.Response(status=204)

    async def history(self, request: web.Request) -> web.Response:
        """The dashboard's timeline: the last minutes of requests, memory and load events."""
        return _json(self.metrics.history_snapshot(self.sup))

    async def openapi(self, request: web.Request) -> web.Response:
        """docs/openapi.yaml (shipped as llamarouter/web/openapi.yaml) as JSON."""
        return _json(openapi_spec())

    async def download(self, request: web.Request) -> web.Response:
        body = await _json_body(request, self.config.limits.max_body_bytes, allow_empty=False)
        return _json(await api_models.download(self.downloads, body))

    async def delete(self, request: web.Request) -> web.Response:
        return _json(await api_models.delete(self.sup, self.downloads, request.query.get("model", "")))

    async def sse(self, request: web.Request) -> web.StreamResponse:
        if self.sup.closing:
            # Not a 200 that ends at once: an EventSource would reconnect to it every few
            # seconds for as long as in-flight requests keep the router up.
            raise ShuttingDown("server is shutting down")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        # Subscribed before the headers go out: a client that has them misses no event.
        async with self.sup.events.subscribe() as queue:
            await resp.prepare(request)
            while True:
                line = await queue.get()
                if line is None:
                    break
                await resp.write(line)
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp

    async def logs(self, request: web.Request) -> web.StreamResponse:
        name = _query_model(request)
        if not name:
            raise InvalidRequest("model name is missing from the request")
        proc = self.sup.resolve(name)
        try:
            lines = int(request.query.get("lines", "200"))
        except ValueError:
            raise InvalidRequest("lines must be an integer") from None
        tail = proc.log_tail(lines)
        if not _is_true(request.query.get("follow", "")):
            return web.Response(text="".join(line + "\n" for line in tail), content_type="text/plain")
        if self.sup.closing:
            raise ShuttingDown("server is shutting down")  # nothing more to follow
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8", "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        queue = proc.logs.follow()
        try:
            if tail:
                await resp.write("".join(line + "\n" for line in tail).encode())
            while (line := await queue.get()) is not None:
                await resp.write(line.encode() + b"\n")
        finally:
            proc.logs.unfollow(queue)
        return resp

    # ----------------------------------------------------------------- proxied endpoints
    def _autoload(self, request: web.Request) -> bool:
        value = request.query.get("autoload")
        if value is None or value == "":
            return self.config.models_autoload
        return _is_true(value)

    async def proxy_post(self, request: web.Request) -> web.StreamResponse:
        request = self._for_child(request)  # before the body is read: a clone cannot be made after
        body = await _read_body(request, self.config.limits.max_body_bytes)
        name = _model_from_body(request, body) or self._default_name()
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
        return await self._route(self._for_child(request), _query_model(request) or self._default_name(), None)

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
        if not name:
            raise InvalidRequest("model name is missing from the request")
        proc = self.sup.resolve(name)
        autoload = self._autoload(request)
        timing = RequestTiming()
        code = 500
        if request.method == "POST":
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
                    resp = await self.proxy.forward(request, proc, body, timing)
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
            # Counted per route pattern, not per raw path, so /slots/{id} stays one series.
            resource = request.match_info.route.resource
            endpoint = resource.canonical if resource is not None else request.path
            self.metrics.observe_request(proc.name, endpoint, code, timing)


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    # The app's client_max_size is the same limit, so a chunked body that grows past it
    # fails inside read() with 413 as well.
    return await request.read()


async def _json_body(request: web.Request, limit: int, allow_empty: bool = True) -> Any:
    """The body as JSON; an empty one is {}, or with `allow_empty` off invalid JSON (as
    llama-server's /models/load and /models/unload answer it)."""
    # Same limit and 413 as proxied POSTs (a Content-Length over it is refused unread).
    raw = await _read_body(request, limit)
    if not raw and allow_empty:
        return {}
    try:
        return parse_json(raw)
    except ValueError as exc:
        raise InvalidRequest(f"invalid JSON in request body: {exc}") from None


def parse_json(raw: bytes) -> Any:
    """JSON as llama-server's parser (nlohmann) reads it: NaN and Infinity, numbers too
    large for a double and unpaired surrogates are errors (Python's json takes them, so a
    request llama-server would refuse could load a model first). Raises ValueError."""
    if not raw:
        raise ValueError("empty input")
    try:
        data = _STRICT.decode(raw.decode("utf-8-sig"))  # nlohmann skips a BOM too
    except UnicodeDecodeError as exc:
        raise ValueError(str(exc)) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if _SURROGATE_ESCAPE.search(raw):  # one may be unpaired: look at every string
        _check_strings(data)
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number overflow: {text[:40]}")
    return value


def _bounded_int(text: str) -> int:
    value = int(text)
    if len(text) > 300:  # beyond int64 nlohmann reads a double, and this one may not fit
        try:
            float(value)
        except OverflowError:
            raise ValueError(f"number overflow: {text[:40]}...") from None
    return value


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_STRICT = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int)


def _check_strings(data: Any) -> None:
    # Iterative: the document may be nested nearly as deep as the parser allows.
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            strings: Any = (item,)
        elif isinstance(item, dict):
            strings = item.keys()
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
            continue
        else:
            continue
        for text in strings:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("invalid string: a surrogate escape without its pair") from None


def _model_field(body: Any) -> str:
    name = body.get("model") if isinstance(body, dict) else None
    return name if isinstance(name, str) else ""


def _model_from_body(request: web.Request, body: bytes) -> str:
    ctype = request.content_type
    if ctype.startswith("multipart/"):
        # Upstream turns form fields into JSON to find `model`; we only look for that field
        # and forward the original bytes untouched.
        match = _MULTIPART_MODEL.search(body)
        return match.group(1).decode("utf-8", "replace") if match else ""
    try:
        data = parse_json(body)
    except ValueError as exc:
        raise InvalidRequest(f"invalid JSON in request body: {exc}") from None
    return _model_field(data)


def _query_model(request: web.Request) -> str:
    # The last `model=` wins, as in llama-server (cpp-httplib keeps the last value).
    values = request.query.getall("model", ())
    return values[-1] if values else ""


@functools.cache
def openapi_spec() -> dict[str, Any]:
    import yaml

    text = (Path(__file__).with_name("openapi.yaml")).read_text(encoding="utf-8")
    return yaml.safe_load(text)  # type: ignore[no-any-return]  # yaml.safe_load returns Any; the file is our own spec


def error_body(exc: LlamaRouterError) -> dict[str, Any]:
    return {"error": {"code": exc.status, "message": exc.message, "type": exc.type}}



