"""A failed model whose file is replaced or repaired gets another try at the next reload
(SIGHUP, ?reload=1, the watcher) instead of waiting out --failed-holdoff."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.conftest import Router, StartRouter, make_models
from tests.fakes.helpers import wait_for, write_fake_model


async def reload(r: Router, how: str) -> None:
    if how == "query":
        assert (await r.get("/models?reload=1"))[0] == 200
        return
    before = r.log().count("SIGHUP: models reloaded")
    r.proc.send_signal(signal.SIGHUP)
    await wait_for(lambda: r.log().count("SIGHUP: models reloaded") > before, 10, message="the SIGHUP reload")


@pytest.mark.parametrize("how", ["sighup", "query"])
async def test_a_repaired_file_clears_the_hold_off(tmp_path: Path, start_router: StartRouter, how: str) -> None:
    d = make_models(tmp_path, "a", crash_on_start=True, exit_code=3)
    r = await start_router(
        "--models-dir", str(d), "--no-watch", "--restart-max", "1", "--failed-holdoff", "600",
    )
    status, body = await r.chat("a", max_tokens=1)
    assert status == 503 and "failed to load" in body["error"]["message"], body
    assert (await r.models())["a"]["status"]["state"] == "failed"
    # A reload that finds the same file keeps the hold-off.
    await reload(r, how)
    status, body = await r.chat("a", max_tokens=1)
    assert status == 503 and "failed to load" in body["error"]["message"], body
    assert (await r.models())["a"]["status"]["state"] == "failed"
    # The file is written again (same name, same size; a new mtime) and works now.
    write_fake_model(d / "a.gguf")
    await reload(r, how)
    item = (await r.models())["a"]
    assert item["status"]["value"] == "unloaded" and "failed" not in item["status"], item["status"]
    status, body = await r.chat("a", max_tokens=1)
    assert status == 200, body
    assert "its model file changed since it failed" in r.log()
