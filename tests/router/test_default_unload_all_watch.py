"""Default model, `POST /models/unload {"model": "*"}` and watching the model sources,
against fake children."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import StartRouter
from tests.fakes.helpers import wait_for, write_fake_model


def models_dir(tmp_path: Path, *names: str) -> Path:
    d = tmp_path / "models"
    for name in names:
        write_fake_model(d / f"{name}.gguf")
    return d


# ----------------------------------------------------------------- default model
async def test_default_model_serves_requests_without_a_model(tmp_path: Path, start_router: StartRouter) -> None:
    d = models_dir(tmp_path, "alpha", "beta")
    r = await start_router("--models-dir", str(d), "--default-model", "beta")
    status, body = await r.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert status == 200, body
    assert (await r.models())["beta"]["status"]["value"] == "loaded"
    assert (await r.models())["alpha"]["status"]["value"] == "unloaded"
    # GET /props without ?model= answers for the default model, not for the router.
    status, props = await r.get("/props")
    assert status == 200 and props["model_alias"] == "beta" and "role" not in props
    # A named model still wins, and an unknown one gets upstream's error.
    status, body = await r.chat("alpha")
    assert status == 200, body
    status, body = await r.chat("nope")
    assert status == 400 and body["error"]["message"] == "model 'nope' not found"


async def test_default_model_from_the_preset(tmp_path: Path, start_router: StartRouter) -> None:
    d = models_dir(tmp_path, "alpha", "beta")
    preset = tmp_path / "models.ini"
    preset.write_text("[alpha]\ndefault-model = true\n")
    r = await start_router("--models-dir", str(d), "--models-preset", str(preset))
    status, body = await r.post("/completion", {"prompt": "hi"})
    assert status == 200, body
    assert (await r.models())["alpha"]["status"]["value"] == "loaded"


async def test_without_a_default_a_missing_model_is_an_error(tmp_path: Path, start_router: StartRouter) -> None:
    d = models_dir(tmp_path, "alpha")
    r = await start_router("--models-dir", str(d))
    status, body = await r.post("/completion", {"prompt": "hi"})
    assert status == 400 and body["error"]["message"] == "model name is missing from the request"
    status, props = await r.get("/props")
    assert status == 200 and props["role"] == "router"


# ----------------------------------------------------------------- unload all
async def test_unload_star_unloads_every_model_but_the_pinned(tmp_path: Path, start_router: StartRouter) -> None:
    d = models_dir(tmp_path, "alpha", "beta", "gamma")
    preset = tmp_path / "models.ini"
    preset.write_text("[gamma]\npin = true\n")
    r = await start_router("--models-dir", str(d), "--models-preset", str(preset), "--models-max", "0")
    for name in ("alpha", "beta"):
        status, body = await r.chat(name)
        assert status == 200, body
    await r.wait_status("gamma", "loaded")

    status, body = await r.post("/models/unload", {"model": "*"})
    assert status == 200 and body["success"] is True
    assert sorted(body["models"]) == ["alpha", "beta"]
    await r.wait_status("alpha", "unloaded")
    await r.wait_status("beta", "unloaded")
    assert await r.status_of("gamma") == "loaded"

    # Nothing left to unload: still a success, naming no model.
    status, body = await r.post("/models/unload", {"model": "*"})
    assert status == 200 and body == {"success": True, "models": []}


# ----------------------------------------------------------------- watching
async def test_a_model_dropped_into_the_models_dir_appears_and_goes(
    tmp_path: Path, start_router: StartRouter
) -> None:
    d = models_dir(tmp_path, "alpha")
    r = await start_router("--models-dir", str(d), "--watch-debounce", "0.2")
    assert sorted(await r.models()) == ["alpha"]
    write_fake_model(d / "beta.gguf")

    async def listed(names: list[str]) -> bool:
        return sorted(await r.models()) == names

    await wait_for(lambda: listed(["alpha", "beta"]), 15, interval=0.05, message="beta to appear")
    status, body = await r.chat("beta")
    assert status == 200, body
    (d / "alpha.gguf").unlink()
    await wait_for(lambda: listed(["beta"]), 15, interval=0.05, message="alpha to go")
    assert "models dir or preset file changed: reloading" in r.log()


async def test_a_preset_edit_applies_like_a_reload(tmp_path: Path, start_router: StartRouter) -> None:
    d = models_dir(tmp_path, "alpha")
    preset = tmp_path / "models.ini"
    preset.write_text("[alpha]\nctx-size = 1024\n")
    r = await start_router("--models-dir", str(d), "--models-preset", str(preset), "--watch-debounce", "0.2")
    status, body = await r.chat("alpha")
    assert status == 200, body
    # Editors write a new file and rename it over the old one.
    tmp = tmp_path / "models.ini.new"
    tmp.write_text("[alpha]\nctx-size = 2048\n")
    tmp.replace(preset)

    async def applied() -> bool:
        item = (await r.models())["alpha"]
        return "ctx-size = 2048" in item["status"]["preset"]

    await wait_for(applied, 15, interval=0.05, message="the preset change to apply")
    # As with a reload, the running model whose definition changed was unloaded.
    await r.wait_status("alpha", "unloaded")


async def test_a_broken_preset_keeps_the_current_models(tmp_path: Path, start_router: StartRouter) -> None:
    d = models_dir(tmp_path, "alpha")
    preset = tmp_path / "models.ini"
    preset.write_text("[alpha]\nctx-size = 1024\n")
    r = await start_router("--models-dir", str(d), "--models-preset", str(preset), "--watch-debounce", "0.2")
    preset.write_text("[alpha]\nno-such-option = 1\n")

    async def logged() -> bool:
        return "reload after a file change failed" in r.log()

    await wait_for(logged, 15, interval=0.05)
    assert sorted(await r.models()) == ["alpha"]
    status, body = await r.chat("alpha")
    assert status == 200, body


async def test_no_watch_turns_watching_off(tmp_path: Path, start_router: StartRouter) -> None:
    d = models_dir(tmp_path, "alpha")
    on = await start_router("--models-dir", str(d))
    off = await start_router("--models-dir", str(d), "--no-watch")

    async def watching() -> bool:
        return "watching for model changes" in on.log()

    await wait_for(watching, 10, interval=0.05)
    assert "watching for model changes" not in off.log()
