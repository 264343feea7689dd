"""A local stand-in for the Hugging Face hub: the endpoints llama.cpp's downloader calls
(common/hf-cache.cpp and common/download.cpp), served on a loopback port so tests run
offline. Point llama-server at it with ``MODEL_ENDPOINT=hub.url``.

* ``GET /api/models/OWNER/REPO/refs``: the branches (``main`` -> the repo's commit)
* ``GET /api/models/OWNER/REPO/tree/COMMIT?recursive=true``: the files, with their LFS
  sha256 (the blob name in the cache) and size
* ``HEAD``/``GET /OWNER/REPO/resolve/COMMIT/PATH``: the file, with ``ETag``,
  ``Content-Length``, ``Accept-Ranges: bytes`` and ``Range: bytes=N-`` answered 206

Unknown repos answer 404 with the hub's ``{"error": ...}`` body. Knobs a test sets on the
``Repo`` or the hub: ``drop_after`` (every transfer of a file is cut after that many
bytes, as a hub that dies part-way), ``stall_after`` (it stops sending and holds the
connection until the hub stops), and ``requests`` (what was asked, with the headers).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

_RANGE = re.compile(r"bytes=(\d+)-$")


@dataclass
class Repo:
    files: dict[str, bytes]
    # Path of a file whose transfers break part-way: cut after this many bytes.
    drop_after: dict[str, int] = field(default_factory=dict)
    # Path of a file whose transfers stall after this many bytes (held until the hub stops).
    stall_after: dict[str, int] = field(default_factory=dict)

    @property
    def commit(self) -> str:
        h = hashlib.sha1()
        for path in sorted(self.files):
            h.update(path.encode() + b"\0" + hashlib.sha256(self.files[path]).digest())
        return h.hexdigest()


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.requests: list[Seen] = []
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add(self, repo_id: str, files: dict[str, bytes]) -> Repo:
        repo = self.repos[repo_id] = Repo(dict(files))
        return repo

    async def start(self) -> FakeHub:
        app = web.Application()
        app.router.add_get("/api/models/{owner}/{name}/refs", self._refs)
        app.router.add_get("/api/models/{owner}/{name}/tree/{commit}", self._tree)
        app.router.add_route("*", "/{owner}/{name}/resolve/{commit}/{path:.+}", self._resolve)
        app.middlewares.append(self._record)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock).start()
        return self

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _record(self, request: web.Request, handler: object) -> web.StreamResponse:
        self.requests.append(Seen(request.method, request.path_qs, dict(request.headers)))
        return await handler(request)  # type: ignore[operator, no-any-return]  # aiohttp's handler type

    def _repo(self, request: web.Request) -> Repo:
        repo = self.repos.get(f"{request.match_info['owner']}/{request.match_info['name']}")
        if repo is None:
            raise web.HTTPNotFound(
                text='{"error":"Repository not found"}', content_type="application/json"
            )
        return repo

    async def _refs(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        return web.json_response(
            {"branches": [{"name": "main", "ref": "refs/heads/main", "targetCommit": repo.commit}],
             "converts": [], "tags": []}
        )

    async def _tree(self, request: web.Request) -> web.Response:
        repo = self._repo(request)
        if request.match_info["commit"] != repo.commit:
            raise web.HTTPNotFound(text='{"error":"Invalid rev id"}', content_type="application/json")
        items = []
        for path, data in sorted(repo.files.items()):
            item: dict[str, object] = {
                "type": "file", "path": path, "size": len(data),
                "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
            }
            if path.endswith(".gguf"):
                item["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            items.append(item)
        return web.json_response(items)

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        repo = self._repo(request)
        path = request.match_info["path"]
        data = repo.files.get(path)
        if request.match_info["commit"] != repo.commit or data is None:
            raise web.HTTPNotFound(text='{"error":"Entry not found"}', content_type="application/json")
        etag = '"' + hashlib.sha256(data).hexdigest() + '"'
        start = 0
        m = _RANGE.match(request.headers.get("Range", ""))
        if m is not None:
            start = int(m.group(1))
            if start > len(data):
                raise web.HTTPRequestRangeNotSatisfiable()
        body = data[start:]
        resp = web.StreamResponse(status=206 if m is not None else 200)
        resp.headers["ETag"] = etag
        resp.headers["Accept-Ranges"] = "bytes"
        resp.headers["Content-Type"] = "application/octet-stream"
        if m is not None:
            resp.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        resp.content_length = len(body)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        cut = repo.drop_after.get(path)
        stall = repo.stall_after.get(path)
        limit = min(x for x in (cut, stall, len(data)) if x is not None)
        sent = start
        while sent < limit:
            chunk = data[sent : min(limit, sent + 65536)]
            await resp.write(chunk)
            sent += len(chunk)
        if stall is not None and sent < len(data):
            await self._stopping.wait()
        if sent < len(data):
            # Part-way: the connection ends under the client, as when the hub goes away.
            if request.transport is not None:
                request.transport.abort()
            return resp
        await resp.write_eof()
        return resp


def add_upstream_router_repos(hub: FakeHub, files_dir: Path) -> None:
    """The repos llama.cpp's own tools/server/tests/unit/test_router.py asks the hub for,
    with generated tiny models (a `Q8_0` name over F32 content: the CPU build's repacking
    of quantized weights is not what is tested here)."""
    from llamarouter.devtools.tinymodel import write_model

    def gguf(name: str, seed: int, ftype: str = "f32") -> bytes:
        return write_model(files_dir / name, ftype=ftype, seed=seed)[0].read_bytes()

    files_dir.mkdir(parents=True, exist_ok=True)
    hub.add("ggml-org/test-model-stories260K", {"stories260K-F32.gguf": gguf("stories260K-F32.gguf", 1)})
    hub.add("ggml-org/test-model-stories260K-infill",
            {"stories260K-infill-F32.gguf": gguf("stories260K-infill-F32.gguf", 2)})
    hub.add("ggml-org/tinygemma3-GGUF", {"tinygemma3-Q8_0.gguf": gguf("tinygemma3-Q8_0.gguf", 3)})
    hub.add("ggml-org/test-model-router-download",
            {"test-model-router-download-F16.gguf": gguf("test-model-router-download-F16.gguf", 4, "f16")})
    preset = ("[tinygemma3-preset]\nhf-repo = ggml-org/tinygemma3-GGUF:Q8_0\n\n"
              "[stories260K-test]\nhf-repo = ggml-org/test-model-stories260K:F32\n")
    hub.add("ggml-org/test-preset-ci", {"preset.ini": preset.encode()})


async def _serve_upstream_router_repos(files_dir: Path) -> None:
    hub = await FakeHub().start()
    add_upstream_router_repos(hub, files_dir)
    print(hub.url, flush=True)  # the caller reads the address from the first line
    try:
        await asyncio.Event().wait()
    finally:
        await hub.stop()


if __name__ == "__main__":
    # python -m tests.fakes.fake_hub DIR: serve the upstream router test repos until killed
    # (bin/upstream-router-tests).
    import sys

    asyncio.run(_serve_upstream_router_repos(Path(sys.argv[1])))
