"""llama.cpp's own web UI, built from the pinned sdist by bin/build-webui, served at `/`.

Served as upstream serves its embedded copy (server-http.cpp): `/` and `/index.html` are
revalidated on every load and isolated (COEP/COOP, which the UI's in-browser sandbox
needs); PWA files that name the current build are revalidated too; every other asset has a
content hash in its name or is a fixed icon, so it may be cached for a year. All of them
are public, like upstream's UI assets: the UI sends the API key on its own calls.

The directory is listed once, at startup; a rebuild is picked up on the next start. Only
the files found then are routes, so no request path ever reaches the filesystem. Every
file stays open from startup, so a rebuild that replaces files on disk does not change
what this run serves. A small file is read the first time it is served and kept in
memory from then on (a router nobody has opened the UI of holds none of them; the
splash images only an iPhone asks for are about two thirds of them). A large one (the
UI's JavaScript bundle alone is about 9 MB) is read per request in pieces.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from .mediatypes import media_type

# Revalidated like index.html: they change on every build under a fixed name.
_NO_CACHE = frozenset({"sw.js", "manifest.webmanifest", "_app/version.json", "build.json"})
_IMMUTABLE = "public, max-age=31536000, immutable"
# The one type the UI needs that is not in llama-server's table of `--path` types.
_MANIFEST_TYPE = "application/manifest+json"
_TEXT = ("text/", "application/json", "application/manifest+json", "image/svg+xml")

# Files up to this size are kept in memory once served; larger ones are read from disk per
# request. 64 KiB keeps index.html, the small JS/JSON files, the PWA icons and splash
# images (about 280 KiB in all, if every one is asked for) and leaves out the bundles and
# a 200 KiB icon (a recommended MCP server's).
IN_MEMORY_MAX = 64 * 1024
# A large file goes out in pieces of this size, each read on a worker thread.
READ_PIECE = 256 * 1024

# What upstream answers for /sw.js when its UI is off: a browser that once ran the UI keeps
# its service worker, which would go on showing the cached UI; this one removes itself.
SW_REMOVE = b"""self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (e) => e.waitUntil((async () => {
    await self.registration.unregister();
    for (const key of await caches.keys()) await caches.delete(key);
    for (const c of await self.clients.matchAll({ type: 'window' })) c.navigate(c.url);
})()));
"""


@dataclass(frozen=True)
class UiFile:
    """One file of the UI: the descriptor opened at startup, and what was found then."""

    ctype: str
    etag: str
    size: int
    fd: int


class LlamaUi:
    """The files of one built UI directory, listed at startup."""

    def __init__(self, root: Path, in_memory_max: int = IN_MEMORY_MAX) -> None:
        self.root = root
        self.in_memory_max = in_memory_max
        self.files: dict[str, UiFile] = {}
        # The small files served so far, by name.
        self.kept: dict[str, bytes] = {}
        try:
            for path in sorted(root.rglob("*")):
                rel = path.relative_to(root).as_posix()
                if not path.is_file() or any(part.startswith(".") for part in rel.split("/")):
                    continue
                ctype = _MANIFEST_TYPE if path.suffix == ".webmanifest" else media_type(path.name)
                self.files[rel] = _open(path, ctype)
            if "index.html" not in self.files:
                raise FileNotFoundError(f"{root}: no index.html (build it with bin/build-webui)")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Closes the files' descriptors; idempotent."""
        files, self.files, self.kept = self.files, {}, {}
        for f in files.values():
            os.close(f.fd)

    async def _cleanup(self, app: web.Application) -> None:
        self.close()

    @property
    def public_paths(self) -> frozenset[str]:
        return frozenset({"/", *(f"/{name}" for name in self.files)})

    async def _serve(self, request: web.Request, name: str) -> web.StreamResponse:
        f = self.files[name]
        headers = {"ETag": f.etag, "X-Content-Type-Options": "nosniff"}
        if name == "index.html":
            headers["Cache-Control"] = "no-cache"
            headers["Cross-Origin-Embedder-Policy"] = "require-corp"
            headers["Cross-Origin-Opener-Policy"] = "same-origin"
        elif name in _NO_CACHE:
            headers["Cache-Control"] = "no-cache"
        else:
            headers["Cache-Control"] = _IMMUTABLE
        match = request.headers.get("If-None-Match", "")
        if f.etag in (t.strip().removeprefix("W/") for t in match.split(",")):
            return web.Response(status=304, headers=headers)
        charset = "utf-8" if f.ctype.startswith(_TEXT) else None
        if f.size <= self.in_memory_max:
            body = self.kept.get(name)
            if body is None:
                body = b""
                while len(body) < f.size:
                    body += await self._piece(name, f, len(body))
                self.kept[name] = body
            return web.Response(body=body, content_type=f.ctype, charset=charset, headers=headers)
        resp = web.StreamResponse(headers=headers)
        resp.content_type = f.ctype
        if charset:
            resp.charset = charset
        resp.content_length = f.size
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        sent = 0
        while sent < f.size:
            piece = await self._piece(name, f, sent)
            await resp.write(piece)
            sent += len(piece)
        await resp.write_eof()
        return resp

    async def _piece(self, name: str, f: UiFile, offset: int) -> bytes:
        """The next piece of the file as found at startup, read on a worker thread."""
        loop = asyncio.get_running_loop()
        try:
            piece = await loop.run_in_executor(None, os.pread, f.fd, min(READ_PIECE, f.size - offset), offset)
        except OSError as exc:
            piece, why = b"", str(exc)
        else:
            why = "shrank since startup"
        if not piece:
            # The promised length cannot be kept (truncated in place, a read error): the
            # connection is dropped rather than left waiting for the rest.
            raise ConnectionResetError(f"{self.root / name}: {why}")
        return piece

    async def index(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "index.html")

    async def asset(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["path"]
        if name not in self.files:
            raise web.HTTPNotFound()
        return await self._serve(request, name)


def _open(path: Path, ctype: str) -> UiFile:
    """Opens a file, hashing it in pieces for its ETag."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        digest = hashlib.sha256()
        done = 0
        while done < size and (piece := os.pread(fd, min(READ_PIECE, size - done), done)):
            digest.update(piece)
            done += len(piece)
        if done < size:
            raise OSError(f"{path}: shrank while being read")
        return UiFile(ctype, _etag(digest.hexdigest()), size, fd)
    except BaseException:
        os.close(fd)
        raise


def _etag(hexdigest: str) -> str:
    return '"' + hexdigest[:32] + '"'


async def _no_ui_asset(request: web.Request) -> web.Response:
    if request.match_info["path"] != "sw.js":
        raise web.HTTPNotFound()
    # What upstream answers for /sw.js when its UI is off (see SW_REMOVE).
    return web.Response(
        body=SW_REMOVE, content_type="text/javascript", charset="utf-8",
        headers={"Cache-Control": "no-cache"},
    )


def add_routes(app: web.Application, ui: LlamaUi | None) -> None:
    """`/` and `/{path}` for the UI's files, or only the self-removing /sw.js without a UI
    (the dashboard then takes `/`). Registered after every other route, which therefore
    wins; an unknown path still gets the usual 404."""
    if ui is not None:
        app.router.add_get("/", ui.index)
        app.on_cleanup.append(ui._cleanup)
    app.router.add_get("/{path:.+}", ui.asset if ui is not None else _no_ui_asset)
