"""Tests for the fake llama-server used by the supervisor tests.

Every fake runs as a real subprocess in its own session/process group; the
``spawn`` fixture SIGKILLs each group at teardown and asserts nothing of it
survived.  All waiting goes through ``wait_for`` (no sleeps).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.fakes.helpers import (
    FAKE_SERVER_SCRIPT,
    fake_server_command,
    free_port,
    sidecar_path,
    wait_for,
    write_fake_model,
    write_fake_server_bin,
)

pytestmark = pytest.mark.timeout(60)

LOADING_503 = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}
CHAT = {"model": "client-model", "messages": [{"role": "user", "content": "hello"}]}


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@dataclass
class Fake:
    proc: asyncio.subprocess.Process
    port: int
    stderr_path: Path
    stdout_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    async def wait_exit(self, timeout: float = 10.0) -> int:
        return await asyncio.wait_for(self.proc.wait(), timeout)


def _live_group_members(pgid: int) -> list[int]:
    alive = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(p.pid)
        except (OSError, psutil.Error):
            pass
    return alive


@pytest.fixture
async def spawn(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Fake]]]:
    started: list[Fake] = []

    async def _spawn(*args: str, env: dict[str, str] | None = None, port: int | None = None) -> Fake:
        port = port or free_port()
        n = len(started)
        stderr_path = tmp_path / f"fake{n}.stderr"
        stdout_path = tmp_path / f"fake{n}.stdout"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_LLAMA_")}
        full_env.update(env or {})
        with open(stderr_path, "wb") as err, open(stdout_path, "wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *fake_server_command(), "--host", "127.0.0.1", "--port", str(port), *args,
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=full_env,
                start_new_session=True,
            )
        fake = Fake(proc, port, stderr_path, stdout_path)
        started.append(fake)
        return fake

    yield _spawn

    for fake in started:
        if fake.proc.returncode is None:
            try:
                os.killpg(fake.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        await fake.wait_exit(10)
        try:  # grandchildren outlive their parent: kill the whole group
            os.killpg(fake.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        fake.proc._transport.close()  # type: ignore[attr-defined]  # avoid ResourceWarning
    for fake in started:
        await wait_for(
            lambda: not _live_group_members(fake.pid), 5,
            message=f"process group {fake.pid} to die",
        )
        assert fake.proc.returncode is not None


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, object]:
    async with http.get(url) as r:
        return r.status, await r.json(content_type=None)


async def post_json(http: aiohttp.ClientSession, url: str, body: object) -> tuple[int, object]:
    async with http.post(url, json=body) as r:
        return r.status, await r.json(content_type=None)


async def stats(http: aiohttp.ClientSession, fake: Fake) -> dict:
    status, data = await get_json(http, fake.url("/fake/stats"))
    assert status == 200
    return data  # type: ignore[return-value]


async def wait_ready(http: aiohttp.ClientSession, fake: Fake, timeout: float = 10.0) -> None:
    async def healthy() -> bool:
        if fake.proc.returncode is not None:
            raise AssertionError(f"fake exited with {fake.proc.returncode}:\n{fake.log()}")
        async with http.get(fake.url("/health")) as r:
            return r.status == 200

    await wait_for(healthy, timeout, ignore=(aiohttp.ClientConnectionError,), message="/health 200")


async def wait_listening(http: aiohttp.ClientSession, fake: Fake, timeout: float = 10.0) -> dict:
    """Until the debug endpoint answers (also while loading or hung)."""

    async def up() -> dict:
        if fake.proc.returncode is not None:
            raise AssertionError(f"fake exited with {fake.proc.returncode}:\n{fake.log()}")
        return await stats(http, fake)

    return await wait_for(up, timeout, ignore=(aiohttp.ClientConnectionError,), message="/fake/stats")


async def read_sse(resp: aiohttp.ClientResponse) -> list[str]:
    """All ``data:`` payloads of an event stream, in order."""
    events = []
    async for raw in resp.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("data: "):
            events.append(line[len("data: "):])
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


# ---------------------------------------------------------------------------
# loading / readiness
# ---------------------------------------------------------------------------


async def test_loading_answers_503_everywhere(spawn, http):
    fake = await spawn("--fake-load-secs", "60", "--fake-log-interval", "0.02", "-m", "/nonexistent/m.gguf")
    st = await wait_listening(http, fake)
    assert st["ready"] is False
    for method, path in [("GET", "/health"), ("GET", "/v1/models"), ("GET", "/props"),
                         ("POST", "/v1/chat/completions")]:
        async with http.request(method, fake.url(path), json=CHAT) as r:
            assert r.status == 503, path
            assert await r.json() == LOADING_503
    # progress lines keep coming while loading (stall detection relies on it)
    await wait_for(lambda: fake.log().count("load_tensors: loading model tensors") >= 3, 5)
    log = fake.log()
    assert "llama_model_loader: loaded meta data" in log
    assert "srv    load_model: loading model '/nonexistent/m.gguf'" in log
    # like old llama-server, "HTTP server is listening" is printed before loading
    assert "HTTP server is listening" in log
    assert "starting the main loop" not in log and "all slots are idle" not in log


async def test_becomes_ready_after_load_secs(spawn, http):
    t0 = time.monotonic()
    fake = await spawn("--fake-load-secs", "0.8")
    await wait_ready(http, fake)
    assert time.monotonic() - t0 >= 0.8
    status, body = await get_json(http, fake.url("/health"))
    assert (status, body) == (200, {"status": "ok"})
    log = fake.log()
    loading = log.index("main: loading model")
    listening = log.index(f"main: server is listening on http://127.0.0.1:{fake.port} - starting the main loop")
    idle = log.index("srv  update_slots: all slots are idle")
    assert loading < listening < idle
    assert fake.stdout_path.read_text() == ""  # llama-server logs to stderr only


async def test_silent_prints_nothing_while_loading(spawn, http):
    fake = await spawn("--fake-silent", "--fake-load-secs", "60", "--fake-log-interval", "0.02")
    await wait_listening(http, fake)

    async def loading_for_a_while() -> bool:
        return (await stats(http, fake))["uptime"] >= 0.4

    await wait_for(loading_for_a_while, 5)
    assert fake.log() == ""


# ---------------------------------------------------------------------------
# inference endpoints
# ---------------------------------------------------------------------------


async def test_chat_streaming_chunk_per_token_then_done(spawn, http):
    fake = await spawn("--fake-tokens", "5", "--fake-tps", "500")
    await wait_ready(http, fake)
    async with http.post(fake.url("/v1/chat/completions"), json={**CHAT, "stream": True}) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = await read_sse(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "client-model" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    content = [c["choices"][0]["delta"]["content"] for c in chunks if c["choices"][0]["delta"].get("content")]
    assert len(content) == 5
    assert "".join(content) == "tok0 tok1 tok2 tok3 tok4"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert len({c["id"] for c in chunks}) == 1

    # max_tokens limits, non-streaming shape
    status, body = await post_json(http, fake.url("/chat/completions"), {**CHAT, "max_tokens": 2})
    assert status == 200
    assert body["object"] == "chat.completion" and body["model"] == "client-model"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "tok0 tok1"}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 2


async def test_completion_endpoints(spawn, http):
    fake = await spawn("--fake-tokens", "3", "--alias", "my-alias")
    await wait_ready(http, fake)

    status, body = await post_json(http, fake.url("/completion"), {"prompt": "hi", "n_predict": 2})
    assert status == 200
    assert body["content"] == "tok0 tok1" and body["stop"] is True
    assert body["tokens_predicted"] == 2 and body["stop_type"] == "limit"
    assert body["model"] == "my-alias"

    async with http.post(fake.url("/completion"), json={"prompt": "hi", "stream": True}) as r:
        events = [json.loads(e) for e in await read_sse(r)]  # native: no [DONE]
    assert [e["content"] for e in events] == ["tok0", " tok1", " tok2", ""]
    assert [e["stop"] for e in events] == [False, False, False, True]

    status, body = await post_json(http, fake.url("/v1/completions"), {"prompt": "hi", "model": "x"})
    assert body["object"] == "text_completion" and body["model"] == "x"
    assert body["choices"][0]["text"] == "tok0 tok1 tok2"

    async with http.post(fake.url("/completions"), json={"prompt": "hi", "stream": True}) as r:
        events = await read_sse(r)
    assert events[-1] == "[DONE]"
    texts = [json.loads(e)["choices"][0]["text"] for e in events[:-1]]
    assert texts == ["tok0", " tok1", " tok2", ""]

    for path in ("/v1/embeddings", "/embeddings"):
        status, body = await post_json(http, fake.url(path), {"input": ["a", "b"], "model": "e"})
        assert status == 200 and body["object"] == "list" and body["model"] == "e"
        assert [d["index"] for d in body["data"]] == [0, 1]
        assert all(len(d["embedding"]) == 8 for d in body["data"])
        assert body["data"][0]["embedding"] != body["data"][1]["embedding"]

    st = await stats(http, fake)
    assert st["completed_inference"] == 6
    assert st["requests"]["/completion"] == 2


async def test_other_endpoints_and_flag_tolerance(spawn, http):
    fake = await spawn(
        "--alias", "qwen", "-m", "/models/Qwen-7B.gguf", "-c", "8192", "-ngl", "99", "--temp", "0.5",
        "--jinja", "--no-webui", "--mmproj", "/models/mmproj.gguf", "--model-draft", "/models/d.gguf",
        "--log-colors", "off", "--seed", "-1", "-fa", "on", "--cache-type-k=q8_0", "--metrics",
        "--chat-template-kwargs", '{"enable_thinking":false}', "-np", "2", "--some-future-switch",
    )
    await wait_ready(http, fake)

    status, models = await get_json(http, fake.url("/v1/models"))
    assert status == 200 and models["object"] == "list"
    entry = models["data"][0]
    assert entry["id"] == "qwen" and entry["object"] == "model" and entry["owned_by"] == "llamacpp"
    assert isinstance(entry["created"], int)
    assert {"n_params", "size", "n_ctx_train"} <= set(entry["meta"])
    assert models["models"][0]["name"] == "qwen"
    assert (await get_json(http, fake.url("/models")))[1] == models

    _, props = await get_json(http, fake.url("/props"))
    assert props["default_generation_settings"]["n_ctx"] == 8192
    assert props["total_slots"] == 2
    assert props["model_path"] == "/models/Qwen-7B.gguf"
    assert props["build_info"] == "fake"
    assert props["modalities"]["vision"] is True

    _, slots = await get_json(http, fake.url("/slots"))
    assert [s["id"] for s in slots] == [0, 1] and slots[0]["is_processing"] is False

    async with http.get(fake.url("/metrics")) as r:
        assert r.status == 200
        metrics = await r.text()
    for gauge in ("requests_processing", "requests_deferred", "kv_cache_usage_ratio"):
        assert f"# TYPE llamacpp:{gauge} gauge" in metrics
        assert f"\nllamacpp:{gauge} 0" in metrics

    _, tok = await post_json(http, fake.url("/tokenize"), {"content": "hé"})
    assert tok == {"tokens": list("hé".encode())}
    _, detok = await post_json(http, fake.url("/detokenize"), tok)
    assert detok == {"content": "hé"}
    _, tmpl = await post_json(http, fake.url("/apply-template"), {"messages": CHAT["messages"]})
    assert "hello" in tmpl["prompt"]
    assert (await get_json(http, fake.url("/lora-adapters"))) == (200, [])

    status, body = await get_json(http, fake.url("/no/such/endpoint"))
    assert status == 404 and body["error"]["type"] == "not_found_error"

    async with http.post(fake.url("/v1/chat/completions"), data=b"{not json",
                         headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        err = (await r.json())["error"]
    assert err["code"] == 400 and err["type"] == "invalid_request_error" and err["message"]

    async with http.get(fake.url("/health")) as r:
        assert r.headers["Server"] == "llama.cpp"


async def test_stats_record_forwarded_headers_and_body(spawn, http):
    fake = await spawn()
    await wait_ready(http, fake)
    async with http.post(fake.url("/v1/chat/completions?x=1"), json=CHAT,
                         headers={"X-Proxy-Test": "yes", "Authorization": "Bearer abc"}) as r:
        assert r.status == 200
    await get_json(http, fake.url("/health"))  # monitoring GETs don't overwrite last_*
    st = await stats(http, fake)
    assert st["last_headers"]["x-proxy-test"] == "yes"
    assert st["last_headers"]["authorization"] == "Bearer abc"
    assert st["last_request"]["path"] == "/v1/chat/completions"
    assert st["last_request"]["query"] == "x=1"
    assert st["last_request"]["json"] == CHAT
    assert "x-proxy-test" not in st["headers_by_path"]["/health"]
    assert st["requests"]["/v1/chat/completions"] == 1
    assert "/fake/stats" not in st["requests"]


async def test_api_key(spawn, http):
    fake = await spawn("--api-key", "sekrit")
    await wait_ready(http, fake)  # /health is public
    assert (await get_json(http, fake.url("/v1/models")))[0] == 200
    status, body = await post_json(http, fake.url("/v1/chat/completions"), CHAT)
    assert status == 401 and body["error"]["type"] == "authentication_error"
    async with http.post(fake.url("/v1/chat/completions"), json=CHAT,
                         headers={"Authorization": "Bearer sekrit"}) as r:
        assert r.status == 200


async def test_single_slot_defers_concurrent_requests(spawn, http):
    fake = await spawn("--fake-tokens", "10000", "--fake-tps", "100")
    await wait_ready(http, fake)
    first = await http.post(fake.url("/v1/chat/completions"), json={**CHAT, "stream": True})
    second = asyncio.create_task(http.post(fake.url("/v1/chat/completions"), json={**CHAT, "stream": True}))

    async def queued() -> bool:
        async with http.get(fake.url("/metrics")) as r:
            text = await r.text()
        return "llamacpp:requests_processing 1\n" in text and "llamacpp:requests_deferred 1\n" in text

    await wait_for(queued, 5)
    second.cancel()
    with pytest.raises(asyncio.CancelledError):
        await second
    await wait_for(lambda: _deferred_zero(http, fake), 5)
    first.close()
    await wait_for(lambda: _streams_closed(http, fake, 1), 5)


async def _deferred_zero(http, fake) -> bool:
    return (await stats(http, fake))["deferred"] == 0


async def _streams_closed(http, fake, cancelled: int) -> bool:
    st = await stats(http, fake)
    return st["cancelled_streams"] == cancelled and st["open_streams"] == 0 and st["processing"] == 0


async def test_client_disconnect_cancels_stream(spawn, http):
    fake = await spawn("--fake-tokens", "1000", "--fake-tps", "50")
    await wait_ready(http, fake)
    resp = await http.post(fake.url("/v1/chat/completions"), json={**CHAT, "stream": True})
    assert resp.status == 200
    seen = 0
    async for raw in resp.content:
        if b'"content":"tok0"' in raw:
            seen += 1
            break
    assert seen == 1
    assert (await stats(http, fake))["open_streams"] == 1
    resp.close()  # drop the connection mid-stream
    await wait_for(lambda: _streams_closed(http, fake, 1), 5, message="cancelled_streams == 1")
    st = await stats(http, fake)
    assert st["completed_inference"] == 0
    assert "client disconnected" in fake.log()


# ---------------------------------------------------------------------------
# failure knobs
# ---------------------------------------------------------------------------


async def test_crash_after_exits_with_exit_code(spawn, http):
    fake = await spawn("--fake-crash-after", "2", "--fake-exit-code", "3", "--fake-tokens", "2")
    await wait_ready(http, fake)
    status, body = await post_json(http, fake.url("/v1/chat/completions"), CHAT)
    assert status == 200 and body["choices"][0]["message"]["content"] == "tok0 tok1"
    assert (await get_json(http, fake.url("/health")))[0] == 200
    async with http.post(fake.url("/v1/chat/completions"), json={**CHAT, "stream": True}) as r:
        events = await read_sse(r)  # the 2nd (crashing) response is still delivered whole
    assert events[-1] == "[DONE]"
    assert await fake.wait_exit(5) == 3
    assert "simulated crash after 2 inference requests" in fake.log()


async def test_crash_on_start_exits_immediately(spawn):
    fake = await spawn("--fake-crash-on-start", "--fake-exit-code", "7", "-m", "/m/broken.gguf")
    assert await fake.wait_exit(5) == 7
    log = fake.log()
    assert "failed to load model" in log and "exiting due to model loading error" in log
    assert "listening" not in log  # never bound


async def test_crash_on_start_after_loading(spawn, http):
    t0 = time.monotonic()
    fake = await spawn("--fake-crash-on-start", "--fake-load-secs", "0.5")
    assert await fake.wait_exit(10) == 1
    assert time.monotonic() - t0 >= 0.5
    log = fake.log()
    assert log.index("HTTP server is listening") < log.index("failed to load model")


async def test_ignore_sigterm_survives_sigterm(spawn, http):
    fake = await spawn("--fake-ignore-sigterm")
    await wait_ready(http, fake)
    os.kill(fake.pid, signal.SIGTERM)  # SIG_IGN: discarded by the kernel at once
    status, body = await get_json(http, fake.url("/health"))
    assert (status, body) == (200, {"status": "ok"})
    st = await stats(http, fake)
    assert st["shutting_down"] is False and fake.proc.returncode is None
    os.kill(fake.pid, signal.SIGKILL)
    assert await fake.wait_exit(5) == -signal.SIGKILL


async def test_sigterm_finishes_streams_and_exits_zero(spawn, http):
    fake = await spawn("--fake-tokens", "400", "--fake-tps", "40")  # would take 10 s
    await wait_ready(http, fake)
    t0 = time.monotonic()
    async with http.post(fake.url("/v1/chat/completions"), json={**CHAT, "stream": True}) as r:
        first = await r.content.readline()
        assert b'"role":"assistant"' in first
        os.kill(fake.pid, signal.SIGTERM)
        events = await read_sse(r)
    assert events[-1] == "[DONE]"
    tokens = [e for e in events[:-1] if json.loads(e)["choices"][0]["delta"].get("content")]
    assert len(tokens) == 400
    assert await fake.wait_exit(5) == 0
    assert time.monotonic() - t0 < 5
    assert "cleaning up before exit" in fake.log()


async def test_hang_accepts_but_never_answers(spawn, http):
    fake = await spawn("--fake-hang")
    await wait_for(lambda: _ready_and_hanging(http, fake), 10,
                   ignore=(aiohttp.ClientConnectionError,))
    with pytest.raises(asyncio.TimeoutError):
        async with http.get(fake.url("/health"), timeout=aiohttp.ClientTimeout(total=0.3)):
            pass
    st = await stats(http, fake)
    assert st["requests"]["/health"] >= 1  # the request did arrive


async def _ready_and_hanging(http, fake) -> bool:
    st = await stats(http, fake)
    return st["ready"] and st["hanging"]


async def test_hang_after_n_requests(spawn, http):
    fake = await spawn("--fake-hang-after", "1")
    await wait_ready(http, fake)
    assert (await post_json(http, fake.url("/v1/chat/completions"), CHAT))[0] == 200
    with pytest.raises(asyncio.TimeoutError):
        async with http.get(fake.url("/health"), timeout=aiohttp.ClientTimeout(total=0.3)):
            pass
    assert (await stats(http, fake))["hanging"] is True


async def test_bind_fail_knob(spawn):
    fake = await spawn("--fake-bind-fail")
    assert await fake.wait_exit(5) == 1
    assert f"couldn't bind HTTP server socket, hostname: 127.0.0.1, port: {fake.port}" in fake.log()


async def test_port_in_use_fails_like_llama_server(spawn):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        fake = await spawn(port=busy.getsockname()[1])
        assert await fake.wait_exit(10) == 1
    assert "couldn't bind HTTP server socket" in fake.log()


async def test_spawn_grandchild_shares_process_group(spawn, http):
    fake = await spawn("--fake-spawn-grandchild")
    await wait_ready(http, fake)
    gpid = (await stats(http, fake))["grandchild_pid"]
    assert isinstance(gpid, int)
    grandchild = psutil.Process(gpid)
    assert grandchild.ppid() == fake.pid
    assert os.getpgid(gpid) == fake.pid  # fake leads its own group (start_new_session)
    os.killpg(fake.pid, signal.SIGKILL)
    assert await fake.wait_exit(5) == -signal.SIGKILL

    def grandchild_gone() -> bool:
        try:
            return grandchild.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    await wait_for(grandchild_gone, 5)


# ---------------------------------------------------------------------------
# knob sources
# ---------------------------------------------------------------------------


async def test_knob_precedence_env_sidecar_cli(spawn, http, tmp_path):
    model = write_fake_model(tmp_path / "m.gguf", tokens=3, crash_after=5)
    fake = await spawn(
        "-m", str(model), "--fake-crash-after", "4",
        env={"FAKE_LLAMA_TOKENS": "7", "FAKE_LLAMA_EXIT_CODE": "9"},
    )
    await wait_ready(http, fake)
    knobs = (await stats(http, fake))["knobs"]
    assert knobs["tokens"] == 3  # sidecar beats env
    assert knobs["exit_code"] == 9  # env beats default
    assert knobs["crash_after"] == 4  # CLI beats sidecar
    _, body = await post_json(http, fake.url("/v1/chat/completions"), CHAT)
    assert body["choices"][0]["message"]["content"] == "tok0 tok1 tok2"
    _, models = await get_json(http, fake.url("/v1/models"))
    assert models["data"][0]["id"] == "m.gguf"  # no alias: model basename


async def test_sidecar_crash_knobs_apply(spawn, http, tmp_path):
    model = write_fake_model(tmp_path / "crashy.gguf", crash_after=1, exit_code=42)
    fake = await spawn("--model", str(model))
    await wait_ready(http, fake)
    assert (await post_json(http, fake.url("/v1/embeddings"), {"input": "x"}))[0] == 200
    assert await fake.wait_exit(5) == 42


@pytest.mark.parametrize(
    "args, sidecar, message",
    [
        (["--fake-no-such-knob", "1"], None, "unknown fake flag"),
        (["--fake-tokens", "many"], None, "bad value"),
        ([], "{not json", "not valid JSON"),
        ([], '{"tokenz": 3}', "unknown knob 'tokenz'"),
    ],
)
async def test_bad_knobs_exit_2(spawn, tmp_path, args, sidecar, message):
    model = tmp_path / "bad.gguf"
    model.write_bytes(b"GGUF")
    if sidecar is not None:
        sidecar_path(model).write_text(sidecar)
    fake = await spawn("-m", str(model), *args)
    assert await fake.wait_exit(5) == 2
    assert message in fake.log()


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def test_parse_args_tolerates_llama_server_flags():
    from tests.fakes.fake_llama_server import ConfigError, parse_args

    opts, knobs = parse_args(
        ["--host", "0.0.0.0", "--port=9000", "-a", "al", "--model", "/m.gguf", "-c", "0",
         "--seed", "-1", "--temp", "0.5", "--jinja", "--lora", "x.gguf", "-np", "-1",
         "--fake-hang", "--fake-silent", "no", "--fake-tps=2.5", "--fake-exit-code", "-3",
         "--unknown-switch", "--api-key", "k1,k2", "stray"],
        environ={"LLAMA_ARG_PORT": "1234", "LLAMA_ARG_CTX_SIZE": "77"},
    )
    assert (opts["host"], opts["port"], opts["alias"], opts["model"]) == ("0.0.0.0", 9000, "al", "/m.gguf")
    assert opts["ctx_size"] == 2048 and opts["parallel"] == 1  # 0 / -1 mean "auto"
    assert opts["api_key"] == "k1,k2"
    assert knobs == {"hang": True, "silent": False, "tps": 2.5, "exit_code": -3}
    opts, _ = parse_args([], environ={"LLAMA_ARG_PORT": "1234", "LLAMA_ARG_CTX_SIZE": "77"})
    assert (opts["port"], opts["ctx_size"]) == (1234, 77)
    with pytest.raises(ConfigError):
        parse_args(["--fake-tokens"])
    with pytest.raises(ConfigError):
        parse_args(["--port", "http"])


def test_fake_server_command_and_bin(tmp_path):
    cmd = fake_server_command()
    assert cmd == [sys.executable, str(FAKE_SERVER_SCRIPT)] and Path(cmd[1]).is_absolute()
    wrapper = write_fake_server_bin(tmp_path / "bin")
    assert wrapper == tmp_path / "bin" / "fake-llama-server"
    assert os.access(wrapper, os.X_OK)
    assert wrapper.read_text().startswith("#!/bin/sh\nexec ")
    r = subprocess.run(
        [str(wrapper), "--port", "1", "-m", "x.gguf", "--fake-crash-on-start", "--fake-exit-code", "5"],
        capture_output=True, text=True, timeout=20,
    )
    assert r.returncode == 5 and "failed to load model" in r.stderr and r.stdout == ""


def test_write_fake_model(tmp_path):
    import gguf

    model = write_fake_model(tmp_path / "sub" / "tiny-Q4_K_M.gguf", load_secs=0.5, crash_after=3)
    assert model.name.endswith(".gguf") and 0 < model.stat().st_size < 1024
    assert json.loads(sidecar_path(model).read_text()) == {"crash_after": 3, "load_secs": 0.5}
    reader = gguf.GGUFReader(str(model))
    arch = reader.fields["general.architecture"]
    assert bytes(arch.parts[arch.data[0]]).decode() == "llama"
    write_fake_model(model)  # rewriting clears the knobs
    assert json.loads(sidecar_path(model).read_text()) == {}
    with pytest.raises(ValueError, match="loads_secs"):
        write_fake_model(model, loads_secs=1)


async def test_wait_for():
    calls = []

    def sync_pred():
        calls.append(1)
        return len(calls) >= 3 and "done"

    assert await wait_for(sync_pred, 5) == "done"

    async def async_pred():
        return 42

    assert await wait_for(async_pred, 1) == 42

    with pytest.raises(TimeoutError, match="waiting for never"):
        await wait_for(lambda: False, 0.05, message="never")

    async def stuck():
        await asyncio.get_running_loop().create_future()

    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await wait_for(stuck, 0.1)
    assert time.monotonic() - t0 < 2

    def boom():
        raise ConnectionRefusedError("nope")

    with pytest.raises(TimeoutError, match="ConnectionRefusedError"):
        await wait_for(boom, 0.05, ignore=(ConnectionRefusedError,))
    with pytest.raises(ConnectionRefusedError):
        await wait_for(boom, 0.05)


def test_free_port():
    port = free_port()
    assert 1024 <= port <= 65535
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
