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
import re
import time
import weakref
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from ..settings.childargs import ChildArgs
from ..settings.config import RouterConfig
from ..errors import (
    ChildUnreachable,
    InvalidRequest,
    LlamaRouterError,
    ModelNotFound,
    NotFound,
    PayloadTooLarge,
    UpstreamError,
)
from .metrics import CONTENT_TYPE, RequestTiming, RouterMetrics
from ..core.process import ModelProcess
from .proxy import Proxy
from ..core.states import State
from ..core.supervisor import Supervisor

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
    "/lora-adapters",
    "/slots/{id_slot}",
)
# Routes upstream proxies by ?model= (GET /props and GET /metrics without it are the
# router's own).
PROXIED_GET = ("/slots", "/lora-adapters")

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

    def __init__(self, config: RouterConfig, child_args: ChildArgs, metrics: RouterMetrics) -> None:
        self.config = config
        self.child_args = child_args
        self.metrics = metrics
        self._item_cache: weakref.WeakKeyDictionary[
            ModelProcess, tuple[tuple[object, ...], tuple[bytes, bytes]]
        ] = weakref.WeakKeyDictionary()

    def bind(self, supervisor: Supervisor, proxy: Proxy, session: aiohttp.ClientSession) -> None:
        self.sup = supervisor
        self.proxy = proxy
        self.session = session

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/v1/health", self.health)
        r.add_get("/livez", self.livez)
        r.add_get("/readyz", self.readyz)
        r.add_get("/metrics", self.metrics_endpoint)
        r.add_get("/models", self.list_models)
        r.add_get("/v1/models", self.list_models)
        r.add_get("/props", self.props)
        r.add_post("/models/load", self.load)
        r.add_post("/models/unload", self.unload)
        r.add_get("/models/sse", self.sse)
        r.add_get("/models/logs", self.logs)
        r.add_get("/memory", self.memory)
        r.add_post("/models", self.download)
        r.add_delete("/models", self.delete)
        r.add_get("/openapi.json", self.openapi)
        # Upstream's router answers these llama.cpp UI endpoints with 403 unless server tools
        # or the MCP proxy are configured (server.cpp); the UI then hides those features.
        for path in ("/tools", "/cors-proxy"):
            r.add_get(path, self.feature_disabled)
            r.add_post(path, self.feature_disabled)
        # Resumable streams: upstream's router maps X-Conversation-Id to the owning child. We
        # keep no such map, so we answer as upstream does when its map is empty; the UI then
        # simply does not offer to resume.
        r.add_post("/v1/streams/lookup", self.streams_lookup)
        r.add_get("/v1/stream", self.stream_get)
        r.add_delete("/v1/stream", self.stream_delete)
        r.add_get("/dashboard/history", self.history)
        for path in PROXIED_POST:
            r.add_post(path, self.proxy_post)
        for path in PROXIED_GET:
            r.add_get(path, self.proxy_get)

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
        name = request.query.get("model", "")
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
        if request.query.get("model"):
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
            proc.spec, proc.state, proc.port, proc.in_flight, self.sup.queued_for(proc),
            proc.restarts, proc.last_used_wall, proc.crashed, proc.exit_code, proc.failure,
            proc.stop_reason, proc.estimate, proc.measured_bytes, id(proc.loaded_info),
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
            "value": proc.api_status,
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
            "restarts": proc.restarts,
            "pinned": spec.pin,
        }
        if proc.last_used_wall:
            item["last_used"] = int(proc.last_used_wall)
        if proc.estimate is not None:
            item["estimated_bytes"] = proc.estimate.total
            item["estimate"] = proc.estimate.as_dict()
        if proc.measured_bytes is not None and proc.api_status != "unloaded":
            item["measured_bytes"] = proc.measured_bytes
        if proc.api_status != "unloaded":
            for key, value in proc.loaded_info.items():
                item.setdefault(key, value)
        return item

    async def props(self, request: web.Request) -> web.StreamResponse:
        if request.query.get("model"):
            return await self.proxy_get(request)
        return _json(
            {
                "role": "router",
                "max_instances": self.config.limits.models_max,
                "models_autoload": self.config.models_autoload,
                "model_alias": "llama-server",
                "model_path": "none",
                "default_generation_settings": {"params": None, "n_ctx": 0},
                "ui_settings": {},
                "build_info": self.config.build_info,
                "cors_proxy_enabled": False,
            }
        )

    async def load(self, request: web.Request) -> web.Response:
        name = _model_field(await _json_body(request, self.config.limits.max_body_bytes))
        await self.sup.load(name)
        return _json({"success": True})

    async def unload(self, request: web.Request) -> web.Response:
        name = _model_field(await _json_body(request, self.config.limits.max_body_bytes))
        self.sup.unload(name)
        return _json({"success": True})

    async def memory(self, request: web.Request) -> web.Response:
        """Budget, use and free memory, and each model's estimate / measurement."""
        memory = self.sup.memory
        procs = list(self.sup.models.values())
        models = {}
        for proc in procs:
            entry: dict[str, Any] = {"status": proc.api_status}
            if memory is not None and proc.spec.model_path and proc.estimate is None:
                await memory.estimate_for(proc, self.child_args.merged(proc.spec))
            if proc.estimate is not None:
                entry["estimated_bytes"] = proc.estimate.total
                entry["estimate"] = proc.estimate.as_dict()
            rss = self.sup.rss_of(proc)
            if rss is not None:
                entry["rss_bytes"] = rss
            if proc.measured_bytes is not None:
                entry["measured_bytes"] = proc.measured_bytes
                entry["measured"] = {f"{dev}:{kind}": n for (dev, kind), n in proc.measured.items()}
            models[proc.name] = entry
        body: dict[str, Any] = {"budget": None, "models": models}
        if memory is not None:
            body.update(memory.report(procs))
        return _json(body)

    async def feature_disabled(self, request: web.Request) -> web.Response:
        # Upstream's exact body: no `code` field in this one.
        return _json({"error": {"message": "this feature is disabled", "type": "feature_disabled"}}, 403)

    async def streams_lookup(self, request: web.Request) -> web.Response:
        await _json_body(request, self.config.limits.max_body_bytes)
        return _json([])

    async def stream_get(self, request: web.Request) -> web.Response:
        if not request.query.get("conv_id"):
            raise InvalidRequest("Missing conversation id in path")
        raise NotFound("Stream not found or expired")

    async def stream_delete(self, request: web.Request) -> web.Response:
        if not request.query.get("conv_id"):
            raise InvalidRequest("Missing conversation id in path")
        return web.Response(status=204)

    async def history(self, request: web.Request) -> web.Response:
        """The dashboard's timeline: the last minutes of requests, memory and load events."""
        return _json(self.metrics.history_snapshot(self.sup))

    async def openapi(self, request: web.Request) -> web.Response:
        """docs/openapi.yaml (shipped as llamarouter/web/openapi.yaml) as JSON."""
        return _json(openapi_spec())

    async def download(self, request: web.Request) -> web.Response:
        raise LlamaRouterError(
            "downloading models is not supported by llamarouter; "
            "put GGUF files in --models-dir or the cache"
        )

    async def delete(self, request: web.Request) -> web.Response:
        raise LlamaRouterError("removing cached models is not supported by llamarouter")

    async def sse(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        async with self.sup.events.subscribe() as queue:
            while True:
                line = await queue.get()
                if line is None:
                    break
                await resp.write(line)
        with contextlib.suppress(ConnectionError):
            await resp.write_eof()
        return resp

    async def logs(self, request: web.Request) -> web.StreamResponse:
        name = request.query.get("model", "")
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
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8", "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        queue: asyncio.Queue[str | None] = asyncio.Queue(max(1, self.config.limits.log_lines))
        proc.log_listeners.add(queue)
        try:
            if tail:
                await resp.write("".join(line + "\n" for line in tail).encode())
            while (line := await queue.get()) is not None:
                await resp.write(line.encode() + b"\n")
        finally:
            proc.log_listeners.discard(queue)
        return resp

    # ----------------------------------------------------------------- proxied endpoints
    def _autoload(self, request: web.Request) -> bool:
        value = request.query.get("autoload")
        if value is None or value == "":
            return self.config.models_autoload
        return _is_true(value)

    async def proxy_post(self, request: web.Request) -> web.StreamResponse:
        body = await _read_body(request, self.config.limits.max_body_bytes)
        name = _model_from_body(request, body)
        return await self._route(request, name, body)

    async def proxy_get(self, request: web.Request) -> web.StreamResponse:
        return await self._route(request, request.query.get("model", ""), None)

    async def _route(self, request: web.Request, name: str, body: bytes | None) -> web.StreamResponse:
        if not name:
            raise InvalidRequest("model name is missing from the request")
        proc = self.sup.resolve(name)
        autoload = self._autoload(request)
        timing = RequestTiming()
        code = 500
        try:
            retried = False
            while True:
                await self.sup.acquire(proc, autoload)
                port = proc.port
                try:
                    if self.config.fake_timing:
                        await asyncio.sleep(self.config.fake_timing_secs)
                    resp = await self.proxy.forward(request, proc, body, timing)
                    code = resp.status
                    return resp
                except UpstreamError as exc:
                    # Nothing reached our client yet. Typically the child died and its exit
                    # is not processed yet (a request right after a crash, on a dead pooled
                    # connection). Send it once more when the child that may have seen it
                    # is gone, or when it never reached the child at all.
                    if retried:
                        raise
                    retried, failed = True, exc
                finally:
                    self.sup.release(proc)
                await proc.wait_changed_from(port, self.config.timeouts.health_timeout)
                gone = proc.state != State.READY or proc.port != port
                if not (gone or isinstance(failed, ChildUnreachable)):
                    raise failed
        except LlamaRouterError as exc:
            code = exc.status
            raise
        except asyncio.CancelledError:
            code = 499  # the client went away (nginx's code for it)
            raise
        finally:
            # Counted per route pattern, not per raw path, so /slots/{id} stays one series.
            self.metrics.observe_request(
                proc.name, request.match_info.route.resource.canonical, code, timing
            )


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    # The app's client_max_size is the same limit, so a chunked body that grows past it
    # fails inside read() with 413 as well.
    return await request.read()


async def _json_body(request: web.Request, limit: int) -> Any:
    # Same limit and 413 as proxied POSTs (a Content-Length over it is refused unread).
    raw = await _read_body(request, limit)
    try:
        return json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"invalid JSON in request body: {exc}") from None


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
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"invalid JSON in request body: {exc}") from None
    return _model_field(data)


@functools.cache
def openapi_spec() -> dict[str, Any]:
    import yaml  # noqa: PLC0415  (only this endpoint needs it)

    text = (Path(__file__).with_name("openapi.yaml")).read_text(encoding="utf-8")
    return yaml.safe_load(text)  # type: ignore[no-any-return]


def error_body(exc: LlamaRouterError) -> dict[str, Any]:
    return {"error": {"code": exc.status, "message": exc.message, "type": exc.type}}



