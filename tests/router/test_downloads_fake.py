"""POST /models through the router tier's fake llama-server, which has no hub to reach:
the download child's reason comes back as the 400 at once, and nothing is listed."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import StartRouter
from tests.fakes.helpers import write_fake_model


async def test_a_download_that_finds_nothing_is_a_400_with_the_reason(
    start_router: StartRouter, tmp_path: Path
) -> None:
    write_fake_model(tmp_path / "models" / "alpha.gguf")
    r = await start_router("--models-dir", str(tmp_path / "models"))
    status, body = await r.post("/models", {"model": "org/repo:Q4_K_M"})
    assert status == 400, body
    assert body["error"] == {
        "code": 400, "type": "invalid_request_error",
        "message": "model validation failed, unable to download 'org/repo:Q4_K_M': "
                   "HTTPLIB failed: fake llama-server has no hub",
    }
    assert set(await r.models()) == {"alpha"}
    assert not (tmp_path / "hf-cache" / "models--org--repo").exists()
    assert "[download org/repo:Q4_K_M] failed" in r.log()


async def test_downloads_and_removals_need_the_admin_key(start_router: StartRouter, tmp_path: Path) -> None:
    write_fake_model(tmp_path / "models" / "alpha.gguf")
    r = await start_router("--models-dir", str(tmp_path / "models"), "--api-key", "user", "--admin-api-key", "boss")
    user = {"Authorization": "Bearer user"}
    boss = {"Authorization": "Bearer boss"}
    assert (await r.post("/models", {"model": "org/repo:Q4_K_M"}, headers=user))[0] == 401
    async with r.session.delete(r.url + "/models", params={"model": "alpha"}, headers=user) as resp:
        assert resp.status == 401
    assert (await r.post("/models", {"model": "org/repo:Q4_K_M"}, headers=boss))[0] == 400
    async with r.session.delete(r.url + "/models", params={"model": "alpha"}, headers=boss) as resp:
        assert resp.status == 500  # not from the cache
    assert (await r.get("/models", headers=user))[0] == 200
