"""Keep-cache benchmark: the prefill a follow-up pays after its model was unloaded.

Generates one model (wider than the test models, so prefill takes measurable time), then
for keep-cache off and on: start llamarouter, send a long prompt, unload the model, send
the same prompt extended by a short suffix and record that follow-up's `timings`
(`prompt_n`, `cache_n`, `prompt_ms`) and its wall time (load + restore + prefill).

    .venv/bin/python -m bench.keep_cache [--chars 12000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from llamarouter.devtools.tinymodel import ModelShape, write_model

from .procs import free_port

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = aiohttp.ClientTimeout(total=600)
SUFFIX = " and then what happened next?"


def prompt_text(chars: int) -> str:
    rng = random.Random(7)
    words = ["alpha", "river", "stone", "cloud", "ember", "north", "quiet", "lamp"]
    text = ""
    while len(text) < chars:
        text += rng.choice(words) + " "
    return text[:chars]


async def wait(check: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            if await check():
                return
        await asyncio.sleep(0.05)
    raise TimeoutError("benchmark step did not finish in time")


async def one_round(models: Path, work: Path, keep: bool, chars: int, ctx: int) -> dict[str, Any]:
    port = free_port()
    # A fresh cache directory per run: saved caches outlive the router (by design), and
    # one left by an earlier run would serve this run's first request.
    argv = [
        sys.executable, "-m", "llamarouter", "--port", str(port), "--models-dir", str(models),
        "-c", str(ctx), "-np", "1", "--no-watch", "--keep-cache-dir", str(work / f"kv-{port}"),
        "--keep-cache" if keep else "--no-keep-cache",
    ]
    log = (work / f"router-{port}.log").open("wb")  # closed in finally
    proc = await asyncio.create_subprocess_exec(*argv, stdout=log, stderr=log, cwd=str(ROOT))
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as s:
            async def healthy() -> bool:
                async with s.get(url + "/health") as r:
                    return r.status == 200

            await wait(healthy, 60)

            async def complete(prompt: str) -> tuple[dict[str, Any], float]:
                t0 = time.monotonic()
                async with s.post(url + "/completion", json={
                    "model": "bench", "prompt": prompt, "n_predict": 1, "cache_prompt": True,
                }) as r:
                    body = await r.json()
                    assert r.status == 200, body
                return body["timings"], time.monotonic() - t0

            prompt = prompt_text(chars)
            first, first_wall = await complete(prompt)
            async with s.post(url + "/models/unload", json={"model": "bench"}) as r:
                assert r.status == 200

            async def unloaded() -> bool:
                async with s.get(url + "/models") as r:
                    data = (await r.json())["data"]
                return bool(data[0]["status"]["value"] == "unloaded")

            await wait(unloaded, 120)
            follow, follow_wall = await complete(prompt + SUFFIX)
            return {
                "keep": keep, "first_prompt_n": first["prompt_n"], "first_prompt_ms": first["prompt_ms"],
                "first_wall_s": first_wall, "prompt_n": follow["prompt_n"], "cache_n": follow["cache_n"],
                "prompt_ms": follow["prompt_ms"], "wall_s": follow_wall,
            }
    finally:
        proc.terminate()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), 30)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        log.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chars", type=int, default=12000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ctx", type=int, default=32768)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-kv-") as tmp:
        work = Path(tmp)
        models = work / "models"
        shape = ModelShape(n_embd=256, n_layer=4, n_head=4, n_head_kv=4, n_ff=512, n_ctx_train=args.ctx)
        write_model(models / "bench.gguf", shape, seed=3)
        results = []
        for _ in range(args.rounds):
            for keep in (False, True):
                results.append(await one_round(models, work, keep, args.chars, args.ctx))
                print(json.dumps(results[-1]), flush=True)
    for keep in (False, True):
        rows = [r for r in results if r["keep"] == keep]
        print(
            f"keep-cache {'on ' if keep else 'off'}: prompt_n {rows[0]['prompt_n']} "
            f"cache_n {rows[0]['cache_n']} prompt_ms median "
            f"{statistics.median(r['prompt_ms'] for r in rows):.0f} wall_s median "
            f"{statistics.median(r['wall_s'] for r in rows):.2f} "
            f"(first request: prompt_n {rows[0]['first_prompt_n']}, prompt_ms median "
            f"{statistics.median(r['first_prompt_ms'] for r in rows):.0f}) cpus {os.cpu_count()}"
        )


if __name__ == "__main__":
    asyncio.run(main())
