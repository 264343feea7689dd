"""The dashboard: three static files served at `/dashboard/` and `/dashboard/{name}`.

At `/` too when llama.cpp's own UI is not built (see `llamaui`); the page then says how
to build it.

No build step: the files in this package are served as they are. They are public (no API
key needed to load them, as upstream exempts its UI assets); the UI then sends the key on
every API call it makes. Responses carry an ETag and `Cache-Control: no-cache`, so a browser
revalidates on each load (304 when unchanged) and never runs a stale `app.js` after an
upgrade.
"""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources

from aiohttp import web

# name -> content type. Only these names are served, so no path ever reaches the filesystem.
ASSETS = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
PREFIX = "/dashboard"
PUBLIC_PATHS = frozenset({PREFIX, f"{PREFIX}/", *(f"{PREFIX}/{name}" for name in ASSETS)})

# The UI uses no inline script or style and talks only to this origin.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


@cache
def _load(name: str) -> tuple[bytes, str]:
    body = resources.files(__package__).joinpath(name).read_bytes()
    return body, '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _serve(request: web.Request, name: str) -> web.Response:
    body, etag = _load(name)
    headers = {
        "Cache-Control": "no-cache",
        "ETag": etag,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
    }
    if name.endswith(".html"):
        headers["Content-Security-Policy"] = _CSP
    if etag in (t.strip() for t in request.headers.get("If-None-Match", "").split(",")):
        return web.Response(status=304, headers=headers)
    return web.Response(body=body, content_type=ASSETS[name], charset="utf-8", headers=headers)


async def index(request: web.Request) -> web.Response:
    return _serve(request, "index.html")


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise web.HTTPNotFound()
    return _serve(request, name)


def add_routes(app: web.Application, *, at_root: bool) -> None:
    """Routes for the dashboard; `at_root` also serves it at `/` (no llama.cpp UI built)."""
    app.router.add_get(PREFIX, index)
    app.router.add_get(f"{PREFIX}/", index)
    app.router.add_get(PREFIX + "/{name}", asset)
    if at_root:
        app.router.add_get("/", index)
