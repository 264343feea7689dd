"""Thrash: 6 models, --models-max 2, 64 concurrent clients mixing models, streaming and
not. Every request ends with 200 or a documented 503 + Retry-After, none hangs past its
deadline, and no child outlives the router.

The default suite runs LLAMAROUTER_THRASH_REQUESTS=600 (the default); `make reliability`
runs 3000. A summary line is printed (pytest -s shows it) and appended to
$LLAMAROUTER_RELIABILITY_REPORT when set.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import StartRouter
from tests.fakes.helpers import report, wait_for, write_fake_model

pytestmark = pytest.mark.reliability

N_MODELS = 6
CLIENTS = 64
REQUEST_TIMEOUT = 30.0  # per request, client side: a hang fails the test
OVERALL_DEADLINE = 300.0
MAX_QUEUE = 48
MAX_WAIT = 3.0
RETRY_PAUSE = 0.25


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def test_thrash_many_models_few_slots(tmp_path: Path, start_router: StartRouter) -> None:
    total = int(os.environ.get("LLAMAROUTER_THRASH_REQUESTS", "600"))
    d = tmp_path / "models"
    names = [f"m{i}" for i in range(N_MODELS)]
    for name in names:
        write_fake_model(d / f"{name}.gguf", tokens=6, tps=300)
    r = await start_router(
        "--models-dir", str(d), "--models-max", "2", "-np", "4",
        "--max-queue", str(MAX_QUEUE), "--max-wait", str(MAX_WAIT),
    )
    rng = random.Random(9)
    # Skewed popularity (two hot models, four cold) so both reuse and eviction happen.
    plan = [
        (rng.choices(names, weights=[8, 6, 2, 2, 1, 1])[0], rng.random() < 0.5)
        for _ in range(total)
    ]
    outcomes: Counter[str] = Counter()
    latencies: list[float] = []
    ttfbs: list[float] = []
    failures: list[str] = []
    next_index = 0
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)

    async def one(session: aiohttp.ClientSession, model: str, stream: bool) -> int:
        body = {"model": model, "stream": stream, "max_tokens": 6,
                "messages": [{"role": "user", "content": "x"}]}
        t0 = time.monotonic()
        try:
            async with session.post(r.url + "/v1/chat/completions", json=body, timeout=timeout) as resp:
                ttfbs.append(time.monotonic() - t0)
                raw = await resp.read()
                latencies.append(time.monotonic() - t0)
                outcomes[str(resp.status)] += 1
                if resp.status == 200:
                    if stream:
                        if not raw.rstrip().endswith(b"data: [DONE]"):
                            failures.append(f"{model}: truncated stream {raw[-80:]!r}")
                    elif json.loads(raw)["model"] != model:
                        failures.append(f"{model}: answered by {raw[:120]!r}")
                elif resp.status == 503:
                    err = json.loads(raw)["error"]
                    if err["type"] != "unavailable_error" or not resp.headers.get("Retry-After"):
                        failures.append(f"{model}: 503 without Retry-After or wrong shape: {raw[:200]!r}")
                else:
                    failures.append(f"{model}: unexpected {resp.status}: {raw[:200]!r}")
                return resp.status
        except (TimeoutError, aiohttp.ClientError) as exc:
            outcomes[type(exc).__name__] += 1
            failures.append(f"{model}: {type(exc).__name__}: {exc}")
            return 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal next_index
        while next_index < total:
            model, stream = plan[next_index]
            next_index += 1
            if await one(session, model, stream) == 503:
                # A polite client honours Retry-After (scaled down to keep the test short):
                # pacing of the load, not synchronisation.
                await asyncio.sleep(RETRY_PAUSE)

    started = time.monotonic()
    connector = aiohttp.TCPConnector(limit=CLIENTS)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.wait_for(
            asyncio.gather(*(client(session) for _ in range(CLIENTS))), OVERALL_DEADLINE
        )
    elapsed = time.monotonic() - started
    assert r.proc.returncode is None
    assert (await r.get("/health"))[0] == 200
    models = await r.models()
    assert sum(1 for m in models.values() if m["status"]["value"] != "unloaded") <= 2
    assert all(m["in_flight"] == 0 and m["queued"] == 0 for m in models.values()), models
    r.children()  # remember the pids, then stop and look for leftovers
    assert await r.stop() == 0
    await wait_for(lambda: not r.leftover_children(), 15, message="children to exit")
    left = len(r.leftover_children())
    report(
        f"thrash: requests={total} clients={CLIENTS} models={N_MODELS} models_max=2 "
        f"outcomes={dict(sorted(outcomes.items()))} max_wait={max(ttfbs):.2f}s "
        f"p50={_percentile(latencies, 0.5) * 1000:.0f}ms p99={_percentile(latencies, 0.99) * 1000:.0f}ms "
        f"max={max(latencies):.2f}s elapsed={elapsed:.1f}s children_left={left}"
    )
    assert not failures, failures[:10]
    assert sum(outcomes.values()) == total
    assert set(outcomes) <= {"200", "503"}
    assert outcomes["200"] >= total // 4, outcomes
    assert max(latencies) < REQUEST_TIMEOUT
    assert left == 0
