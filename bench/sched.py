"""Scheduling under contention: llamarouter against upstream's router, same binary, same run.

Three scenarios, each run alternately on the two routers (upstream, ours, upstream, ...):

- uniform thrash: six models (copies of one tiny model) through `--models-max 2`; a fixed
  number of clients each send short chats one after another, each to a random model.
  Children run with llama-server's default threads (one per core, as a user runs it), and
  again with one thread each (`-t 1`: nothing oversubscribes the cores, so only the
  swapping is measured);
- skewed thrash: the same with 40/25/15/10/6/4 % of requests over the six models, plus one
  uncontended run of ours (`--models-max 6`, everything stays loaded) to compare the two
  hot models' p50 with;
- starvation: `--models-max 1`; clients keep model A busy with streamed chats of random
  length; one chat for model B is sent a little later: how long B waits, whether any stream
  was cut.

    .venv/bin/python -m bench.sched            # standalone, prints a table and JSON
    .venv/bin/python -m bench.sched --quick
    .venv/bin/python -m bench.sched --only hot --rounds 5   # hot models' p50 against uncontended runs

`make bench` runs it as one of its phases. Every load loop is bounded by a request count
and a deadline; every server listens on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import random
import resource
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
import psutil

from .procs import ProcessRegistry, Server, free_port

MODELS = ("m1", "m2", "m3", "m4", "m5", "m6")
SKEW = (0.40, 0.25, 0.15, 0.10, 0.06, 0.04)
JSON_HEADERS = {"Content-Type": "application/json"}
ROUTERS = ("upstream", "llamarouter")
# One request never takes longer than this; a phase never runs longer than its deadline.
REQUEST_TIMEOUT_S = 120.0
PHASE_DEADLINE_S = 600.0


@dataclass
class SchedPlan:
    clients: int = 48
    requests: int = 1200  # per thrash run
    thrash_runs: int = 2  # per router and scenario
    starve_runs: int = 5  # per router
    starve_clients: int = 8
    starve_seconds: float = 10.0
    starve_b_at: float = 2.0
    chat_tokens: int = 8
    # llama-server's default threads (one per core). Two CPU children computing at once
    # on a 2-core machine oversubscribe it and their idle threads spin-wait at every
    # barrier (40-150 ms of CPU per 8-token chat instead of 6-7): what llamarouter's CPU
    # turns are for. `one_thread` runs the thrash again with `-t 1`, where nothing
    # oversubscribes and only the swapping is measured.
    flags: tuple[str, ...] = ("-c", "2048", "-np", "8")
    one_thread: bool = True


QUICK = SchedPlan(requests=400, thrash_runs=1, starve_runs=2, starve_seconds=6.0)


def pct(values: Sequence[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def make_models(work: Path) -> Path:
    """Six hard links (or copies) of one generated model, under six names."""
    import os

    from llamarouter.devtools.tinymodel import write_model

    d = work / "sched-models"
    d.mkdir(exist_ok=True)
    src = write_model(work / "sched-src.gguf", seed=7)[0]
    for name in MODELS:
        dst = d / f"{name}.gguf"
        if dst.exists():
            continue
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return d


class Sched:
    def __init__(self, bin_: str, llamarouter: str, reg: ProcessRegistry, work: Path, plan: SchedPlan,
                 extra_ours: Sequence[str] = (), log: Any = print) -> None:
        self.bin = bin_
        self.llamarouter = llamarouter
        self.reg = reg
        self.work = work
        self.plan = plan
        self.extra_ours = list(extra_ours)
        self.log = log
        self.models_dir = make_models(work)
        self.rng = random.Random(20261206)
        self.routers: tuple[str, ...] = ROUTERS

    def argv(self, key: str, port: int, models_max: int, flags: Sequence[str] | None = None) -> list[str]:
        common = ["--models-dir", str(self.models_dir), "--models-max", str(models_max),
                  "--port", str(port), "--host", "127.0.0.1", *(self.plan.flags if flags is None else flags)]
        if key == "upstream":
            return [self.bin, *common]
        return [self.llamarouter, *common, *self.extra_ours]

    async def start(self, key: str, models_max: int, tag: str, flags: Sequence[str] | None = None) -> Server:
        port = free_port()
        server = self.reg.start(f"{key}-{tag}", self.argv(key, port, models_max, flags), port,
                                self.work / f"{key}-{tag}.log")
        deadline = time.monotonic() + 60
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
            while time.monotonic() < deadline:
                if not server.alive():
                    raise RuntimeError(f"{key} exited early:\n{server.log_tail()}")
                try:
                    async with s.get(server.url + "/health") as r:
                        if r.status == 200:
                            return server
                except (TimeoutError, aiohttp.ClientError, OSError):
                    pass
                await asyncio.sleep(0.05)
        raise TimeoutError(f"{key} not healthy:\n{server.log_tail()}")

    def chat(self, model: str, tokens: int, stream: bool = False) -> bytes:
        return json.dumps({
            "model": model, "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": tokens, "ignore_eos": True, "temperature": 0.8, "stream": stream,
        }).encode()

    # ------------------------------------------------------------------ thrash
    async def thrash_once(self, key: str, weights: Sequence[float], models_max: int, tag: str,
                          flags: Sequence[str] | None = None) -> dict[str, Any]:
        p = self.plan
        cpu0 = _children_cpu()
        server = await self.start(key, models_max, tag, flags)
        picks = self.rng.choices(MODELS, weights=weights, k=p.requests)
        queue = list(enumerate(picks))
        lat: dict[str, list[float]] = {m: [] for m in MODELS}
        statuses: list[int] = []
        errors: list[str] = []
        deadline = time.monotonic() + PHASE_DEADLINE_S
        conn = aiohttp.TCPConnector(limit=0)
        try:
            async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as s:
                async def client() -> None:
                    while queue and time.monotonic() < deadline:
                        _, model = queue.pop()
                        t0 = time.perf_counter()
                        try:
                            async with s.post(server.url + "/v1/chat/completions", data=self.chat(model, p.chat_tokens),
                                              headers=JSON_HEADERS) as r:
                                body = await r.read()
                                statuses.append(r.status)
                                if r.status != 200 and len(errors) < 5:
                                    errors.append(f"{r.status} {body[:160]!r}")
                        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                            statuses.append(0)
                            if len(errors) < 5:
                                errors.append(repr(exc))
                        lat[model].append(time.perf_counter() - t0)

                t0 = time.perf_counter()
                await asyncio.gather(*(client() for _ in range(p.clients)))
                wall = time.perf_counter() - t0
            router_cpu = _own_cpu(server.pid)
        finally:
            self.reg.stop(server)
        # The router and every child it ran, reaped (both routers reap their children):
        # CPU is what a thrash costs whatever else the machine runs.
        cpu = _children_cpu() - cpu0
        every = [v for vs in lat.values() for v in vs]
        ok = sum(1 for st in statuses if st == 200)
        return {
            "req_per_s": ok / wall, "wall_s": wall, "n": len(statuses), "non_200": len(statuses) - ok,
            "p50_s": pct(every, 50), "p99_s": pct(every, 99),
            "p50_by_model_s": {m: pct(v, 50) for m, v in lat.items()},
            "cpu_ms_per_req": cpu / max(ok, 1) * 1e3,
            "router_cpu_ms_per_req": router_cpu / max(ok, 1) * 1e3,
            "errors": errors,
        }

    async def thrash(self, name: str, weights: Sequence[float], flags: Sequence[str] | None = None) -> dict[str, Any]:
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in self.routers}
        for i in range(self.plan.thrash_runs):
            order = self.routers if i % 2 == 0 else tuple(reversed(self.routers))
            for key in order:
                r = await self.thrash_once(key, weights, 2, f"{name}{i}", flags)
                runs[key].append(r)
                self.log(f"  {name} {key}: {r['req_per_s']:.1f} req/s, p50 {r['p50_s']:.2f}s, "
                         f"p99 {r['p99_s']:.2f}s, non-200 {r['non_200']}, "
                         f"CPU {r['cpu_ms_per_req']:.1f} ms/request (router and children; "
                         f"router alone {r['router_cpu_ms_per_req']:.2f})")
        return {k: _summary(v) for k, v in runs.items()}

    # ------------------------------------------------------------------ starvation
    async def starve_once(self, key: str, tag: str) -> dict[str, Any]:
        p = self.plan
        server = await self.start(key, 1, tag)
        cut = 0
        statuses: list[int] = []
        b_wait = float("nan")
        b_status = 0
        stop_at = time.monotonic() + p.starve_seconds
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)) as s:
                # A loaded and warm before the clock starts.
                async with s.post(server.url + "/v1/chat/completions", data=self.chat("m1", 1), headers=JSON_HEADERS) as r:
                    await r.read()

                async def streamer() -> None:
                    nonlocal cut
                    while time.monotonic() < stop_at:
                        tokens = self.rng.randint(16, 400)
                        async with s.post(server.url + "/v1/chat/completions", data=self.chat("m1", tokens, True),
                                          headers=JSON_HEADERS) as r:
                            statuses.append(r.status)
                            done = False
                            async for line in r.content:
                                if line.startswith(b"data: [DONE]"):
                                    done = True
                            if r.status == 200 and not done:
                                cut += 1

                async def b_request() -> None:
                    nonlocal b_wait, b_status
                    await asyncio.sleep(p.starve_b_at)  # the scenario's schedule, not synchronisation
                    t0 = time.perf_counter()
                    async with s.post(server.url + "/v1/chat/completions", data=self.chat("m2", p.chat_tokens),
                                      headers=JSON_HEADERS) as r:
                        await r.read()
                        b_status = r.status
                    b_wait = time.perf_counter() - t0

                await asyncio.wait_for(
                    asyncio.gather(b_request(), *(streamer() for _ in range(p.starve_clients))),
                    PHASE_DEADLINE_S)
        finally:
            self.reg.stop(server)
        return {"b_wait_s": b_wait, "b_status": b_status, "streams": len(statuses),
                "non_200": sum(1 for st in statuses if st != 200), "cut": cut}

    async def starvation(self) -> dict[str, Any]:
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in self.routers}
        for i in range(self.plan.starve_runs):
            order = self.routers if i % 2 == 0 else tuple(reversed(self.routers))
            for key in order:
                r = await self.starve_once(key, f"starve{i}")
                runs[key].append(r)
                self.log(f"  starvation {key}: B waited {r['b_wait_s']:.2f}s (status {r['b_status']}), "
                         f"{r['streams']} streams, {r['cut']} cut, {r['non_200']} non-200")
        return {
            k: {"b_wait_s": [r["b_wait_s"] for r in v], "b_status": [r["b_status"] for r in v],
                "streams": sum(r["streams"] for r in v), "cut": sum(r["cut"] for r in v),
                "non_200": sum(r["non_200"] for r in v)}
            for k, v in runs.items()
        }

    async def hot(self, rounds: int) -> dict[str, Any]:
        """The two hot models' p50 in the skewed thrash against uncontended runs (ours,
        `--models-max 6`), alternating, `rounds` of each: a single uncontended run varies
        too much from run to run to measure a ratio against."""
        contended: list[dict[str, Any]] = []
        calm: list[dict[str, Any]] = []
        for i in range(rounds):
            contended.append(await self.thrash_once("llamarouter", SKEW, 2, f"hot{i}"))
            calm.append(await self.thrash_once("llamarouter", SKEW, len(MODELS), f"calm{i}"))
            c, u = contended[-1]["p50_by_model_s"], calm[-1]["p50_by_model_s"]
            self.log(f"  hot p50, --models-max 2: m1 {c['m1']:.3f}s m2 {c['m2']:.3f}s "
                     f"({contended[-1]['req_per_s']:.1f} req/s); --models-max 6: m1 {u['m1']:.3f}s m2 {u['m2']:.3f}s")
        c, u = _summary(contended), _summary(calm)
        return {"contended": c, "uncontended": u,
                "ratio": {m: c["p50_by_model_s"][m] / u["p50_by_model_s"][m] for m in ("m1", "m2")}}

    async def run(self) -> dict[str, Any]:
        out: dict[str, Any] = {"plan": {"clients": self.plan.clients, "requests": self.plan.requests,
                                        "thrash_runs": self.plan.thrash_runs, "starve_runs": self.plan.starve_runs,
                                        "flags": list(self.plan.flags), "ours_extra": self.extra_ours}}
        self.log("scheduling: uniform thrash (6 models, --models-max 2)")
        out["uniform"] = await self.thrash("uniform", [1.0] * len(MODELS))
        self.log("scheduling: skewed thrash")
        out["skewed"] = await self.thrash("skewed", SKEW)
        uncontended = await self.thrash_once("llamarouter", SKEW, len(MODELS), "uncontended")
        out["skewed_uncontended"] = _summary([uncontended])
        self.log(f"  uncontended (ours, --models-max 6): p50 m1 {uncontended['p50_by_model_s']['m1']:.3f}s "
                 f"m2 {uncontended['p50_by_model_s']['m2']:.3f}s")
        if self.plan.one_thread:
            one = (*self.plan.flags, "-t", "1")
            self.log("scheduling: uniform and skewed thrash, one thread per child (-t 1)")
            out["uniform_t1"] = await self.thrash("uniform_t1", [1.0] * len(MODELS), one)
            out["skewed_t1"] = await self.thrash("skewed_t1", SKEW, one)
        self.log("scheduling: starvation (--models-max 1)")
        out["starvation"] = await self.starvation()
        return out


def _own_cpu(pid: int) -> float:
    """CPU seconds of the router process itself (not its children)."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def _children_cpu() -> float:
    """CPU seconds of this process's reaped descendants (the routers and, through them,
    their children)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    med = statistics.median
    return {
        "req_per_s": med(r["req_per_s"] for r in runs),
        "cpu_ms_per_req": med(r["cpu_ms_per_req"] for r in runs),
        "p50_s": med(r["p50_s"] for r in runs),
        "p99_s": med(r["p99_s"] for r in runs),
        "p50_by_model_s": {m: med(r["p50_by_model_s"][m] for r in runs) for m in MODELS},
        "non_200": sum(r["non_200"] for r in runs),
        "runs": [{k: r[k] for k in ("req_per_s", "p50_s", "p99_s", "non_200", "wall_s", "cpu_ms_per_req")}
                 for r in runs],
        "errors": [e for r in runs for e in r["errors"]][:5],
    }


def table(res: dict[str, Any]) -> str:
    """The markdown rows docs/benchmarks.md shows (also printed by a standalone run)."""
    lines = ["| scenario | upstream router | llamarouter | ratio |", "|---|---:|---:|---:|"]
    for scen in ("uniform", "skewed", "uniform_t1", "skewed_t1"):
        if scen not in res:
            continue
        up, us = res[scen]["upstream"], res[scen]["llamarouter"]
        if scen.endswith("_t1"):
            lines.append(f"| {scen[:-3]} thrash, `-t 1`: req/s | {up['req_per_s']:.1f} | {us['req_per_s']:.1f} | "
                         f"{us['req_per_s'] / up['req_per_s']:.2f}x |")
            lines.append(f"| {scen[:-3]} thrash, `-t 1`: p50 / p99 | {up['p50_s']:.2f} / {up['p99_s']:.2f} s | "
                         f"{us['p50_s']:.2f} / {us['p99_s']:.2f} s | {us['p99_s'] / up['p99_s']:.2f}x (p99) |")
            continue
        lines.append(f"| {scen} thrash: CPU per request (router and children) | {up['cpu_ms_per_req']:.1f} ms | "
                     f"{us['cpu_ms_per_req']:.1f} ms | {us['cpu_ms_per_req'] / up['cpu_ms_per_req']:.2f}x |")
        lines.append(f"| {scen} thrash: req/s | {up['req_per_s']:.1f} | {us['req_per_s']:.1f} | "
                     f"{us['req_per_s'] / up['req_per_s']:.2f}x |")
        lines.append(f"| {scen} thrash: p50 | {up['p50_s']:.2f} s | {us['p50_s']:.2f} s | "
                     f"{us['p50_s'] / up['p50_s']:.2f}x |")
        lines.append(f"| {scen} thrash: p99 | {up['p99_s']:.2f} s | {us['p99_s']:.2f} s | "
                     f"{us['p99_s'] / up['p99_s']:.2f}x |")
        lines.append(f"| {scen} thrash: non-200 | {up['non_200']} | {us['non_200']} | |")
    unc = res["skewed_uncontended"]["p50_by_model_s"]
    sk = res["skewed"]["llamarouter"]["p50_by_model_s"]
    sku = res["skewed"]["upstream"]["p50_by_model_s"]
    for m in ("m1", "m2"):
        lines.append(f"| skewed: hot model {m} p50 (uncontended, ours: {unc[m]:.3f} s) | {sku[m]:.3f} s | "
                     f"{sk[m]:.3f} s | {sk[m] / unc[m]:.2f}x of uncontended |")
    st = res["starvation"]
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    lines.append(f"| starvation: B's wait, each run | {fmt(st['upstream']['b_wait_s'])} s | "
                 f"{fmt(st['llamarouter']['b_wait_s'])} s | |")
    lines.append(f"| starvation: A's streams (cut / non-200) | {st['upstream']['streams']} "
                 f"({st['upstream']['cut']} / {st['upstream']['non_200']}) | {st['llamarouter']['streams']} "
                 f"({st['llamarouter']['cut']} / {st['llamarouter']['non_200']}) | |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from .run import bench_env, find_binary

    ap = argparse.ArgumentParser(prog="python -m bench.sched", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only", choices=("uniform", "skewed", "starvation", "hot"), default=None,
                    help="one scenario; hot: the skewed thrash's hot models against uncontended runs (ours only)")
    ap.add_argument("--rounds", type=int, default=5, help="--only hot: runs of each")
    ap.add_argument("--ours-arg", action="append", default=[], help="extra llamarouter flag (repeatable)")
    ap.add_argument("--llamarouter", default=str(Path(sys.executable).with_name("llamarouter")))
    ap.add_argument("--router", choices=ROUTERS, action="append", default=None,
                    help="measure only this router (repeatable; default both)")
    ap.add_argument("--keep-work", action="store_true", help="keep the work dir (logs)")
    ap.add_argument("--flags", default=None,
                    help="llama-server flags for both routers' children (default: the plan's, with -t 1)")
    args = ap.parse_args(argv)
    plan = QUICK if args.quick else SchedPlan()
    if args.flags is not None:
        plan = dataclasses.replace(plan, flags=tuple(args.flags.split()))
    work = Path(tempfile.mkdtemp(prefix="llamarouter-sched-"))
    reg = ProcessRegistry(bench_env(work))
    sched = Sched(find_binary(), args.llamarouter, reg, work, plan, args.ours_arg,
                  log=lambda m: print(f"[sched {time.strftime('%H:%M:%S')}] {m}", flush=True))
    if args.router:
        sched.routers = tuple(args.router)
    try:
        if args.only == "uniform":
            res: dict[str, Any] = {"uniform": asyncio.run(sched.thrash("uniform", [1.0] * len(MODELS)))}
        elif args.only == "skewed":
            res = {"skewed": asyncio.run(sched.thrash("skewed", SKEW))}
        elif args.only == "starvation":
            res = {"starvation": asyncio.run(sched.starvation())}
        elif args.only == "hot":
            res = {"hot": asyncio.run(sched.hot(args.rounds))}
        else:
            res = asyncio.run(sched.run())
            print(table(res))
    finally:
        problems = reg.cleanup()
        if problems:
            print("cleanup problems:\n  " + "\n  ".join(problems), file=sys.stderr)
        if args.keep_work:
            print(f"[sched] work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2, default=str))
    print(json.dumps(res, indent=1, default=str)[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
