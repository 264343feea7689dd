"""Serving a built llama.cpp UI directory (llamarouter/web/llamaui.py) without a router."""

from __future__ import annotations

from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from llamarouter.web import llamaui


def built(tmp_path: Path) -> Path:
    root = tmp_path / "dist"
    (root / "_app" / "immutable").mkdir(parents=True)
    (root / "index.html").write_text("<!doctype html><title>ui</title>")
    (root / "_app" / "immutable" / "bundle.abc123.js").write_text("console.log(1)")
    (root / "_app" / "version.json").write_text('{"version":"1"}')
    (root / "favicon.svg").write_text("<svg/>")
    (root / ".hidden").write_text("secret")
    return root


def test_lists_files_once_and_skips_dotfiles(tmp_path: Path) -> None:
    ui = llamaui.LlamaUi(built(tmp_path))
    assert sorted(ui.files) == [
        "_app/immutable/bundle.abc123.js", "_app/version.json", "favicon.svg", "index.html",
    ]
    assert "/" in ui.public_paths and "/_app/immutable/bundle.abc123.js" in ui.public_paths
    assert "/.hidden" not in ui.public_paths


def test_a_directory_without_index_html_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no index.html"):
        llamaui.LlamaUi(tmp_path)


async def serve(ui: llamaui.LlamaUi | None) -> TestClient[web.Request, web.Application]:
    app = web.Application()
    llamaui.add_routes(app, ui)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_cache_policy_and_isolation_headers_like_upstream(tmp_path: Path) -> None:
    client = await serve(llamaui.LlamaUi(built(tmp_path)))
    try:
        for path in ("/", "/index.html"):
            resp = await client.get(path)
            assert resp.status == 200 and resp.content_type == "text/html"
            assert resp.headers["Cache-Control"] == "no-cache"
            assert resp.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
            assert resp.headers["Cross-Origin-Opener-Policy"] == "same-origin"
            again = await client.get(path, headers={"If-None-Match": "W/" + resp.headers["ETag"]})
            assert again.status == 304
        resp = await client.get("/_app/immutable/bundle.abc123.js")
        assert resp.content_type == "text/javascript" and resp.charset == "utf-8"
        assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert "Cross-Origin-Opener-Policy" not in resp.headers
        resp = await client.get("/_app/version.json")
        assert resp.headers["Cache-Control"] == "no-cache"
        assert (await client.get("/.hidden")).status == 404
        assert (await client.get("/nothing.js")).status == 404
    finally:
        await client.close()


async def test_without_a_ui_only_the_self_removing_service_worker(tmp_path: Path) -> None:
    client = await serve(None)
    try:
        resp = await client.get("/sw.js")
        assert resp.status == 200 and resp.headers["Cache-Control"] == "no-cache"
        assert "unregister()" in await resp.text()
        assert (await client.get("/index.html")).status == 404
        assert (await client.get("/")).status == 404  # the dashboard takes `/` (webui)
    finally:
        await client.close()
