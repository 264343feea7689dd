"""llamarouter against upstream's own router mode, side by side.

Both routers get the same command line, the same real llama-server binary and the same
real tiny models; their answers are compared after normalising what legitimately
differs (ports, timestamps, completion ids and timings, llamarouter's documented
extra fields).  With temperature 0 and a fixed seed, the same model file and the same
binary must generate the same text through both.
"""

from __future__ import annotations

import asyncio
import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Router
from tests.fakes.helpers import wait_for
from tests.integration.conftest import Pair, StartPair, TinyModels

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

BASE_ARGS = ("-c", "512", "-np", "1")

#: llamarouter's documented additions to a /models item, and to its `status`.
OUR_EXTRA_ITEM_KEYS = {"in_flight", "queued", "draining", "restarts", "pinned", "last_used"}
OUR_EXTRA_STATUS_KEYS = {"state", "stop_reason", "error", "cause", "log_tail"}

#: Per-completion values that differ from one request to the next.
VOLATILE_COMPLETION_KEYS = {"id", "created", "timings"}

MESSAGES = [{"role": "user", "content": "Say hello to the router."}]


def models_args(models: TinyModels, *extra: str) -> tuple[str, ...]:
    return ("--models-dir", str(models.dir), *BASE_ARGS, *extra)


# ---------------------------------------------------------------------------
# normalisation


def normalise_args(args: list[str], binary: Path) -> list[str]:
    """Replace the binary path and any non-zero child port by placeholders."""
    assert Path(args[0]).resolve() == binary.resolve(), args[0]
    out = ["<llama-server>", *args[1:]]
    i = out.index("--port") + 1
    if out[i] != "0":
        out[i] = "<port>"
    return out


def normalise_item(item: dict[str, Any], binary: Path, *, ours: bool) -> dict[str, Any]:
    item = copy.deepcopy(item)
    item.pop("created")
    if ours:
        assert OUR_EXTRA_ITEM_KEYS - {"last_used"} <= set(item), sorted(item)
        for key in OUR_EXTRA_ITEM_KEYS:
            item.pop(key, None)
        for key in OUR_EXTRA_STATUS_KEYS:
            item["status"].pop(key, None)
    item["status"]["args"] = normalise_args(item["status"]["args"], binary)
    return item


