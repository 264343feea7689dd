"""Router CPU per relayed request and per SSE event: the figure that decides relay cost.

Wall-clock figures on a small shared machine move by tens of percent between runs; the
CPU seconds a router process spends (from /proc, via psutil) per request and per relayed
SSE event do not. This runs the small-request, one-token-chat and 16-stream phases of
`make bench` (same targets, same interleaving), then the 16-stream phase again with a
raw-socket client (bench/rawburst.py). `--before REV` adds a target: llamarouter as of
that git revision, so a change is measured against its parent in the same run;
`--variant NAME=FLAGS` (repeatable) adds llamarouter with extra flags; `--one-stream`
adds the one-stream phase.

    .venv/bin/python -m bench.relaycost --before HEAD~1
    .venv/bin/python -m bench.relaycost --one-stream --variant nice5='--child-nice 5'
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
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
                 before: Path | None, variants: list[tuple[str, list[str]]] | None = None) -> None:
        super().__init__(args, plan, reg, work)
        self.before = before
        self.variants = variants or []

    async def start_main(self) -> None:
        await super().start_main()
        if self.before is not None:
            tree = self.before

            def before_argv(port: int) -> list[str]:
                common = self.router_argv("llamarouter", self.models_dir, port)[1:]
                return ["env", f"PYTHONPATH={tree}", self.args.llamarouter, *common]

            await self._extra("before", before_argv)
        for name, flags in self.variants:

            def variant_argv(port: int, flags: list[str] = flags) -> list[str]:
                return [*self.router_argv("llamarouter", self.models_dir, port), *flags]

            await self._extra(name, variant_argv)

    async def _extra(self, key: str, argv: Any) -> None:
        """One more llamarouter target, warmed up like the others."""
        from .run import post

        server = await self.start(key, argv)
        t = self.targets[key] = Target(key, server, new_session())
        body = b'{"model": "alpha", "content": "warm up"}'
        _, status = await post(t.session, t.url + "/tokenize", body)
        if status != 200:
            raise RuntimeError(f"{key}: warm-up /tokenize answered {status}\n{server.log_tail()}")

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
    s1 = (r.get("streams") or {}).get("1", {})
    if s1:
        row("1 stream: SSE events/s", lambda k: s1[k]["events_per_s"], "{:.0f}")
        row("1 stream: TTFT p50 ms", lambda k: s1[k]["ttft_p50_ms"], "{:.1f}")
        row("1 stream: CPU µs per SSE event", lambda k: s1[k]["cpu_us_per_event"], "{:.1f}")
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
    variants: list[tuple[str, list[str]]] = []
    while "--variant" in argv:
        i = argv.index("--variant")
        name, _, flags = argv[i + 1].partition("=")
        variants.append((name, shlex.split(flags)))
        del argv[i: i + 2]
    one_stream = "--one-stream" in argv
    if one_stream:
        argv.remove("--one-stream")
    args = parse_args(argv)
    args.server_bin = args.server_bin or find_binary()
    plan = Plan(**{**QUICK.__dict__, "stream_ns": (16,), "stream_rounds_16": 3}) if args.quick else Plan(
        small_rounds=6, small_per_round=200, chat_rounds=4, chat_per_round=40,
        stream_rounds_16=80, stream_ns=(1, 16) if one_stream else (16,), stream_rounds=40, many_files=0,
    )
    work = Path(tempfile.mkdtemp(prefix="llamarouter-relaycost-"))
    reg = ProcessRegistry(bench_env(work))
    before = export_tree(before_rev, work / "before") if before_rev else None
    bench = RelayCost(args, plan, reg, work, before, variants)
    try:
        results = asyncio.run(bench.run())
    finally:
        problems = reg.cleanup()
        if problems:
            print("cleanup problems:\n  " + "\n  ".join(problems), file=sys.stderr)
        shutil.rmtree(work, ignore_errors=True)
    keys = ["direct", "upstream", *(["before"] if before else []), *(n for n, _ in variants), "llamarouter"]
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    print(summary(results, keys))
    if results.get("errors"):
        print("errors:", results["errors"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
