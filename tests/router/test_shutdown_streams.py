"""Event and log streams requested after SIGTERM, on a connection the router keeps open
while it waits out its grace for a request in flight (a dashboard's EventSource
reconnecting after its stream was ended). They subscribed to an already closed hub or
ring, never got the end marker, and held the router for the whole --shutdown-grace. Now
they get a 503 at once (an EventSource does not reconnect after one)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Router, StartRouter, make_models, open_stream
from tests.fakes.helpers import wait_for

GRACE = 30.0  # what the router would wait without the fix; everything here is well under


async def _shutting_down(s: aiohttp.ClientSession, r: Router) -> bool:
    async with s.get(r.url + "/readyz") as resp:
        return resp.status == 503 and (await resp.json())["reason"] == "server is shutting down"


@pytest.mark.timeout(90)
@pytest.mark.parametrize("path", ["/models/sse", "/models/logs?model=a&follow=1&lines=1"])
async def test_a_stream_opened_after_sigterm_ends_and_the_router_exits_before_the_grace(
    tmp_path: Path, start_router: StartRouter, path: str,
) -> None:
    d = make_models(tmp_path, "a", tokens=100000, tps=20)  # streams until its client leaves
    r = await start_router("--models-dir", str(d), "--shutdown-grace", str(GRACE))
    # One pooled connection: every request below goes out on the same kept-alive one.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as s:
        async with s.get(r.url + "/health") as resp:
            assert resp.status == 200
        async with open_stream(r, "a"):  # in flight: the router stays in its grace
            began = time.monotonic()
            r.proc.send_signal(signal.SIGTERM)
            # Half the grace for everything: without the fix the stream below ends only
            # when the grace is over and the router cancels it.
            async with asyncio.timeout(GRACE / 2):
                await wait_for(lambda: _shutting_down(s, r), GRACE / 2, interval=0.02,
                               message="the router to begin its shutdown")
                async with s.get(r.url + path) as resp:
                    assert resp.status == 503
                    body = await resp.json()
            assert body["error"]["message"] == "server is shutting down", body
        # The request in flight is gone (its client left): nothing holds the router now.
        async with asyncio.timeout(max(GRACE / 2 - (time.monotonic() - began), 1.0)):
            assert await r.proc.wait() == 0
    assert time.monotonic() - began < GRACE
