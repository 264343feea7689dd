"""--api-key / --admin-api-key, CORS (--cors-origins) and the no-key warning."""

from __future__ import annotations

import hmac
from pathlib import Path

import pytest
from aiohttp.test_utils import make_mocked_request

from llamarouter.web import app as app_module
from llamarouter.settings.config import RouterConfig
from tests.conftest import StartRouter
from tests.fakes.helpers import wait_for, write_fake_model

PUBLIC = ("/health", "/v1/health", "/livez", "/readyz")
CHAT_BODY = {"model": "alpha", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}


def models(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    write_fake_model(d / "alpha.gguf", tokens=3)
    return d


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_admin_key_guards_admin_endpoints(tmp_path: Path, start_router: StartRouter) -> None:
    r = await start_router(
        "--models-dir", str(models(tmp_path)), "--api-key", "user-key",
        env={"LLAMAROUTER_ADMIN_API_KEY": "admin-1, admin-2"},
    )
    user, admin1, admin2 = bearer("user-key"), bearer("admin-1"), bearer("admin-2")
    for path in PUBLIC:
        assert (await r.get(path))[0] == 200, path
    # Normal endpoints: either key.
    for headers in (user, admin1, admin2, {"X-Api-Key": "admin-2"}):
        assert (await r.get("/models", headers=headers))[0] == 200
        assert (await r.post("/v1/chat/completions", CHAT_BODY, headers=headers))[0] == 200
    assert (await r.get("/models"))[0] == 401
    # Admin endpoints: the normal key does not suffice.
    admin_calls = [
        ("POST", "/models/unload", {"model": "alpha"}),
        ("POST", "/models/load", {"model": "alpha"}),
        ("GET", "/models?reload=1", None),
        ("GET", "/v1/models?reload=1", None),
        ("GET", "/models/logs?model=alpha", None),
    ]
    for method, path, body in admin_calls:
        for headers in (user, {}, bearer("wrong"), {"X-Api-Key": "user-key"}):
            if method == "POST":
                status, got = await r.post(path, body, headers=headers)
            else:
                status, got = await r.get(path, headers=headers)
            assert status == 401, (path, headers, got)
            assert got == {"error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}}
    # ...the admin keys do.
    assert await r.post("/models/unload", {"model": "alpha"}, headers=admin1) == (200, {"success": True})
    await wait_for(lambda: not r.children(), 10, message="alpha to stop")
    assert await r.post("/models/load", {"model": "alpha"}, headers=admin2) == (200, {"success": True})
    assert (await r.get("/models?reload=1", headers=admin1))[0] == 200
    status, text = await r.get("/models/logs?model=alpha", headers=admin2)
    assert status == 200 and isinstance(text, str)
    # The admin keys never reach a child (command line or environment).
    (child,) = await wait_for(r.children, 10, message="alpha's child")
    assert "admin-1" not in " ".join(child.cmdline())
    assert "LLAMAROUTER_ADMIN_API_KEY" not in child.environ()


async def test_admin_key_alone_leaves_normal_endpoints_open(tmp_path: Path, start_router: StartRouter) -> None:
    r = await start_router("--models-dir", str(models(tmp_path)), "--admin-api-key", "boss")
    assert (await r.get("/models"))[0] == 200
    assert (await r.post("/v1/chat/completions", CHAT_BODY))[0] == 200
    assert (await r.post("/models/unload", {"model": "alpha"}))[0] == 401
    assert (await r.post("/models/unload", {"model": "alpha"}, headers=bearer("boss")))[0] == 200


async def test_cors_headers_on_every_kind_of_answer(tmp_path: Path, start_router: StartRouter) -> None:
    # The rules themselves are unit-tested (tests/unit/test_cors.py) and compared with
    # llama-server side by side (tests/integration); here: every kind of answer gets them.
    r = await start_router("--models-dir", str(models(tmp_path)), "--api-key", "k",
                           "--cors-origins", "http://app.example")
    origin = {"Origin": "http://evil.example"}  # a literal --cors-origins is sent whatever the Origin
    async with r.session.options(r.url + "/v1/chat/completions", headers={
            **origin, "Access-Control-Request-Method": "POST"}) as resp:
        assert resp.status == 200  # no key needed for a preflight
        assert resp.headers["Access-Control-Allow-Origin"] == "http://app.example"
        assert resp.headers["Access-Control-Allow-Methods"] == "GET, POST, DELETE, OPTIONS"
        assert resp.headers["Access-Control-Allow-Credentials"] == "true"
    async with r.session.get(r.url + "/models", headers={**origin, **bearer("k")}) as resp:
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "http://app.example"
        assert "Access-Control-Allow-Methods" not in resp.headers  # preflight-only
    async with r.session.get(r.url + "/models", headers=origin) as resp:
        assert resp.status == 401 and resp.headers["Access-Control-Allow-Origin"] == "http://app.example"
    body = {**CHAT_BODY, "stream": True}
    async with r.session.post(r.url + "/v1/chat/completions", json=body,
                              headers={**origin, **bearer("k")}) as resp:
        assert resp.status == 200 and resp.headers["Access-Control-Allow-Origin"] == "http://app.example"
        assert (await resp.read()).rstrip().endswith(b"data: [DONE]")


async def test_non_loopback_host_without_key_logs_a_warning(tmp_path: Path, start_router: StartRouter) -> None:
    # 127.0.0.2 is loopback on Linux but not one of the names the check trusts.
    d = models(tmp_path)
    r = await start_router("--models-dir", str(d), "--host", "127.0.0.2", wait=False)
    await wait_for(lambda: "listening on http://127.0.0.2" in r.log(), 20, message="router to listen")
    assert "without --api-key: anyone who can reach it can use it" in r.log()
    r2 = await start_router("--models-dir", str(d), "--host", "127.0.0.2", "--api-key", "k", wait=False)
    await wait_for(lambda: "listening on http://127.0.0.2" in r2.log(), 20, message="router to listen")
    assert "without --api-key" not in r2.log()
    r3 = await start_router("--models-dir", str(d))  # 127.0.0.1: no warning
    assert "without --api-key" not in r3.log()


@pytest.mark.parametrize("given", ["k2", "wrong", "", "k1k2", "k"])
def test_key_check_compares_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch, given: str) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    config = RouterConfig(api_keys=("k1", "k2", "k3"))
    request = make_mocked_request("GET", "/models", headers={"Authorization": f"Bearer {given}"})
    assert app_module._key_ok(config, request) is (given == "k2")
    # No early exit: every configured key is compared, whichever matches.
    assert [b for _, b in calls] == [b"k1", b"k2", b"k3"]


async def test_open_cors_without_key_logs_a_warning(tmp_path: Path, start_router: StartRouter) -> None:
    d = models(tmp_path)
    warning = "security: no API key is set and CORS allows all origins"
    assert warning in (await start_router("--models-dir", str(d))).log()
    assert warning not in (await start_router("--models-dir", str(d), "--api-key", "k")).log()
    assert warning not in (await start_router("--models-dir", str(d), "--cors-origins", "localhost")).log()
