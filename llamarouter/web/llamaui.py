"""llama.cpp's own web UI, built from the pinned sdist by bin/build-webui, served at `/`.

Served as upstream serves its embedded copy (server-http.cpp): `/` and `/index.html` are
revalidated on every load and isolated (COEP/COOP, which the UI's in-browser sandbox
needs); PWA files that name the current build are revalidated too; every other asset has a
content hash in its name or is a fixed icon, so it may be cached for a year. All of them
are public, like upstream's UI assets: the UI sends the API key on its own calls.

The directory is listed once, at startup; a rebuild is picked up on the next start. Only
the files found then are routes, so no request path ever reaches the filesystem.
"""

from __future__ import annotations

import hashlib
import mimetypes
from pathlib import Path

from aiohttp import web

# Revalidated like index.html: they change on every build under a fixed name.
_NO_CACHE = frozenset({"sw.js", "manifest.webmanifest", "_app/version.json", "build.json"})
_IMMUTABLE = "public, max-age=31536000, immutable"
_TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".html": "text/html",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
    ".png": "image/png",
    ".woff2": "font/woff2",
    ".woff": "font/woff",
    ".ttf": "font/ttf",
    ".wasm": "application/wasm",
}
_TEXT = ("text/", "application/json", "application/manifest+json", "image/svg+xml")

# What upstream answers for /sw.js when its UI is off: a browser that once ran the UI keeps
# its service worker, which would go on showing the cached UI; this one removes itself.
SW_REMOVE = b"""self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (e) => e.waitUntil((async () => {
    await self.registration.unregister();
    for (const key of await caches.keys()) await caches.delete(key);
    for (const c of await self.clients.matchAll({ type: 'window' })) c.navigate(c.url);
})()));
"""


class LlamaUi:
    """The files of one built UI directory, read into memory at startup (about 10 MB)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, tuple[bytes, str, str]] = {}
        for path in sorted(root.rglob("*")):
            rel = path.relative_to(root).as_posix()
            if not path.is_file() or any(part.startswith(".") for part in rel.split("/")):
                continue
            body = path.read_bytes()
            ctype = _TYPES.get(path.suffix) or mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
            self.files[rel] = (body, ctype, etag)
        if "index.html" not in self.files:
            raise FileNotFoundError(f"{root}: no index.html (build it with bin/build-webui)")

    @property
    def public_paths(self) -> frozenset[str]:
        return frozenset({"/", *(f"/{name}" for name in self.files)})

    def _serve(self, request: web.Request, name: str) -> web.Response:
        body, ctype, etag = self.files[name]
        headers = {"ETag": etag, "X-Content-Type-Options": "nosniff"}
        if name == "index.html":
            headers["Cache-Control"] = "no-cache"
            headers["Cross-Origin-Embedder-Policy"] = "require-corp"
            headers["Cross-Origin-Opener-Policy"] = "same-origin"
        elif name in _NO_CACHE:
            headers["Cache-Control"] = "no-cache"
        else:
            headers["Cache-Control"] = _IMMUTABLE
        match = request.headers.get("If-None-Match", "")
        if etag in (t.strip().removeprefix("W/") for t in match.split(",")):
            return web.Response(status=304, headers=headers)
        charset = "utf-8" if ctype.startswith(_TEXT) else None
        return web.Response(body=body, content_type=ctype, charset=charset, headers=headers)

    async def index(self, request: web.Request) -> web.Response:
        return self._serve(request, "index.html")

    async def asset(self, request: web.Request) -> web.Response:
        name = request.match_info["path"]
        if name not in self.files:
            raise web.HTTPNotFound()
        return self._serve(request, name)


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
    app.router.add_get("/{path:.+}", ui.asset if ui is not None else _no_ui_asset)
