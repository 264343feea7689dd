"""GET /livez and /readyz (with and without ?model=), public even behind --api-key."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import StartRouter, make_models


async def test_livez_and_readyz(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a b")
    r = await start_router("--models-dir", str(d))
    assert await r.get("/livez") == (200, {"status": "ok"})
    assert await r.get("/readyz") == (200, {"status": "ok"})

    status, body = await r.get("/readyz?model=a")
    assert status == 503
    assert body["state"] == "stopped" and body["reason"] == "model is not loaded"
    status, body = await r.get("/readyz?model=nope")
    assert status == 400 and "nope" in body["reason"]

    assert (await r.chat("a", max_tokens=1))[0] == 200
    assert await r.get("/readyz?model=a") == (200, {"status": "ok", "model": "a", "state": "ready"})
    assert (await r.get("/readyz?model=b"))[0] == 503


async def test_failed_model_reason(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a", crash_on_start=True, exit_code=3)
    r = await start_router("--models-dir", str(d), "--restart-max", "1")
    assert (await r.chat("a"))[0] == 503
    status, body = await r.get("/readyz?model=a")
    assert status == 503 and body["state"] == "failed"
    assert body["reason"].startswith("model failed to load: ")


async def test_probes_need_no_api_key_but_metrics_does(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a")
    r = await start_router("--models-dir", str(d), "--api-key", "secret")
    assert (await r.get("/livez"))[0] == 200
    assert (await r.get("/readyz"))[0] == 200
    assert (await r.get("/readyz?model=a"))[0] == 503
    assert (await r.get("/models"))[0] == 401
    assert (await r.get("/metrics"))[0] == 401
    status, body = await r.get("/metrics", headers={"Authorization": "Bearer secret"})
    assert status == 200 and "llamarouter_models_max" in body
