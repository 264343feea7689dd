"""Bad input: every case gets a clear OpenAI-shaped 4xx (or the connection is dropped),
nothing reaches the filesystem or a child's command line, and the router keeps serving
other clients throughout (checked with /health and a real chat between cases)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import psutil

from tests.conftest import Router, StartRouter
from tests.fakes.helpers import wait_for, write_fake_model

MAX_BODY = 64 * 1024
CHAT = "/v1/chat/completions"
ERROR_TYPES = {"invalid_request_error", "not_found_error", "authentication_error"}


def models(tmp_path: Path, **knobs_by_name: dict[str, Any]) -> Path:
    d = tmp_path / "models"
    for name, knobs in knobs_by_name.items():
        write_fake_model(d / f"{name}.gguf", **knobs)
    return d


async def still_serving(r: Router, model: str = "alpha") -> None:
    assert r.proc.returncode is None, r.log()[-2000:]
    assert (await r.get("/health"))[0] == 200
    status, body = await r.chat(model, max_tokens=2)
    assert status == 200, body


def assert_openai_error(status: int, body: Any, code: int, what: object) -> None:
    assert status == code, (what, status, body)
    assert isinstance(body, dict) and set(body) == {"error"}, (what, body)
    err = body["error"]
    assert err["code"] == code and isinstance(err["message"], str) and err["message"], (what, body)
    assert err["type"] in ERROR_TYPES, (what, body)


async def raw_request(r: Router, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes on a fresh connection; return everything until the server closes or
    `timeout` passes (whichever first)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(1 << 20), timeout)
    finally:
        writer.close()


# ------------------------------------------------------------------------ bodies
BAD_BODIES: list[tuple[str, bytes, str, int, str]] = [
    # (label, body, content type, status, message prefix)
    ("malformed JSON", b"{not json", "application/json", 400, "invalid JSON in request body"),
    ("empty body", b"", "application/json", 400, "invalid JSON in request body"),
    ("truncated JSON", b'{"model": "alpha"', "application/json", 400, "invalid JSON in request body"),
    ("JSON array", b'["alpha"]', "application/json", 400, "model name is missing"),
    ("JSON string", b'"alpha"', "application/json", 400, "model name is missing"),
    ("JSON null", b"null", "application/json", 400, "model name is missing"),
    ("JSON number", b"42", "application/json", 400, "model name is missing"),
    ("missing model", b'{"messages": []}', "application/json", 400, "model name is missing"),
    ("empty model", b'{"model": ""}', "application/json", 400, "model name is missing"),
    ("model is a number", b'{"model": 7}', "application/json", 400, "model name is missing"),
    ("model is null", b'{"model": null}', "application/json", 400, "model name is missing"),
    ("model is a list", b'{"model": ["alpha"]}', "application/json", 400, "model name is missing"),
    ("model is an object", b'{"model": {"name": "alpha"}}', "application/json", 400, "model name is missing"),
    ("unknown model", b'{"model": "nope"}', "application/json", 400, "model 'nope' not found"),
    ("invalid UTF-8", b'{"model": "al\xffpha"}', "application/json", 400, "invalid JSON in request body"),
    # What Python's json takes and llama-server's parser refuses is refused here, before
    # a model is looked up or loaded for it.
    ("UTF-16 body", '{"model": "alpha"}'.encode("utf-16"), "application/json", 400, "invalid JSON in request body"),
    ("lone surrogate escape", b'{"model": "\\ud800"}', "application/json", 400, "invalid JSON in request body"),
    ("lone surrogate elsewhere", b'{"model": "alpha", "x": ["\\uDC00"]}', "application/json", 400,
     "invalid JSON in request body"),
    ("NaN", b'{"model": "alpha", "temperature": NaN}', "application/json", 400, "invalid JSON in request body"),
    ("Infinity", b'{"model": "alpha", "top_p": -Infinity}', "application/json", 400, "invalid JSON in request body"),
    ("float overflow", b'{"model": "alpha", "top_p": 1e400}', "application/json", 400, "invalid JSON in request body"),
    ("integer overflow", b'{"model": "alpha", "seed": ' + b"9" * 400 + b"}", "application/json", 400,
     "invalid JSON in request body"),
    # Deeper than Python's parser goes (llama-server's goes on): a clear 400, not a 500.
    ("nested too deeply", b'{"model": "alpha", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}", "application/json", 400,
     "invalid JSON in request body: nested too deeply"),
    ("form-encoded", b"model=alpha", "application/x-www-form-urlencoded", 400, "invalid JSON in request body"),
    ("multipart without model", b"--b\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\n1\r\n--b--\r\n",
     "multipart/form-data; boundary=b", 400, "model name is missing"),
    ("XML", b"<model>alpha</model>", "application/xml", 400, "invalid JSON in request body"),
]


async def test_bad_bodies_get_openai_shaped_400(tmp_path: Path, start_router: StartRouter) -> None:
    d = models(tmp_path, alpha={"tokens": 3})
    r = await start_router("--models-dir", str(d), "--max-body-bytes", str(MAX_BODY))
    await still_serving(r)
    for label, body, ctype, code, message in BAD_BODIES:
        for path in (CHAT, "/v1/completions", "/v1/embeddings", "/tokenize"):
            status, got = await r.post(path, data=body, headers={"Content-Type": ctype})
            assert_openai_error(status, got, code, (label, path))
            assert got["error"]["message"].startswith(message), (label, got)
        await still_serving(r)
    # /models/load and /models/unload: a non-object or unparsable body is a 4xx as well
    # (an empty one is invalid JSON there too, as in llama-server).
    for label, body, ctype, _, message in BAD_BODIES:
        for path in ("/models/load", "/models/unload"):
            status, got = await r.post(path, data=body, headers={"Content-Type": ctype})
            assert 400 <= status < 500, (label, path, status, got)
            assert_openai_error(status, got, status, (label, path))
            if message.startswith("invalid JSON"):
                assert got["error"]["message"].startswith(message), (label, path, got)
    assert "unhandled error" not in r.log()
    assert (await r.models())["alpha"]["status"]["value"] == "loaded"
    # The content type is not checked for JSON routes (as upstream): JSON sent as
    # text/plain is routed normally.
    status, got = await r.post(
        CHAT, data=json.dumps({"model": "alpha", "messages": [{"role": "user", "content": "x"}]}),
        headers={"Content-Type": "text/plain"},
    )
    assert status == 200, got
    await still_serving(r)


async def test_a_body_the_child_would_refuse_loads_nothing(tmp_path: Path, start_router: StartRouter) -> None:
    # Refused before routing: the request names an unloaded model, and loading it would
    # have evicted the one that is loaded (--models-max 1) only for its child to answer 400.
    d = models(tmp_path, alpha={"tokens": 3}, beta={"tokens": 3})
    r = await start_router("--models-dir", str(d), "--models-max", "1")
    await still_serving(r)
    for label, body, _, _, message in BAD_BODIES:
        if b'"alpha"' not in body or not message.startswith("invalid JSON"):
            continue
        status, got = await r.post(CHAT, data=body.replace(b'"alpha"', b'"beta"'))
        assert_openai_error(status, got, 400, label)
        assert got["error"]["message"].startswith(message), (label, got)
    listed = await r.models()
    assert listed["alpha"]["status"]["value"] == "loaded", listed
    assert listed["beta"]["status"]["value"] == "unloaded", listed


async def test_the_last_model_in_the_query_wins(tmp_path: Path, start_router: StartRouter) -> None:
    # As llama-server reads a repeated query parameter.
    d = models(tmp_path, alpha={"tokens": 3})
    r = await start_router("--models-dir", str(d))
    await still_serving(r)
    assert (await r.get("/props?model=nope&model=alpha"))[0] == 200
    status, got = await r.get("/props?model=alpha&model=nope")
    assert_openai_error(status, got, 400, "last one unknown")
    assert "'nope'" in got["error"]["message"]


# ------------------------------------------------------------------------ model names
HOSTILE_NAMES = [
    "../../etc/passwd",
    "../../../../../../etc/passwd",
    "/etc/passwd",
    "alpha/../../etc/passwd",
    "..\\..\\etc\\passwd",
    "alpha\x00/etc/passwd",
    "\x00",
    "alpha.gguf",
    str(Path("/etc/passwd").resolve()) + ".gguf",
    "file:///etc/passwd",
    "--model=/etc/passwd",
    "-m /etc/passwd",
    "alpha; cat /etc/passwd",
    "$(cat /etc/passwd)",
    "x" * 200_000,
    "é" * 10_000,
]


async def test_hostile_model_names_never_reach_a_child_or_the_filesystem(tmp_path: Path, start_router: StartRouter) -> None:
    d = models(tmp_path, alpha={"tokens": 3})
    r = await start_router("--models-dir", str(d), "--max-body-bytes", str(1024 * 1024))
    log_before = r.log()
    for name in HOSTILE_NAMES:
        body = json.dumps({"model": name, "messages": [{"role": "user", "content": "x"}]})
        status, got = await r.post(CHAT, data=body, headers={"Content-Type": "application/json"})
        assert_openai_error(status, got, 400, name[:40])
        status, got = await r.post("/models/load", {"model": name})
        assert_openai_error(status, got, 404, name[:40])
        status, got = await r.post("/models/unload", {"model": name})
        assert_openai_error(status, got, 400, name[:40])
        if len(name) < 4000:  # query strings beyond aiohttp's line limit are covered below
            for path in ("/slots", "/props", "/metrics", "/models/logs"):
                status, got = await r.get(path, params={"model": name})
                assert_openai_error(status, got, 400, (path, name[:40]))
            status, got = await r.get("/readyz", params={"model": name})
            assert status == 400 and got["status"] == "error", got
        assert not r.children(), f"{name[:40]!r} spawned a child"
    # Nothing was spawned, no model appeared, and the log names none of these paths (the
    # router never tried to open them).
    assert sorted(await r.models()) == ["alpha"]
    new_log = r.log()[len(log_before):]
    for needle in ("passwd", "xxxxxxxxxx", "\x00"):
        assert needle not in new_log, new_log[-2000:]
    # A real model still works, and its child's command line holds only its own path.
    await still_serving(r)
    (child,) = r.children()
    cmdline = " ".join(child.cmdline())
    assert "passwd" not in cmdline and str(d / "alpha.gguf") in cmdline


# ------------------------------------------------------------------------ sizes
async def test_oversized_bodies_get_413(tmp_path: Path, start_router: StartRouter) -> None:
    d = models(tmp_path, alpha={"tokens": 3})
    r = await start_router("--models-dir", str(d), "--max-body-bytes", str(MAX_BODY))

    def body_of(size: int) -> bytes:
        head = b'{"model": "alpha", "messages": [{"role": "user", "content": "'
        tail = b'"}]}'
        return head + b"x" * (size - len(head) - len(tail)) + tail

    async def chunked(data: bytes):  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(data), 8192):
            yield data[i:i + 8192]

    for path in (CHAT, "/v1/embeddings", "/models/load", "/models/unload"):
        status, got = await r.post(path, data=body_of(MAX_BODY + 1), headers={"Content-Type": "application/json"})
        assert_openai_error(status, got, 413, path)
        assert got["error"]["message"] == f"request body is larger than {MAX_BODY} bytes"
        status, got = await r.post(path, data=chunked(body_of(MAX_BODY * 4)), headers={"Content-Type": "application/json"})
        assert_openai_error(status, got, 413, (path, "chunked"))
        await still_serving(r)
    # Exactly at the limit is accepted.
    status, got = await r.post(CHAT, data=body_of(MAX_BODY), headers={"Content-Type": "application/json"})
    assert status == 200, got
    status, got = await r.post("/models/unload", data=b'{"model": "alpha"}' + b" " * (MAX_BODY - 18))
    assert (status, got) == (200, {"success": True})
    # A Content-Length far beyond the limit is refused before any body byte is read.
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {10**12}\r\n\r\n"
    ).encode()
    answer = await raw_request(r, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    await still_serving(r)


async def test_huge_headers_and_urls_get_4xx_and_router_survives(tmp_path: Path, start_router: StartRouter) -> None:
    d = models(tmp_path, alpha={"tokens": 3})
    r = await start_router("--models-dir", str(d))
    cases = {
        "one 64 KiB header": b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n",
        "500 headers": b"GET /health HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n",
        "64 KiB URL": b"GET /health?" + b"a" * 65536 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "garbage request line": b"\x00\x01\x02 / HTTP/1.1\r\n\r\n",
        "bad HTTP version": b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
        "header without colon": b"GET /health HTTP/1.1\r\nHost: x\r\nnocolon\r\n\r\n",
        "bad Content-Length": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
        "bad chunked body": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    }
    for label, data in cases.items():
        answer = await raw_request(r, data)
        status_line = answer.split(b"\r\n", 1)[0]
        assert status_line[:10] in (b"HTTP/1.1 4", b"HTTP/1.0 4") or answer == b"", (label, answer[:200])
        await still_serving(r)


# ------------------------------------------------------------------------ slow clients
async def test_slowloris_is_dropped_while_others_are_served(tmp_path: Path, start_router: StartRouter) -> None:
    d = models(tmp_path, alpha={"tokens": 3})
    header_timeout = 1.5
    r = await start_router("--models-dir", str(d), "--header-timeout", str(header_timeout))
    await still_serving(r)
    n_clients = 40
    conns = [await asyncio.open_connection("127.0.0.1", r.port) for _ in range(n_clients)]
    started = time.monotonic()
    closed_at: dict[int, float] = {}

    async def trickle(i: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # One header byte every 0.1 s, bounded to 300 bytes (30 s): far longer than the timeout.
        data = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 300
        try:
            for i_byte in range(len(data)):
                writer.write(data[i_byte:i_byte + 1])
                await writer.drain()
                if reader.at_eof():
                    break
                try:
                    got = await asyncio.wait_for(reader.read(1), 0.1)
                except TimeoutError:
                    continue
                assert got == b"", got  # the server must not answer a request it never got
                break
        except ConnectionError:
            pass
        closed_at[i] = time.monotonic() - started
        writer.close()

    tasks = [asyncio.create_task(trickle(i, rd, wr)) for i, (rd, wr) in enumerate(conns)]
    try:
        # Other clients are served while the slow ones hold their connections.
        served = 0

        async def keep_serving() -> bool:
            nonlocal served
            await still_serving(r)
            served += 1
            return len(closed_at) == n_clients

        await wait_for(keep_serving, header_timeout + 10, interval=0.05, message="slow clients to be dropped")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert served >= 3
    assert min(closed_at.values()) >= header_timeout * 0.8, closed_at
    assert max(closed_at.values()) <= header_timeout + 5, closed_at
    await still_serving(r)


async def test_client_that_never_reads_a_stream_does_not_block_others(tmp_path: Path, start_router: StartRouter) -> None:
    # stuck: an endless fast stream; alpha serves everyone else meanwhile.
    d = models(tmp_path, alpha={"tokens": 3}, stuck={"tokens": 5_000_000})
    r = await start_router("--models-dir", str(d), "--models-max", "2")
    await still_serving(r)
    router_ps = psutil.Process(r.proc.pid)
    rss_before = router_ps.memory_info().rss
    body = json.dumps({"model": "stuck", "stream": True, "messages": [{"role": "user", "content": "x"}]}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", r.port, limit=1024)
    writer.transport.set_write_buffer_limits(0)  # type: ignore[attr-defined]
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body) + body
    )
    await writer.drain()
    # Read only the status line, then stop reading: the socket buffers fill up.
    assert (await asyncio.wait_for(reader.readline(), 20)).startswith(b"HTTP/1.1 200")
    writer.transport.pause_reading()  # type: ignore[attr-defined]
    try:
        samples: list[int] = []
        t0 = time.monotonic()

        async def steady() -> bool:
            await still_serving(r)
            samples.append(router_ps.memory_info().rss)
            return time.monotonic() - t0 >= 3 and len(samples) >= 5

        await wait_for(steady, 30, interval=0.1, message="3 s of service beside a stuck stream")
        # Backpressure: the router holds a bounded amount of the stream, not all of it
        # (5 M tokens would be hundreds of MB).
        assert max(samples) - rss_before < 64 * 1024 * 1024, (rss_before, samples)
        assert (await r.models())["stuck"]["in_flight"] == 1
    finally:
        writer.close()

    async def released() -> bool:
        return (await r.models())["stuck"]["in_flight"] == 0

    await wait_for(released, 15, message="the stuck stream to be released after the client left")
    await still_serving(r)
