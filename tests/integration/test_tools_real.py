"""`--tools` and `--ui-mcp-proxy` in router mode, side by side with upstream's router:
`/tools` lists and runs the built-in tools, `/cors-proxy` relays to a loopback server,
`/props` says the proxy is on. About 5 s on 2 cores."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import StartRouter
from tests.fakes.fake_hub import FakeHub
from tests.integration.conftest import StartPair, TinyModels

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


async def test_tools_and_cors_proxy_side_by_side(start_pair: StartPair, tiny_models: TinyModels, tmp_path: Path) -> None:
    hub = await FakeHub().start()  # any loopback HTTP server will do as the proxy's target
    try:
        hub.add("o/r", {"a.gguf": b"GGUF"})
        note = tmp_path / "note.txt"
        note.write_text("hello from a file\n")
        pair = await start_pair("--models-dir", str(tiny_models.dir), "--tools", "read_file,file_glob_search",
                                "--ui-mcp-proxy", "-c", "512")
        seen = {}
        for who, router in pair.both():
            status, props = await router.get("/props")
            assert status == 200 and props["cors_proxy_enabled"] is True, (who, props)
            status, listed = await router.get("/tools")
            assert status == 200 and isinstance(listed, list), (who, listed)
            status, ran = await router.post("/tools", {"tool": "read_file", "params": {"path": str(note)}})
            assert status == 200, (who, ran)
            assert "hello from a file" in json.dumps(ran), (who, ran)
            status, proxied = await router.get("/cors-proxy", params={"url": hub.url + "/api/models/o/r/refs"})
            assert status == 200 and proxied["branches"][0]["name"] == "main", (who, proxied)
            seen[who] = (sorted(t["tool"] if "tool" in t else json.dumps(t, sort_keys=True) for t in listed), ran, proxied)
        assert seen["upstream"] == seen["llamarouter"]
    finally:
        await hub.stop()


async def test_without_the_flags_both_stay_disabled(start_router: StartRouter, llama_server_bin: Path, tiny_models: TinyModels) -> None:
    router = await start_router("--models-dir", str(tiny_models.dir), server_bin=llama_server_bin)
    for path in ("/tools", "/cors-proxy"):
        status, body = await router.get(path)
        assert status == 403 and body["error"]["type"] == "feature_disabled", body
    status, props = await router.get("/props")
    assert props["cors_proxy_enabled"] is False
    # No helper llama-server runs: only what the router started for models (none yet).
    assert router.children() == []