async def normalised_models(pair: Pair, binary: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """GET /models on both, as {id: normalised item}; also checks the list envelope."""
    out = []
    for who, router in pair.both():
        status, body = await router.get("/models")
        assert status == 200, (who, body)
        assert set(body) == {"data", "object"} and body["object"] == "list", (who, body)
        ids = [m["id"] for m in body["data"]]
        assert len(ids) == len(set(ids)), (who, ids)
        out.append({m["id"]: normalise_item(m, binary, ours=router is pair.ours) for m in body["data"]})
    return out[0], out[1]


def normalise_completion(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k not in VOLATILE_COMPLETION_KEYS}


def error_view(status: int, body: Any, *, message: bool = True) -> tuple[Any, ...]:
    """(status, error.type[, error.message]) of an error answer; checks the shape too."""
    assert isinstance(body, dict) and set(body) == {"error"}, body
    assert body["error"]["code"] == status, body
    if message:
        return status, body["error"]["type"], body["error"]["message"]
    return status, body["error"]["type"]


async def chat_both(pair: Pair, **body: Any) -> tuple[tuple[int, Any], tuple[int, Any]]:
    up = await pair.upstream.post("/v1/chat/completions", body)
    ours = await pair.ours.post("/v1/chat/completions", body)
    return up, ours


async def stream_chat(router: Router, body: dict[str, Any]) -> tuple[int, str, list[bytes]]:
    async with router.session.post(router.url + "/v1/chat/completions", json=body) as resp:
        raw = await resp.read()
        return resp.status, resp.content_type, [e for e in raw.split(b"\n\n") if e.strip()]


# ---------------------------------------------------------------------------
# 1. the model list before anything was loaded


async def test_models_list_before_any_load(
    start_pair: StartPair, tiny_models: TinyModels, llama_server_bin: Path
) -> None:
    pair = await start_pair(*models_args(tiny_models))
    up, ours = await normalised_models(pair, llama_server_bin)

    assert sorted(up) == ["alpha", "beta", "split"]
    assert sorted(ours) == sorted(up)
    for name, item in up.items():
        assert item["status"]["value"] == "unloaded"
        assert item["source"] == "models_dir" and item["can_remove"] is False
        # Same keys, same status value, same args (binary path replaced; port 0 on both
        # since nothing runs), same preset text, same source/architecture/can_remove.
        assert sorted(ours[name]) == sorted(item), name
        assert ours[name]["status"] == item["status"], name
        assert ours[name] == item, name
    assert up["split"]["status"]["args"][up["split"]["status"]["args"].index("--model") + 1] == str(
        tiny_models.split_first
    )
    # Nothing was started by listing.
    assert not pair.upstream.children() and not pair.ours.children()


# ---------------------------------------------------------------------------
# 2. non-streaming chat, cold then warm


async def test_chat_cold_then_warm_is_identical(start_pair: StartPair, tiny_models: TinyModels) -> None:
    pair = await start_pair(*models_args(tiny_models))
    request = {"model": "alpha", "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "seed": 1234}

    for phase in ("cold", "warm"):
        (up_status, up), (our_status, ours) = await chat_both(pair, **request)
        assert up_status == 200, (phase, up)
        assert our_status == 200, (phase, ours)
        assert sorted(ours) == sorted(up), phase
        assert ours["object"] == up["object"] == "chat.completion"
        assert ours["model"] == up["model"] == "alpha"
        assert ours["choices"][0]["finish_reason"] == up["choices"][0]["finish_reason"] == "length"
        assert ours["usage"]["completion_tokens"] == up["usage"]["completion_tokens"] == 4
        # Same model file, same binary, temperature 0, same seed: the same text...
        assert ours["choices"][0]["message"] == up["choices"][0]["message"], phase
        # ...and the whole answer apart from id/created/timings (usage, cache hits included).
        assert normalise_completion(ours) == normalise_completion(up), phase
        if phase == "warm":
            assert up["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


# ---------------------------------------------------------------------------
# 3. streaming chat


async def test_streaming_chat_is_identical(start_pair: StartPair, tiny_models: TinyModels) -> None:
    pair = await start_pair(*models_args(tiny_models))
    request = {"model": "beta", "messages": MESSAGES, "max_tokens": 5, "temperature": 0, "seed": 7,
               "stream": True}
    results = {}
    for who, router in pair.both():
        status, content_type, events = await stream_chat(router, request)
        assert status == 200, (who, events)
        assert content_type == "text/event-stream", who
        results[who] = events
    up, ours = results["upstream"], results["llamarouter"]

    assert len(ours) == len(up)
    assert up[-1] == ours[-1] == b"data: [DONE]"

    def chunks(events: list[bytes]) -> list[dict[str, Any]]:
        assert all(e.startswith(b"data: ") for e in events), events
        return [json.loads(e[len(b"data: "):]) for e in events[:-1]]

    up_chunks, our_chunks = chunks(up), chunks(ours)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in up_chunks)
    assert text  # something was generated
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in our_chunks) == text
    assert [normalise_completion(c) for c in our_chunks] == [normalise_completion(c) for c in up_chunks]
    assert up_chunks[-1]["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------------------
# 4. the model list once a model runs


async def test_models_list_after_load(
    start_pair: StartPair, tiny_models: TinyModels, llama_server_bin: Path
) -> None:
    pair = await start_pair(*models_args(tiny_models))
    (up_status, up_body), (our_status, our_body) = await chat_both(
        pair, model="alpha", messages=MESSAGES, max_tokens=2)
    assert up_status == 200, up_body
    assert our_status == 200, our_body

    up, ours = await normalised_models(pair, llama_server_bin)
    assert up["alpha"]["status"]["value"] == ours["alpha"]["status"]["value"] == "loaded"
    # Keys of the child's /v1/models entry are merged in by both, with the same values.
    assert "meta" in up["alpha"] and "meta" in ours["alpha"]
    assert ours["alpha"]["meta"] == up["alpha"]["meta"]
    assert ours["alpha"]["meta"]["n_ctx"] == 512
    assert sorted(ours["alpha"]) == sorted(up["alpha"])
    assert ours["alpha"] == up["alpha"]  # args compared with the child port normalised
    # The others were not touched.
    for name in ("beta", "split"):
        assert up[name]["status"]["value"] == ours[name]["status"]["value"] == "unloaded"
        assert "meta" not in up[name] and "meta" not in ours[name]
        assert ours[name] == up[name]


# ---------------------------------------------------------------------------
# 5. errors


async def test_error_answers_match(start_pair: StartPair, tiny_models: TinyModels) -> None:
    pair = await start_pair(*models_args(tiny_models))
    chat = {"messages": MESSAGES, "max_tokens": 1}

    # Load alpha explicitly first, so that "already running" has something to hit.
    for who, router in pair.both():
        assert await router.post("/models/load", {"model": "alpha"}) == (200, {"success": True}), who
        await router.wait_status("alpha", "loaded")

    views: dict[str, dict[str, Any]] = {}
    for who, router in pair.both():
        view: dict[str, Any] = {}
        view["chat unknown model"] = error_view(*await router.post("/v1/chat/completions", {**chat, "model": "nope"}))
        view["chat missing model"] = error_view(*await router.post("/v1/chat/completions", chat))
        view["chat non-string model"] = error_view(*await router.post("/v1/chat/completions", {**chat, "model": 7}))
        # upstream's message is nlohmann's parser text: compare code and type only
        view["chat bad JSON"] = error_view(
            *await router.post("/v1/chat/completions", data=b"{not json"), message=False)
        view["chat empty body"] = error_view(
            *await router.post("/v1/chat/completions", data=b""), message=False)
        view["tokenize unknown model"] = error_view(
            *await router.post("/tokenize", {"model": "nope", "content": "x"}))
        view["GET props unknown model"] = error_view(*await router.get("/props?model=nope"))
        view["GET slots missing model"] = error_view(*await router.get("/slots"))
        view["load unknown"] = error_view(*await router.post("/models/load", {"model": "nope"}))
        view["load already running"] = error_view(*await router.post("/models/load", {"model": "alpha"}))
        view["unload unknown"] = error_view(*await router.post("/models/unload", {"model": "nope"}))
        view["unload not running"] = error_view(*await router.post("/models/unload", {"model": "beta"}))
        view["unknown path"] = error_view(*await router.get("/no/such/path"))
        views[who] = view

    up = views["upstream"]
    # Sanity: what upstream itself says (documents the reference behaviour).
    assert up["chat unknown model"] == (400, "invalid_request_error", "model 'nope' not found")
    assert up["chat missing model"] == (400, "invalid_request_error", "model name is missing from the request")
    assert up["chat bad JSON"] == (400, "invalid_request_error")
    assert up["load already running"] == (400, "invalid_request_error", "model is already running")
    assert up["unload unknown"] == (400, "invalid_request_error", "model is not found")
    assert up["unload not running"] == (400, "invalid_request_error", "model is not running")
    # httplib's error handler rewrites the body of every 404 answer, so a failed
    # /models/load says "File Not Found", not the handler's "model is not found".
    assert up["load unknown"] == (404, "not_found_error", "File Not Found")

    assert views["llamarouter"] == up


async def test_router_props_match(start_pair: StartPair, tiny_models: TinyModels) -> None:
    pair = await start_pair(*models_args(tiny_models))
    props = {}
    for who, router in pair.both():
        status, body = await router.get("/props")
        assert status == 200, (who, body)
        assert isinstance(body["build_info"], str)
        props[who] = body
    assert props["upstream"]["role"] == "router"
    assert props["upstream"]["max_instances"] == 4 and props["upstream"]["models_autoload"] is True
    assert props["llamarouter"] == props["upstream"]

    model_props = {}
    for who, router in pair.both():
        status, body = await router.get("/props?model=alpha")  # autoloads by default
        assert status == 200, (who, body)
        assert "role" not in body and "default_generation_settings" in body, who
        model_props[who] = body
    up, ours = model_props["upstream"], model_props["llamarouter"]
    assert sorted(ours) == sorted(up)
    assert ours["default_generation_settings"] == up["default_generation_settings"]
    assert up["default_generation_settings"]["n_ctx"] == 512
    for key in ("model_alias", "model_path", "total_slots", "modalities", "chat_template"):
        assert ours[key] == up[key], key
    for who, router in pair.both():
        assert await router.status_of("alpha") == "loaded", who


async def test_autoload_disabled(start_pair: StartPair, tiny_models: TinyModels) -> None:
    pair = await start_pair(*models_args(tiny_models, "--no-models-autoload"))
    not_loaded = (400, "invalid_request_error", "model is not loaded")
    for who, router in pair.both():
        status, body = await router.get("/props")
        assert status == 200 and body["models_autoload"] is False, (who, body)
        assert error_view(*await router.get("/props?model=alpha&autoload=false")) == not_loaded, who
        assert error_view(*await router.get("/props?model=alpha")) == not_loaded, who
        assert error_view(*await router.chat("alpha", max_tokens=1)) == not_loaded, who
        assert not router.children(), who
        assert await router.status_of("alpha") == "unloaded", who

    # ?autoload=true overrides the flag for one request.
    answers = {}
    for who, router in pair.both():
        status, body = await router.post(
            "/v1/chat/completions?autoload=true",
            {"model": "alpha", "messages": MESSAGES, "max_tokens": 3, "temperature": 0, "seed": 3})
        assert status == 200, (who, body)
        answers[who] = normalise_completion(body)
        assert await router.status_of("alpha") == "loaded", who
        status, body = await router.get("/props?model=alpha&autoload=false")  # now running
        assert status == 200 and "default_generation_settings" in body, (who, body)
    assert answers["llamarouter"] == answers["upstream"]


# ---------------------------------------------------------------------------
# 6. tokenize


async def test_tokenize_is_identical(start_pair: StartPair, tiny_models: TinyModels) -> None:
    pair = await start_pair(*models_args(tiny_models))
    results = {}
    for who, router in pair.both():
        status, body = await router.post("/tokenize", {"model": "alpha", "content": "hello"})
        assert status == 200, (who, body)
        results[who] = body
    assert results["upstream"]["tokens"]
    assert results["llamarouter"] == results["upstream"]


# ---------------------------------------------------------------------------
# 7. the split model


async def test_split_model_loads_and_answers(
    start_pair: StartPair, tiny_models: TinyModels, llama_server_bin: Path
) -> None:
    pair = await start_pair(*models_args(tiny_models))
    (up_status, up), (our_status, ours) = await chat_both(
        pair, model="split", messages=MESSAGES, max_tokens=4, temperature=0, seed=5)
    assert up_status == 200, up
    assert our_status == 200, ours
    assert up["model"] == ours["model"] == "split"
    assert ours["usage"]["completion_tokens"] == up["usage"]["completion_tokens"] == 4
    assert normalise_completion(ours) == normalise_completion(up)

    up_models, our_models = await normalised_models(pair, llama_server_bin)
    assert up_models["split"]["status"]["value"] == our_models["split"]["status"]["value"] == "loaded"
    assert our_models["split"]["meta"] == up_models["split"]["meta"]
    assert our_models["split"] == up_models["split"]


# ---------------------------------------------------------------------------
# 8. unload


async def test_unload_shows_unloaded(
    start_pair: StartPair, tiny_models: TinyModels, llama_server_bin: Path
) -> None:
    pair = await start_pair(*models_args(tiny_models))
    for who, router in pair.both():
        status, body = await router.chat("alpha", max_tokens=1)
        assert status == 200, (who, body)
        assert await router.status_of("alpha") == "loaded", who
        assert router.children(), who

    for who, router in pair.both():
        assert await router.post("/models/unload", {"model": "alpha"}) == (200, {"success": True}), who
    for who, router in pair.both():
        await router.wait_status("alpha", "unloaded")
        await wait_for(lambda r=router: not r.children(), 15, interval=0.05, message=f"{who}'s child to exit")

    up, ours = await normalised_models(pair, llama_server_bin)
    assert up["alpha"]["status"]["value"] == ours["alpha"]["status"]["value"] == "unloaded"
    # An intentional unload exits with 0: no failed/exit_code on either side.
    assert "failed" not in up["alpha"]["status"] and "failed" not in ours["alpha"]["status"]
    assert "meta" not in up["alpha"] and "meta" not in ours["alpha"]
    assert sorted(ours["alpha"]) == sorted(up["alpha"])
    assert sorted(ours["alpha"]["status"]) == sorted(up["alpha"]["status"])
    # Upstream keeps showing the stopped child's last port; compare with the port masked.
    for item in (up["alpha"], ours["alpha"]):
        args = item["status"]["args"]
        args[args.index("--port") + 1] = "<port>"
    assert ours["alpha"] == up["alpha"]

    # Unloading again: not running, on both.
    for who, router in pair.both():
        assert error_view(*await router.post("/models/unload", {"model": "alpha"})) == (
            400, "invalid_request_error", "model is not running"), who


# ---------------------------------------------------------------------------
# 9. the command line: refused the same way, before anything listens


async def _run_cli(argv: list[str], cwd: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=str(cwd),
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, (out + err).decode(errors="replace")


@pytest.mark.parametrize(
    "args",
    [
        ["--models-dirr", "x"],
        ["--bogus-flag", "3"],
        ["--ctx-size", "foo"],
        ["-c"],
        ["--ctx-size=512"],
        ["positional"],
        ["-c", "512", "--temp", "warm"],
        # Two errors: the first in order is the one reported.
        ["-c", "abc", "--bogus"],
        ["-c", "--port", "1"],
    ],
    ids=lambda a: " ".join(a),
)
async def test_bad_command_line_is_refused_like_upstream(
    args: list[str], llama_server_bin: Path, tmp_path: Path
) -> None:
    up = await _run_cli([str(llama_server_bin), *args], tmp_path)
    ours = await _run_cli(
        [sys.executable, "-m", "llamarouter", "--server-bin", str(llama_server_bin), *args], ROOT)
    assert up[0] == 1, up
    assert ours == up


# ---------------------------------------------------------------------------
# 10. /props build_info, CORS, routes, --no-ui (router mode)


async def test_router_props_with_ui_config(start_pair: StartPair, tiny_models: TinyModels) -> None:
    pair = await start_pair(*models_args(tiny_models, "--ui-config", '{"theme": "dark", "n": [1, 2]}'))
    props = {who: (await router.get("/props"))[1] for who, router in pair.both()}
    assert props["upstream"]["ui_settings"] == {"theme": "dark", "n": [1, 2]}
    assert props["llamarouter"] == props["upstream"]


async def test_build_info_is_the_binarys(start_pair: StartPair, tiny_models: TinyModels) -> None:
    pair = await start_pair(*models_args(tiny_models))
    infos = {who: (await router.get("/props"))[1]["build_info"] for who, router in pair.both()}
    assert infos["upstream"] == "b0-unknown"  # this sdist build, in llama_build_info()'s form
    assert infos["llamarouter"] == infos["upstream"]


CORS_HEADERS = (
    "Access-Control-Allow-Origin", "Access-Control-Allow-Credentials",
    "Access-Control-Allow-Methods", "Access-Control-Allow-Headers",
)
ORIGINS = (
    None, "http://app.example", "http://localhost:5173", "http://127.0.0.1", "http://[::1]:8000",
    "https://localhost.example.com",
)


async def cors_view(router: Router) -> list[tuple[Any, ...]]:
    """What each (method, path, Origin) gets: status and the CORS headers, both on a
    preflight and on normal answers (a router answer, an error, an unknown path)."""
    out: list[tuple[Any, ...]] = []
    for origin in ORIGINS:
        headers = {"Origin": origin} if origin else {}
        for method, path in (("OPTIONS", "/v1/chat/completions"), ("OPTIONS", "/no/such"),
                             ("GET", "/models"), ("GET", "/no/such"), ("POST", "/v1/chat/completions")):
            async with router.session.request(method, router.url + path, headers=headers, json=None) as resp:
                await resp.read()
                out.append((origin, method, path, resp.status,
                            tuple(resp.headers.get(h) for h in CORS_HEADERS)))
    return out


@pytest.mark.parametrize(
    "cors_args",
    [(), ("--cors-origins", "localhost"), ("--cors-origins", "http://app.example"),
     ("--no-cors-credentials",), ("--cors-methods", "GET", "--cors-headers", "content-type")],
    ids=["defaults", "localhost", "one origin", "no credentials", "methods and headers"],
)
async def test_cors_matches(
    start_pair: StartPair, tiny_models: TinyModels, cors_args: tuple[str, ...]
) -> None:
    pair = await start_pair(*models_args(tiny_models, *cors_args))
    up, ours = await cors_view(pair.upstream), await cors_view(pair.ours)
    assert up == ours


async def test_every_route_is_served(start_pair: StartPair, tiny_models: TinyModels) -> None:
    pair = await start_pair(*models_args(tiny_models))
    answers: dict[str, list[tuple[Any, ...]]] = {}
    for who, router in pair.both():
        view: list[tuple[Any, ...]] = []
        for path in ("/chat/completions/input_tokens", "/v1/chat/completions/input_tokens"):
            view.append((path, *await router.post(path, {"model": "alpha", "messages": MESSAGES})))
        for method, path in (("GET", "/cors-proxy"), ("POST", "/cors-proxy"), ("GET", "/tools"),
                             ("POST", "/tools")):
            async with router.session.request(method, router.url + path, json={}) as resp:
                view.append((method, path, resp.status, json.loads(await resp.read())))
        answers[who] = view
    assert answers["upstream"][0][1] == 200 and answers["upstream"][0][2]["input_tokens"] > 0
    assert answers["upstream"][2][2:] == (403, {"error": {"message": "this feature is disabled",
                                                          "type": "feature_disabled"}})
    assert answers["llamarouter"] == answers["upstream"]


async def test_no_ui_serves_no_page(start_pair: StartPair, tiny_models: TinyModels) -> None:
    pair = await start_pair(*models_args(tiny_models, "--no-ui"))
    for who, router in pair.both():
        assert error_view(*await router.get("/")) == (404, "not_found_error", "File Not Found"), who


# ---------------------------------------------------------------------------
# 11. single-model mode (-m): llamarouter answers as the model's own llama-server


def single_args(models: TinyModels, *extra: str) -> tuple[str, ...]:
    return ("-m", str(models.alpha), *BASE_ARGS, *extra)


async def test_single_model_answers_any_model_name(start_pair: StartPair, tiny_models: TinyModels) -> None:
    pair = await start_pair(*single_args(tiny_models, "--alias", "tiny"))
    request = {"messages": MESSAGES, "max_tokens": 3, "temperature": 0, "seed": 11}
    for model in (None, "tiny", "gpt-3.5-turbo", "text-embedding-3-small"):
        body = request if model is None else {**request, "model": model}
        (up_status, up), (our_status, ours) = await chat_both(pair, **body)
        assert up_status == our_status == 200, (model, up, ours)
        assert normalise_completion(ours) == normalise_completion(up), model
        for path, payload in (("/tokenize", {"content": "hello"}), ("/apply-template", {"messages": MESSAGES}),
                              ("/v1/messages/count_tokens", {"messages": MESSAGES})):
            if model is not None:
                payload = {**payload, "model": model}
            up_answer, our_answer = await pair.upstream.post(path, payload), await pair.ours.post(path, payload)
            assert up_answer[0] == 200, (path, up_answer)
            assert our_answer == up_answer, (path, model)


#: Values a llama-server picks afresh at every start or request (a random media marker).
VOLATILE_CHILD_KEYS = {"created", "t_start", "id_task", "media_marker"}


def _drop_volatile(body: Any) -> Any:
    if isinstance(body, dict):
        return {k: _drop_volatile(v) for k, v in body.items() if k not in VOLATILE_CHILD_KEYS}
    if isinstance(body, list):
        return [_drop_volatile(v) for v in body]
    return body


async def test_single_model_gets_are_the_childs(start_pair: StartPair, tiny_models: TinyModels) -> None:
    pair = await start_pair(*single_args(tiny_models, "--alias", "b,a,c", "--tags", "t2,t1"))
    for path in ("/health", "/v1/health", "/props", "/slots", "/metrics", "/lora-adapters", "/models",
                 "/v1/models", "/no/such/path"):
        up, ours = await pair.upstream.get(path), await pair.ours.get(path)
        assert ours[0] == up[0], (path, up, ours)
        assert _drop_volatile(ours[1]) == _drop_volatile(up[1]), path
    status, props = await pair.ours.get("/props")
    assert props["model_path"] == str(tiny_models.alpha) and "is_sleeping" in props
    assert (await pair.ours.get("/metrics"))[0] == 501  # no --metrics: llama-server's 501
    status, models = await pair.ours.get("/v1/models")
    assert [(m["id"], m["aliases"], m["tags"]) for m in models["data"]] == [("a", ["a", "b", "c"], ["t1", "t2"])]
    # The router's own list and metrics stay reachable on their own paths.
    status, own = await pair.ours.get("/llamarouter/models")
    assert status == 200 and own["data"][0]["status"]["value"] == "loaded"
    status, text = await pair.ours.get("/llamarouter/metrics")
    assert status == 200 and "llamarouter_" in text


async def test_single_model_metrics_with_flag(start_pair: StartPair, tiny_models: TinyModels) -> None:
    pair = await start_pair(*single_args(tiny_models, "--metrics"))
    for who, router in pair.both():
        async with router.session.get(router.url + "/metrics") as resp:
            assert resp.status == 200, who
            assert "llamacpp:prompt_tokens_total" in await resp.text(), who


# ---------------------------------------------------------------------------
# 12. a model file that cannot load says why


async def test_corrupt_model_failure_says_why(start_pair: StartPair, tmp_path: Path) -> None:
    models = tmp_path / "broken-models"
    models.mkdir()
    (models / "broken.gguf").write_bytes(b"NOPE" + bytes(1020))
    pair = await start_pair("--models-dir", str(models), *BASE_ARGS)
    answers = {}
    for who, router in pair.both():
        status, body = await router.chat("broken", max_tokens=1)
        answers[who] = (status, body)
        item = await router.wait_status("broken", "unloaded")
        answers[who + " status"] = item["status"]
    up_status, up_body = answers["upstream"]
    assert up_status >= 400, up_body
    assert answers["upstream status"].get("failed") is True
    ours = answers["llamarouter status"]
    assert ours.get("failed") is True and ours.get("exit_code") == answers["upstream status"]["exit_code"]
    # Upstream only says "failed to load"; the cause is in our status (a documented addition).
    assert ours["cause"] == "invalid magic characters: 'NOPE', expected 'GGUF'"


# ---------------------------------------------------------------------------
# 13. Google Cloud Vertex AI compatibility (AIP_MODE=PREDICTION)

GCP_ENV = {"AIP_MODE": "PREDICTION", "AIP_HTTP_PORT": "{port}", "AIP_HEALTH_ROUTE": "healthz"}


@pytest.mark.parametrize("mode", ["router", "single"])
async def test_gcp_predict_matches(start_pair: StartPair, tiny_models: TinyModels, mode: str) -> None:
    args = models_args(tiny_models) if mode == "router" else single_args(tiny_models)
    pair = await start_pair(*args, env=GCP_ENV)
    chat = {"model": "alpha", "messages": MESSAGES, "max_tokens": 3, "temperature": 0, "seed": 5}
    body = {"instances": [
        {"@requestFormat": "chatCompletions", **chat, "stream": True},
        {"@requestFormat": "/tokenize", "model": "alpha", "content": "hello"},
        {"@requestFormat": "nope", "model": "alpha"},
        "not an object",
        {"model": "alpha"},
    ]}
    answers = {}
    for who, router in pair.both():
        status, got = await router.post("/predict", body)
        assert status == 200, (who, got)
        predictions = got["predictions"]
        predictions[0] = normalise_completion(predictions[0])
        answers[who] = predictions
        assert (await router.get("/healthz"))[0] == 200, who
        for bad in ({"instances": {}}, [1], {"instances": [{}] * 129}):
            answers[who].append(error_view(*await router.post("/predict", bad)))
    up, ours = answers["upstream"], answers["llamarouter"]
    assert up[2] == {"error": {"code": 400, "message": "no handler registered for @requestFormat: nope",
                               "type": "invalid_request_error"}}
    assert ours[0]["object"] == "chat.completion" and ours[1]["tokens"]
    if mode == "router":
        # Upstream's router children inherit AIP_MODE and try to listen on the router's own
        # port, so every model fails to load: a documented difference (docs/api.md).
        assert up[0] == up[1] == {"error": {"code": 500, "message": "model name=alpha failed to load",
                                            "type": "server_error"}}
        up, ours = up[2:], ours[2:]
    assert ours == up


# ---------------------------------------------------------------------------
# 14. --api-prefix


@pytest.mark.parametrize("mode", ["router", "single"])
async def test_api_prefix_matches(start_pair: StartPair, tiny_models: TinyModels, mode: str) -> None:
    args = models_args(tiny_models) if mode == "router" else single_args(tiny_models)
    pair = await start_pair(*args, "--api-prefix", "/llama", health_path="/llama/health")
    request = {"model": "alpha", "messages": MESSAGES, "max_tokens": 3, "temperature": 0, "seed": 9}
    answers: dict[str, list[Any]] = {}
    for who, router in pair.both():
        view: list[Any] = []
        status, body = await router.post("/llama/v1/chat/completions", request)
        view.append((status, normalise_completion(body) if status == 200 else body))
        view.append(await router.post("/llama/tokenize", {"model": "alpha", "content": "hello"}))
        view.append((await router.get("/llama/props?model=alpha"))[0])
        view.append(await router.get("/v1/models"))  # outside the prefix
        view.append(await router.post("/v1/chat/completions", request))
        view.append(await router.get("/llama/health"))
        answers[who] = view
    assert answers["upstream"][0][0] == 200 and answers["upstream"][3][0] == 404
    assert answers["llamarouter"] == answers["upstream"]


# ---------------------------------------------------------------------------
# 15. --path: static files in place of the web UI


async def test_static_path_matches(start_pair: StartPair, tiny_models: TinyModels, tmp_path: Path) -> None:
    site = tmp_path / "site"
    (site / "sub").mkdir(parents=True)
    (site / "index.html").write_text("<p>home</p>")
    (site / "sub" / "a.txt").write_text("hello")
    (tmp_path / "secret.txt").write_text("secret")
    # The type each file is served with: llama-server's own table, not the host's MIME files.
    typed = ("app.js", "app.mjs", "style.css", "data.json", "logo.svg", "icon.png", "font.woff2",
             "site.webmanifest", "model.gguf", "archive.tar.gz", "NOEXT", "PAGE.HTML", "x.wasm")
    for name in typed:
        (site / name).write_bytes(b"x")
    pair = await start_pair(*models_args(tiny_models, "--path", str(site)))
    answers = {}
    for who, router in pair.both():
        view = []
        for path in ("/", "/index.html", "/sub/a.txt", "/sub/missing.txt", "/../secret.txt",
                     "/sub/../../secret.txt", "/models", *(f"/{name}" for name in typed)):
            async with router.session.get(router.url + path) as resp:
                body = await resp.read()
                ctype = resp.headers.get("Content-Type") if path != "/models" else None
                view.append((path, resp.status, ctype, body if resp.status == 200 and path != "/models" else b""))
        answers[who] = view
    assert answers["upstream"][0] == ("/", 200, "text/html", b"<p>home</p>")
    assert answers["llamarouter"] == answers["upstream"]
