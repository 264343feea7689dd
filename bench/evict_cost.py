"""Cost-aware eviction (`--evict-cost`) measured with models of different sizes.

One large generated model (f16, about 260 MB: over a second to load here) and three tiny
ones share `--models-max 2`. One client sends chats one after another: the large model
every third request, the tiny ones in turn otherwise. Least recently used eviction sends
the large model away before each of its requests comes back; with `--evict-cost` its
measured load time keeps it, and the tiny ones take turns in the other slot. Upstream's
router (LRU) runs the same sequence for reference. Runs alternate; every server listens on
loopback and the sequence is a fixed number of requests.

    .venv/bin/python -m bench.evict_cost [--requests 30] [--runs 2] [--cost 10]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from .procs import ProcessRegistry, free_port

SMALL = ("s1", "s2", "s3")


def make_models(work: Path) -> Path:
    from llamarouter.devtools.tinymodel import ModelShape, write_model

    d = work / "models"
    d.mkdir()
    write_model(d / "big.gguf", ModelShape(n_embd=1024, n_layer=8, n_head=8, n_head_kv=8, n_ff=4096),
                seed=3, ftype="f16")
    src = write_model(work / "small.gguf", seed=4)[0]
    for name in SMALL:
        os.link(src, d / f"{name}.gguf")
    return d


def sequence(n: int) -> list[str]:
    out, k = [], 0
    for i in range(n):
        if i % 3 == 0:
            out.append("big")
        else:
            out.append(SMALL[k % len(SMALL)])
            k += 1
    return out


async def run_once(reg: ProcessRegistry, argv: list[str], port: int, log: Path, seq: list[str]) -> dict[str, Any]:
    server = reg.start(log.stem, argv, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
            deadline = time.monotonic() + 60
            while True:
                try:
                    async with s.get(url + "/health") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline or not server.alive():
                    raise RuntimeError(server.log_tail())
                await asyncio.sleep(0.05)
            statuses = []
            t0 = time.perf_counter()
            for model in seq:
                body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
                async with s.post(url + "/v1/chat/completions", json=body) as r:
                    await r.read()
                    statuses.append(r.status)
            wall = time.perf_counter() - t0
    finally:
        reg.stop(server)
    text = log.read_text(errors="replace")
    big_loads = text.count("[big] stopped -> starting") + text.count("spawning server instance with name=big ")
    return {"wall_s": wall, "big_loads": big_loads, "non_200": sum(1 for x in statuses if x != 200)}


async def main_async(args: argparse.Namespace, work: Path, reg: ProcessRegistry, binary: str) -> dict[str, Any]:
    models = make_models(work)
    seq = sequence(args.requests)
    common = ["--models-dir", str(models), "--models-max", "2", "-c", "1024", "-np", "2", "--host", "127.0.0.1"]
    variants = {
        "upstream (LRU)": lambda p: [binary, *common, "--port", str(p)],
        "llamarouter --evict-cost 0 (LRU)": lambda p: [args.llamarouter, *common, "--port", str(p)],
        f"llamarouter --evict-cost {args.cost:g}": lambda p: [args.llamarouter, *common, "--port", str(p),
                                                            "--evict-cost", str(args.cost)],
    }
    res: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
    for i in range(args.runs):
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for name in order:
            port = free_port()
            r = await run_once(reg, variants[name](port), port, work / f"run{i}-{len(res[name])}-{port}.log", seq)
            res[name].append(r)
            print(f"[evict_cost] {name}: {r['wall_s']:.1f} s, big loaded {r['big_loads']}x, "
                  f"non-200 {r['non_200']}", flush=True)
    return {
        name: {"wall_s": statistics.median(r["wall_s"] for r in rs),
               "big_loads": statistics.median(r["big_loads"] for r in rs),
               "non_200": sum(r["non_200"] for r in rs), "runs": rs}
        for name, rs in res.items()
    } | {"requests": args.requests}


def table(res: dict[str, Any]) -> str:
    lines = [f"| {res['requests']} chats, `--models-max 2` | wall time (median) | large model loads |",
             "|---|---:|---:|"]
    for name, v in res.items():
        if isinstance(v, dict):
            lines.append(f"| {name} | {v['wall_s']:.1f} s | {v['big_loads']:g} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from .run import bench_env, find_binary

    ap = argparse.ArgumentParser(prog="python -m bench.evict_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--cost", type=float, default=10.0)
    ap.add_argument("--llamarouter", default=str(Path(sys.executable).with_name("llamarouter")))
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="llamarouter-evictcost-"))
    reg = ProcessRegistry(bench_env(work))
    try:
        res = asyncio.run(main_async(args, work, reg, find_binary()))
    finally:
        reg.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    print(table(res))
    print(json.dumps(res, default=str)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
