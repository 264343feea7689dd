"""Requests read and answers written as llama-server's router reads and writes them: the
body under the size limit, the `model` it names, JSON answers and the JSON error shape."""

from __future__ import annotations

import json
import re
from typing import Any

from aiohttp import web

from ..errors import InvalidRequest, LlamaRouterError, PayloadTooLarge
from .strictjson import parse_json

_MULTIPART_MODEL = re.compile(
    rb'content-disposition:[^\r\n]*\bname="model"[^\r\n]*\r\n(?:[^\r\n]+\r\n)*\r\n(.*?)\r\n--',
    re.IGNORECASE | re.DOTALL,
)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=json.dumps(data, separators=(",", ":")).encode(),
        status=status,
        content_type="application/json",
        charset="utf-8",
    )


def error_body(exc: LlamaRouterError) -> dict[str, Any]:
    return {"error": {"code": exc.status, "message": exc.message, "type": exc.type}}


def is_true(value: str) -> bool:
    return value in ("true", "1")


async def read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    # The app's client_max_size is the same limit, so a chunked body that grows past it
    # fails inside read() with 413 as well.
    return await request.read()


async def json_body(request: web.Request, limit: int, allow_empty: bool = True) -> Any:
    """The body as JSON; an empty one is {}, or with `allow_empty` off invalid JSON (as
    llama-server's /models/load and /models/unload answer it)."""
    # Same limit and 413 as proxied POSTs (a Content-Length over it is refused unread).
    raw = await read_body(request, limit)
    if not raw and allow_empty:
        return {}
    try:
        return parse_json(raw)
    except ValueError as exc:
        raise InvalidRequest(f"invalid JSON in request body: {exc}") from None


def model_field(body: Any) -> str:
    name = body.get("model") if isinstance(body, dict) else None
    return name if isinstance(name, str) else ""


def model_from_body(request: web.Request, body: bytes) -> str:
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
    return model_field(data)


def query_model(request: web.Request) -> str:
    # The last `model=` wins, as in llama-server (cpp-httplib keeps the last value).
    values = request.query.getall("model", ())
    return values[-1] if values else ""
