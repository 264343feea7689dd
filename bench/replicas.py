"""Replicas against one child: the same model, the same router run, 32 concurrent clients.

One llamarouter serves two names of one tiny model from a preset: `one` (a single child)
and `two` (`replicas = 2`). Every child has the same flags (one compute thread, a few
slots), so the second child of `two` is what differs. Runs alternate (one, two, two, one,
...); each run sends a fixed number of chats from 32 clients and takes the throughput and
latency; the table shows medians and the ratio. Before the timed runs each model is warmed
with the same load once, so `two` runs with its second child already loaded (the cost of
starting it shows in the warm-up, not in the figures).

    .venv/bin/python -m bench.replicas            # standalone: a table and JSON
    .venv/bin/python -m bench.replicas --quick

`make bench` runs it as one of its phases. Every load loop is bounded by a request count
and a deadline; the router listens on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .procs import ProcessRegistry, Server, free_port
from .sched import JSON_HEADERS, PHASE_DEADLINE_S, REQUEST_TIMEOUT_S, pct

NAMES = ("one", "two")


@dataclass(frozen=True)
class ReplicaPlan:
    clients: int = 32
    requests: int = 1600  # per run
    runs: int = 3  # per model, interleaved
    chat_tokens: int = 32
    # The same for every child: one compute thread each, so two children use two cores
    # where one child uses one; four slots each.
    flags: tuple[str, ...] = ("-c", "2048", "-np", "4", "-t", "1")


QUICK = ReplicaPlan(requests=192, runs=1)


class Replicas:
    def __init__(self, llamarouter: str, reg: ProcessRegistry, work: Path, plan: ReplicaPlan,
                 log: Any = print) -> None:
        self.llamarouter = llamarouter
        self.reg = reg
        self.work = work
        self.plan = plan
        self.log = log

    def _preset(self) -> Path:
        from llamarouter.devtools.tinymodel import write_model

        model = write_model(self.work / "replicas-model.gguf", seed=11)[0]
        preset = self.work / "replicas.ini"
        preset.write_text(f"[one]\nmodel = {model}\n\n[two]\nmodel = {model}\nreplicas = 2\n")
        return preset

    async def _start(self) -> Server:
        port = free_port()
        argv = [self.llamarouter, "--models-preset", str(self._preset()), "--models-max", "3",
                "--port", str(port), "--host", "127.0.0.1", *self.plan.flags]
        server = self.reg.start("llamarouter-replicas", argv, port, self.work / "llamarouter-replicas.log")
        from .run import wait_healthy

        await wait_healthy(server, 60.0, interval=0.05)
        return server

    async def _load(self, server: Server, model: str) -> dict[str, Any]:
        p = self.plan
        body = json.dumps({
            "model": model, "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": p.chat_tokens, "ignore_eos": True, "temperature": 0.8,
        }).encode()
        left = p.requests
        lat: list[float] = []
        statuses: list[int] = []
        deadline = time.monotonic() + PHASE_DEADLINE_S
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as s:
            async def client() -> None:
                nonlocal left
                while left > 0 and time.monotonic() < deadline:
                    left -= 1
                    t0 = time.perf_counter()
                    try:
                        async with s.post(server.url + "/v1/chat/completions", data=body, headers=JSON_HEADERS) as r:
                            await r.read()
                            statuses.append(r.status)
                    except (TimeoutError, aiohttp.ClientError, OSError):
                        statuses.append(0)
                    lat.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(p.clients)))
            wall = time.perf_counter() - t0
        ok = sum(1 for st in statuses if st == 200)
        return {"req_per_s": ok / wall, "tokens_per_s": ok * p.chat_tokens / wall, "p50_s": pct(lat, 50),
                "p99_s": pct(lat, 99), "non_200": len(statuses) - ok}

    async def _children(self, server: Server, model: str) -> int:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s, \
                s.get(server.url + "/models") as r:
            item = next(m for m in (await r.json())["data"] if m["id"] == model)
        replicas = item.get("replicas") or [item["status"]]
        return sum(1 for x in replicas if x.get("status", x.get("value")) == "loaded")

    async def run(self) -> dict[str, Any]:
        server = await self._start()
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in NAMES}
        try:
            for name in NAMES:  # warm: loads, and for `two` its second child
                await self._load(server, name)
            children = {n: await self._children(server, n) for n in NAMES}
            self.log(f"  children loaded after the warm-up: {children}")
            for i in range(self.plan.runs):
                for name in NAMES if i % 2 == 0 else tuple(reversed(NAMES)):
                    r = await self._load(server, name)
                    runs[name].append(r)
                    self.log(f"  {name}: {r['req_per_s']:.1f} req/s ({r['tokens_per_s']:.0f} tokens/s), "
                             f"p50 {r['p50_s']:.2f}s, p99 {r['p99_s']:.2f}s, non-200 {r['non_200']}")
        finally:
            self.reg.stop(server)
        med = statistics.median
        out: dict[str, Any] = {
            "plan": {"clients": self.plan.clients, "requests": self.plan.requests, "runs": self.plan.runs,
                     "chat_tokens": self.plan.chat_tokens, "flags": list(self.plan.flags)},
            "children": children,
        }
        for name, rs in runs.items():
            out[name] = {k: med(r[k] for r in rs) for k in ("req_per_s", "tokens_per_s", "p50_s", "p99_s")}
            out[name]["non_200"] = sum(r["non_200"] for r in rs)
            out[name]["runs"] = rs
        return out


def table(res: dict[str, Any]) -> str:
    one, two = res["one"], res["two"]
    lines = ["| 32 clients, same model | one child | `replicas = 2` | ratio |", "|---|---:|---:|---:|"]
    lines.append(f"| chats/s | {one['req_per_s']:.1f} | {two['req_per_s']:.1f} | "
                 f"{two['req_per_s'] / one['req_per_s']:.2f}x |")
    lines.append(f"| p50 | {one['p50_s']:.2f} s | {two['p50_s']:.2f} s | {two['p50_s'] / one['p50_s']:.2f}x |")
    lines.append(f"| p99 | {one['p99_s']:.2f} s | {two['p99_s']:.2f} s | {two['p99_s'] / one['p99_s']:.2f}x |")
    lines.append(f"| non-200 | {one['non_200']} | {two['non_200']} | |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from .run import bench_env

    ap = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--llamarouter", default=str(Path(sys.executable).with_name("llamarouter")))
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else ReplicaPlan()
    work = Path(tempfile.mkdtemp(prefix="llamarouter-replicas-"))
    reg = ProcessRegistry(bench_env(work))
    bench = Replicas(args.llamarouter, reg, work, plan,
                     log=lambda m: print(f"[replicas {time.strftime('%H:%M:%S')}] {m}", flush=True))
    try:
        res = asyncio.run(bench.run())
    finally:
        problems = reg.cleanup()
        if problems:
            print("cleanup problems:\n  " + "\n  ".join(problems), file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    print(table(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
