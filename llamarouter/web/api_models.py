"""`POST /models` (download) and `DELETE /models` (remove from the cache), upstream's
router endpoints, over core/downloads.py; and the /models items of running downloads."""

from __future__ import annotations

import logging
from typing import Any

from ..core.downloads import Download, Downloads, remove_cached
from ..core.supervisor import Supervisor
from ..errors import InvalidRequest, LlamaRouterError

log = logging.getLogger("llamarouter.api")


def model_name(value: Any) -> str:
    """upstream's json_value(body, "model", ""): anything but a non-empty string is missing."""
    if not isinstance(value, str) or not value:
        raise InvalidRequest("model must be a non-empty string")
    return value


async def download(downloads: Downloads | None, body: Any) -> dict[str, Any]:
    name = model_name(body.get("model") if isinstance(body, dict) else None)
    if downloads is None:
        raise LlamaRouterError("downloads are not available")
    await downloads.start(name)
    return {"success": True}


async def delete(sup: Supervisor, downloads: Downloads | None, name: str) -> dict[str, Any]:
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
