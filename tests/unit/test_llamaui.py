"""Serving a built llama.cpp UI directory (llamarouter/web/llamaui.py) without a router."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import aiohttp
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


def with_bundle(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    root = built(tmp_path)
    data = os.urandom(size)
    (root / "_app" / "immutable" / "bundle.big.js").write_bytes(data)
    return root, data


def test_no_file_is_held_in_memory_at_startup(tmp_path: Path) -> None:
    root, data = with_bundle(tmp_path, 4 * llamaui.IN_MEMORY_MAX)
    (root / "splash.png").write_bytes(os.urandom(llamaui.IN_MEMORY_MAX))  # small: kept once served
    fds = len(os.listdir("/proc/self/fd"))
    tracemalloc.start()
    try:
        ui = llamaui.LlamaUi(root)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        assert held < 16 * 1024, held
        assert ui.kept == {}
        assert len(os.listdir("/proc/self/fd")) == fds + len(ui.files) == fds + 6
    finally:
        ui.close()
    assert len(os.listdir("/proc/self/fd")) == fds


async def test_a_small_file_is_kept_once_served_and_a_large_one_never(tmp_path: Path) -> None:
    root, data = with_bundle(tmp_path, 2 * llamaui.IN_MEMORY_MAX)
    ui = llamaui.LlamaUi(root)
    client = await serve(ui)
    try:
        assert await (await client.get("/_app/immutable/bundle.big.js")).read() == data
        assert (await client.head("/favicon.svg")).status == 200
        assert ui.kept == {"favicon.svg": b"<svg/>"}  # HEAD reads it too: it says the length
        resp = await client.get("/")
        assert await resp.text() == "<!doctype html><title>ui</title>"
        assert sorted(ui.kept) == ["favicon.svg", "index.html"]
        # Kept: a later change in place does not reach it.
        (root / "index.html").write_text("<!doctype html><title>changed</title>")
        assert await (await client.get("/index.html")).text() == "<!doctype html><title>ui</title>"
    finally:
        await client.close()


async def test_a_small_file_replaced_before_it_is_first_served_is_served_as_found(tmp_path: Path) -> None:
    root = built(tmp_path)
    client = await serve(llamaui.LlamaUi(root))
    try:
        fresh = root / "_app" / "version.new"
        fresh.write_text('{"version":"2"}')
        os.replace(fresh, root / "_app" / "version.json")
        resp = await client.get("/_app/version.json")
        assert resp.status == 200 and await resp.text() == '{"version":"1"}'
    finally:
        await client.close()


async def test_a_large_file_is_served_whole_from_what_was_there_at_startup(tmp_path: Path) -> None:
    root, data = with_bundle(tmp_path, 3 * llamaui.READ_PIECE + 123)
    ui = llamaui.LlamaUi(root)
    fd = ui.files["_app/immutable/bundle.big.js"].fd
    client = await serve(ui)
    try:
        resp = await client.get("/_app/immutable/bundle.big.js")
        assert resp.status == 200 and resp.content_type == "text/javascript" and resp.charset == "utf-8"
        assert resp.headers["Content-Length"] == str(len(data))
        assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert await resp.read() == data
        etag = resp.headers["ETag"]
        again = await client.get("/_app/immutable/bundle.big.js", headers={"If-None-Match": etag})
        assert again.status == 304 and await again.read() == b""
        head = await client.head("/_app/immutable/bundle.big.js")
        assert head.status == 200 and head.headers["Content-Length"] == str(len(data))
        assert head.headers["ETag"] == etag
        # A rebuild replaces the file: this run goes on serving what it listed at startup.
        fresh = root / "_app" / "immutable" / "bundle.new"
        fresh.write_bytes(b"rebuilt")
        os.replace(fresh, root / "_app" / "immutable" / "bundle.big.js")
        resp = await client.get("/_app/immutable/bundle.big.js")
        assert await resp.read() == data and resp.headers["ETag"] == etag
    finally:
        await client.close()
    with pytest.raises(OSError):  # closed with the app
        os.fstat(fd)


async def test_a_large_file_truncated_in_place_drops_that_response_only(tmp_path: Path) -> None:
    root, data = with_bundle(tmp_path, 2 * llamaui.READ_PIECE)
    client = await serve(llamaui.LlamaUi(root))
    try:
        os.truncate(root / "_app" / "immutable" / "bundle.big.js", llamaui.READ_PIECE + 10)
        resp = await client.get("/_app/immutable/bundle.big.js")
        assert resp.headers["Content-Length"] == str(len(data))
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
        resp = await client.get("/index.html")
        assert resp.status == 200 and await resp.text() == "<!doctype html><title>ui</title>"
    finally:
        await client.close()


async def test_content_types_are_llama_servers_and_the_manifests_own(tmp_path: Path) -> None:
    root = built(tmp_path)
    (root / "manifest.webmanifest").write_text("{}")
    (root / "favicon.ico").write_bytes(b"\0")
    client = await serve(llamaui.LlamaUi(root))
    try:
        for path, ctype in (("/manifest.webmanifest", "application/manifest+json"), ("/favicon.ico", "image/x-icon"),
                            ("/favicon.svg", "image/svg+xml"), ("/_app/version.json", "application/json")):
            resp = await client.get(path)
            assert (resp.status, resp.content_type) == (200, ctype), path
    finally:
        await client.close()
