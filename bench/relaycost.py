"""Router CPU per relayed request and per SSE event: the figure that decides relay cost.

Wall-clock figures on a small shared machine move by tens of percent between runs; the
CPU seconds a router process spends (from /proc, via psutil) per request and per relayed
SSE event do not. This runs the small-request, one-token-chat and 16-stream phases of
`make bench` (same targets, same interleaving) and, with `--before REV`, adds a fourth
target: llamarouter as of that git revision, so a change is measured against its parent
in the same run.

    .venv/bin/python -m bench.relaycost --before HEAD~1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from . import rawburst
from .procs import ProcessRegistry
from .run import QUICK, ROOT, Bench, Plan, Target, bench_env, find_binary, new_session, parse_args, rotations


class RelayCost(Bench):
    def __init__(self, args: argparse.Namespace, plan: Plan, reg: ProcessRegistry, work: Path,
                 before: Path | None) -> None:
        super().__init__(args, plan, reg, work)
        self.before = before

    async def start_main(self) -> None:
        await super().start_main()
        if self.before is None:
            return
        tree = self.before

        def argv(port: int) -> list[str]:
            common = self.router_argv("llamarouter", self.models_dir, port)[1:]
            return ["env", f"PYTHONPATH={tree}", self.args.llamarouter, *common]

        server = await self.start("before", argv)
        t = self.targets["before"] = Target("before", server, new_session())
        from .run import post

        body = b'{"model": "alpha", "content": "warm up"}'
        _, status = await post(t.session, t.url + "/tokenize", body)
        if status != 200:
            raise RuntimeError(f"before: warm-up /tokenize answered {status}\n{server.log_tail()}")

    async def run(self) -> dict[str, Any]:
        p = self.plan
        self.plan.many_files = 0
        self.make_models()
        await self.start_main()
        try:
            await self.sequential("small", "/tokenize", {"model": "alpha", "content": "hello world"},
                                  p.small_rounds, p.small_per_round)
            await self.sequential(
                "chat", "/v1/chat/completions",
                {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
                p.chat_rounds, p.chat_per_round)
            await self.streams()
            await self.raw_bursts(self.plan.stream_rounds_16)
        finally:
            await self.stop_main()
        return self.results


    async def raw_bursts(self, rounds: int) -> None:
        """The 16-stream phase again with the raw-socket client (bench/rawburst.py),
        interleaved the same way; the client runs in a thread so nothing else in this
        process wakes up during a round."""
        req = rawburst.request("alpha", self.plan.stream_tokens)
        ttft: dict[str, list[float]] = {k: [] for k in self.targets}
        rates: dict[str, list[float]] = {k: [] for k in self.targets}
        for order in rotations(list(self.targets), rounds * len(self.targets)):
            key = order[0]
            port = self.targets[key].server.port
            try:
                first, events, wall = await asyncio.to_thread(rawburst.one_round, port, req)
            except (OSError, TimeoutError) as exc:
                self.results["errors"].setdefault("raw16", {})[key] = f"{type(exc).__name__}: {exc}"
                continue
            ttft[key] += first
            rates[key].append(events / wall)
        self.results["raw16"] = {k: rawburst.summarize(ttft[k], rates[k]) for k in self.targets}


def export_tree(rev: str, dest: Path) -> Path:
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def summary(r: dict[str, Any], keys: list[str]) -> str:
    s16 = (r.get("streams") or {}).get("16", {})
    lines = ["| figure | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]

    def row(label: str, get: Any, fmt: str) -> None:
        cells = []
        for k in keys:
            v = get(k)
            cells.append(fmt.format(v) if isinstance(v, (int, float)) else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("POST /tokenize: CPU µs per request", lambda k: r["small"][k]["cpu_us_per_req"], "{:.0f}")
    row("POST /tokenize: p50 ms", lambda k: r["small"][k]["p50_ms"], "{:.2f}")
    row("chat max_tokens=1: CPU µs per request", lambda k: r["chat"][k]["cpu_us_per_req"], "{:.0f}")
    row("chat max_tokens=1: p50 ms", lambda k: r["chat"][k]["p50_ms"], "{:.2f}")
    row("16 streams: CPU µs per SSE event", lambda k: s16[k]["cpu_us_per_event"], "{:.1f}")
    row("16 streams: SSE events/s", lambda k: s16[k]["events_per_s"], "{:.0f}")
    row("16 streams: TTFT p50 ms", lambda k: s16[k]["ttft_p50_ms"], "{:.1f}")
    row("16 streams: TTFT p99 ms", lambda k: s16[k]["ttft_p99_ms"], "{:.1f}")
    raw = r.get("raw16") or {}
    if raw:
        row("16 streams, raw-socket client: TTFT p50 ms", lambda k: raw[k]["ttft_p50_ms"], "{:.1f}")
        row("16 streams, raw-socket client: TTFT p99 ms", lambda k: raw[k]["ttft_p99_ms"], "{:.1f}")
        row("16 streams, raw-socket client: SSE events/s", lambda k: raw[k]["events_per_s"], "{:.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    before_rev = None
    if "--before" in argv:
        i = argv.index("--before")
        before_rev = argv[i + 1]
        del argv[i: i + 2]
    args = parse_args(argv)
    args.server_bin = args.server_bin or find_binary()
    plan = Plan(**{**QUICK.__dict__, "stream_ns": (16,), "stream_rounds_16": 3}) if args.quick else Plan(
        small_rounds=6, small_per_round=200, chat_rounds=4, chat_per_round=40,
        stream_rounds_16=80, stream_ns=(16,), many_files=0,
    )
    work = Path(tempfile.mkdtemp(prefix="llamarouter-relaycost-"))
    reg = ProcessRegistry(bench_env(work))
    before = export_tree(before_rev, work / "before") if before_rev else None
    bench = RelayCost(args, plan, reg, work, before)
    try:
        results = asyncio.run(bench.run())
    finally:
        problems = reg.cleanup()
        if problems:
            print("cleanup problems:\n  " + "\n  ".join(problems), file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    keys = ["direct", "upstream", *(["before"] if before else []), "llamarouter"]
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(summary(results, keys))
    if results.get("errors"):
        print("errors:", results["errors"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
