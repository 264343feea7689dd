"""16-stream bursts from a raw-socket client: time to first token without client overhead.

The harness's aiohttp client spends about as much CPU per request as the router does, on
the same two cores, and that hides part of what the router costs a burst. This client
opens its 16 connections before the clock starts, writes the 16 requests back to back
from one thread and only scans the answers for the first `data:` event, so nearly all
the CPU of a round is the server's. Used by `bench.relaycost` (`raw` rows).
"""

from __future__ import annotations

import json
import math
import selectors
import socket
import time

from .run import median, pct

STREAMS = 16
TIMEOUT = 30.0  # one round; a hung target fails the round instead of the run


def request(model: str, tokens: int) -> bytes:
    body = json.dumps({
        "model": model, "prompt": "Once upon a time", "max_tokens": tokens, "stream": True,
        "ignore_eos": True, "temperature": 0.8,
    }).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body


def one_round(port: int, req: bytes, n: int = STREAMS) -> tuple[list[float], int, float]:
    """(time to first event per stream, events, wall seconds) for n streams sent at once."""
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(s)
        sel = selectors.DefaultSelector()
        t0 = time.perf_counter()
        for s in socks:
            s.sendall(req)
        for i, s in enumerate(socks):
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, i)
        first = [math.nan] * n
        bufs = [bytearray() for _ in range(n)]
        open_ = n
        deadline = t0 + TIMEOUT
        while open_:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"round on port {port} did not finish within {TIMEOUT:g} s")
            for key, _ in sel.select(1.0):
                i = key.data
                try:
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]  # a socket
                except BlockingIOError:
                    continue
                buf = bufs[i]
                buf += data
                if math.isnan(first[i]) and b"data: " in buf:
                    first[i] = time.perf_counter() - t0
                # The end: the child's chunked terminator, [DONE], or the server closing.
                if not data or b"[DONE]" in buf or buf.endswith(b"\r\n0\r\n\r\n"):
                    sel.unregister(key.fileobj)
                    open_ -= 1
        wall = time.perf_counter() - t0
        events = sum(b.count(b"data: ") - b.count(b"data: [DONE]") for b in bufs)
        return first, events, wall
    finally:
        for s in socks:
            s.close()


def summarize(ttfts: list[float], rates: list[float]) -> dict[str, float]:
    ok = [t for t in ttfts if not math.isnan(t)]
    return {
        "ttft_p50_ms": pct(ok, 50) * 1e3,
        "ttft_p99_ms": pct(ok, 99) * 1e3,
        "events_per_s": median(rates),
        "missing_first_events": float(len(ttfts) - len(ok)),
    }
