"""The model management endpoints: load, unload, pin, memory, the model events (SSE) and
logs; `POST /models` (download) and `DELETE /models` (remove from the cache), upstream's
router endpoints, over core/downloads.py; and the /models items of running downloads.

Handlers take the `Api` (api.py registers them) for its supervisor and settings."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..core.downloads import Download, Downloads, remove_cached
from ..core.supervisor import Supervisor
from ..errors import InvalidRequest, LlamaRouterError, ShuttingDown
from .bodies import is_true, json_body, json_response, model_field, query_model

if TYPE_CHECKING:
    from .api import Api

log = logging.getLogger("llamarouter.api")


def model_name(value: Any) -> str:
    """upstream's json_value(body, "model", ""): anything but a non-empty string is missing."""
    if not isinstance(value, str) or not value:
        raise InvalidRequest("model must be a non-empty string")
    return value


async def _start_download(downloads: Downloads | None, body: Any) -> dict[str, Any]:
    name = model_name(body.get("model") if isinstance(body, dict) else None)
    if downloads is None:
        raise LlamaRouterError("downloads are not available")
    await downloads.start(name)
    return {"success": True}


async def _remove(sup: Supervisor, downloads: Downloads | None, name: str) -> dict[str, Any]:
    """A running download is cancelled (its partial files go with it); a cache model's
    files are removed and the model leaves the listing: a running child of it is stopped
    as a reload stops a model whose definition vanished (its requests in flight finish
    first)."""
    name = model_name(name)
    cache_dir = sup.config.cache_dir
    if downloads is not None and name in downloads.running:
        await downloads.cancel(name, "removed")
        if cache_dir is not None:
            remove_cached(cache_dir, name)
        log.info("model %s: download cancelled and removed", name)
        sup.events.publish("model_remove", name)
        return {"success": True}
    proc = sup.find(name)
    if proc is None:
        raise LlamaRouterError(f"model name={name} is not found")
    if proc.spec.source != "cache" or cache_dir is None:
        raise LlamaRouterError(f"model name={proc.name} is not removable (not from cache)")
    removed = remove_cached(cache_dir, proc.name)
    log.info("model %s: removed from the cache (%s)", proc.name, "succeeded" if removed else "partial")
    await sup.reload()
    sup.events.publish("model_remove", proc.name)
    return {"success": True}


async def load(api: Api, request: web.Request) -> web.Response:
    name = model_field(await json_body(request, api.config.limits.max_body_bytes, allow_empty=False))
    await api.sup.load(name)
    return json_response({"success": True})


async def unload(api: Api, request: web.Request) -> web.Response:
    name = model_field(await json_body(request, api.config.limits.max_body_bytes, allow_empty=False))
    if name == "*":
        return _unload_all(api)
    if api.downloads is not None and await api.downloads.cancel(name, "unloaded"):
        return json_response({"success": True})  # upstream: unloading a download cancels it
    api.sup.unload(name)
    return json_response({"success": True})


def _unload_all(api: Api) -> web.Response:
    """`{"model": "*"}`: unload every running model that is not pinned; the answer
    names them (an empty list when none ran)."""
    return json_response({"success": True, "models": api.sup.unload_all()})


async def pin(api: Api, request: web.Request) -> web.Response:
    """llamarouter's own: {"model": NAME, "pin": true|false} keeps a model loaded or
    lets it go; the answer is {"success": true, "pinned": BOOL}."""
    body = await json_body(request, api.config.limits.max_body_bytes)
    name = model_field(body)
    on = body.get("pin", True) if isinstance(body, dict) else True
    if not isinstance(on, bool):
        raise InvalidRequest("pin must be true or false")
    proc = api.sup.pin(name, on)
    return json_response({"success": True, "pinned": api.sup.pinned(proc)})


async def memory(api: Api, request: web.Request) -> web.Response:
    """Budget, use and free memory, and each model's estimate / measurement."""
    memory = api.sup.memory
    # Every listed child: a model's extra replicas hold memory too (listed by their key).
    procs = [p for p in api.sup.all_processes() if api.sup.table.listed(p)]
    models = {}
    for proc in procs:
        entry: dict[str, Any] = {"status": proc.api_status}
        if memory is not None and proc.spec.model_path and memory.estimate_of(proc) is None:
            await memory.estimate_for(proc, api.child_args.merged(proc.spec))
        est = api.sup.estimate_of(proc)
        if est is not None:
            entry["estimated_bytes"] = est.total
            entry["estimate"] = est.as_dict()
        rss = api.sup.rss_of(proc)
        if rss is not None:
            entry["rss_bytes"] = rss
        if proc.measured_bytes is not None:
            entry["measured_bytes"] = proc.measured_bytes
            entry["measured"] = {f"{dev}:{kind}": n for (dev, kind), n in proc.measured.items()}
        if proc.device_bytes is not None:
            entry["device_bytes"] = proc.device_bytes
        if memory is not None and proc.holds_slot:
            entry["counted_bytes"] = memory.held(proc)
        placed = memory.placement_view(proc.key) if memory is not None else None
        if placed is not None:
            entry["placement"] = placed
        models[proc.key] = entry
    body: dict[str, Any] = {"budget": None, "models": models}
    if memory is not None:
        body.update(memory.report(procs))
    return json_response(body)


async def download(api: Api, request: web.Request) -> web.Response:
    body = await json_body(request, api.config.limits.max_body_bytes, allow_empty=False)
    return json_response(await _start_download(api.downloads, body))


async def delete(api: Api, request: web.Request) -> web.Response:
    return json_response(await _remove(api.sup, api.downloads, request.query.get("model", "")))


async def sse(api: Api, request: web.Request) -> web.StreamResponse:
    if api.sup.closing:
        # Not a 200 that ends at once: an EventSource would reconnect to it every few
        # seconds for as long as in-flight requests keep the router up.
        raise ShuttingDown("server is shutting down")
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    # Subscribed before the headers go out: a client that has them misses no event.
    async with api.sup.events.subscribe() as queue:
        await resp.prepare(request)
        while True:
            line = await queue.get()
            if line is None:
                break
            await resp.write(line)
    with contextlib.suppress(ConnectionError):
        await resp.write_eof()
    return resp


async def logs(api: Api, request: web.Request) -> web.StreamResponse:
    name = query_model(request)
    if not name:
        raise InvalidRequest("model name is missing from the request")
    proc = api.sup.resolve(name)
    try:
        lines = int(request.query.get("lines", "200"))
    except ValueError:
        raise InvalidRequest("lines must be an integer") from None
    tail = proc.log_tail(lines)
    if not is_true(request.query.get("follow", "")):
        return web.Response(text="".join(line + "\n" for line in tail), content_type="text/plain")
    if api.sup.closing:
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


def download_item(dl: Download, now: int) -> dict[str, Any]:
    """A download in the /models listing, as upstream lists a model being downloaded
    (status `downloading`), with its progress (ours: bytes done and total, per file)."""
    return {
        "id": dl.name,
        "aliases": [],
        "tags": [],
        "object": "model",
        "owned_by": "llamacpp",
        "created": now,
        "status": {**dl.as_status(), "args": []},
        "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
        "source": "cache",
        "can_remove": True,
    }
