"""Connections to a real llama-server child: requests never meet a connection the child
is closing."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import StartRouter
from tests.integration.conftest import TinyModels

pytestmark = pytest.mark.integration


async def test_back_to_back_streams_and_small_requests_all_succeed(
    tiny_models: TinyModels, llama_server_bin: Path, start_router: StartRouter
) -> None:
    # llama-server closes a connection right after a streamed response. A pooled proxy that
    # reused such a connection sent the next request into that close: "Can not write
    # request body" / "Server disconnected" 500s for about 1 % of requests here.
    r = await start_router(
        "--models-dir", str(tiny_models.dir), "-c", "1024", "-np", "4", server_bin=llama_server_bin
    )
    assert (await r.chat("alpha", max_tokens=1))[0] == 200
    stream = json.dumps({"model": "alpha", "prompt": "hi", "max_tokens": 3, "stream": True}).encode()
    small = json.dumps({"model": "alpha", "prompt": "hi", "max_tokens": 1}).encode()
    failures: list[tuple[int, bytes]] = []

    async def worker(session: aiohttp.ClientSession, w: int) -> None:
        for i in range(100):
            body = stream if (i + w) % 2 == 0 else small
            async with session.post(r.url + "/v1/completions", data=body) as resp:
                data = await resp.read()
                if resp.status != 200:
                    failures.append((resp.status, data[:200]))

    async with aiohttp.ClientSession() as session:
        await asyncio.wait_for(asyncio.gather(*(worker(session, w) for w in range(4))), 120)
    assert failures == []
