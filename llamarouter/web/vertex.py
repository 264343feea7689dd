"""Vertex AI's predict protocol (AIP_MODE=PREDICTION), as llama-server serves it
(server-http.cpp, register_gcp_compat): each instance names an endpoint in
`@requestFormat` and is answered by it; the answers are collected in order.

Each instance is routed as any proxied request is (api.py `Api.serve`): the child's
connection cap, the replay after a crash and the request metrics apply to it too.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..errors import InvalidRequest, LlamaRouterError
from .bodies import error_body, json_response, model_field, read_body
from .paths import PROXIED_POST
from .strictjson import parse_json

if TYPE_CHECKING:
    from .api import Api


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


async def predict(api: Api, request: web.Request) -> web.Response:
    raw = await read_body(request, api.config.limits.max_body_bytes)
    try:
        data = parse_json(raw)
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    instances = data.get("instances")
    if not isinstance(instances, list):
        raise InvalidRequest("request body must include an array field named instances")
    limit = api.config.limits.predict_instances
    if len(instances) > limit:
        raise InvalidRequest(f"instances array exceeds maximum size of {limit}")
    # Every instance runs to its end (each releases the model it acquired) before an
    # unexpected error of one is raised.
    answers = await asyncio.gather(
        *(_predict_one(api, request, instance) for instance in instances), return_exceptions=True
    )
    for answer in answers:
        if isinstance(answer, BaseException):
            raise answer
    return json_response({"predictions": answers})


async def _predict_one(api: Api, request: web.Request, instance: Any) -> Any:
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
    single = api.config.single_model
    name = single.name if single is not None else model_field(payload)
    body = json.dumps(payload).encode()
    try:
        resp = await api.serve(
            name, api.autoload(request), True, path,
            lambda proc, timing: api.proxy.fetch(proc, path, body, timing),
        )
    except LlamaRouterError as exc:
        return error_body(exc)
    answer = resp.body
    assert isinstance(answer, bytes)  # fetch reads the child's answer whole
    if not answer:
        return None
    try:
        return json.loads(answer)
    except (ValueError, UnicodeDecodeError):
        return answer.decode("utf-8", "replace")
