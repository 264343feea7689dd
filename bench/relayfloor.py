"""The floor under the router's CPU per relayed SSE event on this machine.

Relaying an event costs at least a wakeup, a read from one loopback socket and a write
to another, most of it in the kernel, whatever the relay is written in. This measures
that floor without HTTP: `bench/relayfloor.c` (built here with `cc`) runs a source that
writes one 128-byte event to each of 16 loopback connections every `--period-us`
microseconds (bursts, as a batched decode step produces them; 2300 µs is about the
7,000 events/s of `make bench`'s 16-stream phase), a sink that reads them, and a relay
between the two: the C program's own (epoll, recv, send) or a Python one on uvloop whose
read callback writes each read to the other transport (what llamarouter's relay does per
chunk, less the HTTP framing). Relays alternate; the figures are medians of the repeats
of the relay process's CPU time (user + system, from getrusage) per event.

    .venv/bin/python -m bench.relayfloor [--repeats 5] [--seconds 5] [--period-us 2300]
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

EVENT = 128
STREAMS = 16
SOURCE = Path(__file__).with_name("relayfloor.c")


class _Down(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _Up(asyncio.Protocol):
    def __init__(self, down: asyncio.WriteTransport, done: asyncio.Future[None], counts: list[int]) -> None:
        self.down, self.done, self.counts = down, done, counts

    def data_received(self, data: bytes) -> None:
        self.counts[0] += len(data) // EVENT
        self.down.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.down.close()
        if not self.done.done():
            self.done.set_result(None)


async def _relay(listen_fd: int, sink_port: int) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.socket(fileno=listen_fd)
    listener.setblocking(False)
    pairs = []
    for _ in range(STREAMS):
        up, _ = await asyncio.wait_for(loop.sock_accept(listener), 30)
        down, _ = await loop.create_connection(_Down, "127.0.0.1", sink_port)
        pairs.append((up, down))
    counts = [0]
    before = resource.getrusage(resource.RUSAGE_SELF)
    done = []
    for up, down in pairs:
        fut: asyncio.Future[None] = loop.create_future()
        done.append(fut)
        await loop.connect_accepted_socket(lambda d=down, f=fut: _Up(d, f, counts), up)  # type: ignore[misc]
    await asyncio.wait_for(asyncio.gather(*done), 600)
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    print(counts[0], f"{cpu:.9f}")


def _run_relay(listen_fd: int, sink_port: int) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(_relay(listen_fd, sink_port))
    else:
        uvloop.run(_relay(listen_fd, sink_port))


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.relayfloor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5, help="per relay and repeat")
    ap.add_argument("--period-us", type=int, default=2300, help="between bursts of 16 events")
    ap.add_argument("--relay", nargs=2, type=int, metavar=("FD", "PORT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.relay:
        _run_relay(*args.relay)
        return 0
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        print("no C compiler (cc) found: the floor needs one", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="relayfloor-") as tmp:
        binary = str(Path(tmp) / "relayfloor")
        subprocess.run([cc, "-O2", "-o", binary, str(SOURCE)], check=True)
        base = [binary, str(args.period_us), str(args.seconds)]
        relays = {
            "C (epoll, recv, send)": base,
            "Python on uvloop (the read callback writes)": [*base, sys.executable, "-m", "bench.relayfloor", "--relay"],
        }
        per_event: dict[str, list[float]] = {name: [] for name in relays}
        rates: list[float] = []
        names = list(relays)
        for i in range(args.repeats):
            for name in names[i % 2:] + names[:i % 2]:  # alternate which goes first
                done = subprocess.run(relays[name], capture_output=True, text=True, check=True,
                                      timeout=args.seconds + 60, cwd=Path(__file__).parent.parent)
                events, cpu = done.stdout.split()
                per_event[name].append(float(cpu) * 1e6 / int(events))
                rates.append(int(events) / args.seconds)
    print(f"{args.repeats} repeats x {args.seconds} s, 16 streams, a burst every {args.period_us} µs "
          f"(~{statistics.median(rates):.0f} events/s)")
    for name, values in per_event.items():
        print(f"  {name}: {statistics.median(values):.2f} µs CPU per event "
              f"(range {min(values):.2f}-{max(values):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
