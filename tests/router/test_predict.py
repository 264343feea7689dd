"""The Vertex AI predict route (AIP_MODE=PREDICTION) against fake children: each instance
is answered by the endpoint it names, in order, and is routed as any proxied request is
(counted in the request metrics under that endpoint)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import StartRouter, make_models, scrape, value

GCP_ENV = {"AIP_MODE": "PREDICTION", "AIP_HTTP_PORT": "{port}"}


def error(code: int, message: str, kind: str = "invalid_request_error") -> dict[str, object]:
    return {"error": {"code": code, "message": message, "type": kind}}


async def test_each_instance_is_answered_in_order(tmp_path: Path, start_router: StartRouter) -> None:
    r = await start_router("--models-dir", str(make_models(tmp_path, "a")), env=GCP_ENV)
    chat = {"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    body = {"instances": [
        {"@requestFormat": "chatCompletions", **chat, "stream": True},  # answered whole
        {"@requestFormat": "/tokenize", "model": "a", "content": "hello"},
        {"@requestFormat": "nope", "model": "a"},
        "not an object",
        {"model": "a"},
        {"@requestFormat": "completion", "prompt": "x"},
    ]}
    status, got = await r.post("/predict", body)
    assert status == 200, got
    answers = got["predictions"]
    assert answers[0]["object"] == "chat.completion"
    assert answers[1]["tokens"]
    assert answers[2:] == [
        error(400, "no handler registered for @requestFormat: nope"),
        error(400, "each instance must be a JSON object"),
        error(400, "each instance must include a string @requestFormat"),
        error(400, "model name is missing from the request"),
    ]
    m = await scrape(r)
    assert value(m, "llamarouter_requests_total", model="a", endpoint="/v1/chat/completions", code="200") == 1
    assert value(m, "llamarouter_requests_total", model="a", endpoint="/tokenize", code="200") == 1


async def test_the_request_body_is_checked_first(tmp_path: Path, start_router: StartRouter) -> None:
    r = await start_router("--models-dir", str(make_models(tmp_path, "a")), env=GCP_ENV)
    assert await r.post("/predict", {"instances": {}}) == (
        400, error(400, "request body must include an array field named instances")
    )
    assert await r.post("/predict", [1]) == (400, error(400, "request body must be a JSON object"))
    status, got = await r.post("/predict", {"instances": [{}] * 129})
    assert status == 400 and "exceeds maximum size" in got["error"]["message"]
    # An unknown model is that instance's answer, not the request's.
    status, got = await r.post("/predict", {"instances": [{"@requestFormat": "completion", "model": "zz"}]})
    assert status == 200 and got["predictions"][0]["error"]["code"] == 400
