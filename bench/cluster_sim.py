"""A pool of llamarouter replicas, simulated: replays one request trace over N routers,
first spread at random (a plain Service), then by a Gateway API Inference Extension
endpoint picker scoring each router from the gauges llamarouter exports for it
(docs/metrics.md), and reports model loads, evictions and time to first byte.

    python -m bench.cluster_sim                          # 3 routers, --models-max 2, 8 models
    python -m bench.cluster_sim --routers 4 --models 12 --rate 3
    python -m bench.cluster_sim --write-trace t.jsonl    # the generated trace, to replay
    python -m bench.cluster_sim --trace t.jsonl          # one JSON object a line: t, model, service_s

Nothing runs for real: each router is a discrete-event model of llamarouter's scheduling.

- A router holds at most --models-max models, each loaded or loading. A request for a
  loaded model goes to its child, which serves --parallel requests at once and defers the
  rest (llama-server's slots). A request for a model that is not loaded starts its load
  when a slot is free; otherwise the least recently used idle model is evicted for it;
  with every loaded model busy it waits in the router for one to become idle (in arrival
  order, as upstream's router; llamarouter's own contention rules, draining a busy model
  after a bound and serving the most-waited model first, are left out).
- A model's load takes its load time (drawn per model between --load-min and --load-max,
  the same on every router); time to first byte is the wait for load and slot plus
  --first-token.
- The picker's score for a router, computed when the request arrives from the values
  llamarouter's /metrics would show then (the picker refreshes every 50 ms by default, so
  its staleness is left out): the LoRA-affinity rule on `llamarouter_loaded_models_info`
  (1.0 the model is loaded, 0.8 loaded + waiting < max, 0.6 the model is waiting, else 0),
  the queue rule on `llamarouter_total_queued_requests` (min-max normalised, 1 when all are
  equal) and the KV-cache rule 1 - `llamarouter_kv_cache_usage_ratio` (busy slots of the
  fullest child stand in for its cache use), weighted as in
  deploy/kubernetes/inference-pool/endpoint-picker.yaml (--weights); the highest total
  wins, ties at random.

Reports a Markdown table (and --json): per policy the loads, evictions, time to first
byte (mean, p50, p95, p99) and the largest router queue.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import sys
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Scorer weights of the example picker configuration (affinity, queue, KV cache). Affinity
#: outweighs the other two together, so a full router without the model never ties with
#: the one that has it loaded (`--weights 3,2,1` shows what such ties cost).
WEIGHTS = (5.0, 2.0, 1.0)


@dataclass(frozen=True)
class Request:
    t: float
    model: str
    service_s: float


@dataclass
class Router:
    models_max: int
    parallel: int
    loaded: OrderedDict[str, None] = field(default_factory=OrderedDict)  # LRU first
    loading: set[str] = field(default_factory=set)
    running: dict[str, int] = field(default_factory=dict)
    deferred: dict[str, deque[tuple[int, Request]]] = field(default_factory=dict)
    slot_queue: deque[tuple[int, Request]] = field(default_factory=deque)
    loads: int = 0
    evictions: int = 0
    max_queue: int = 0

    # --------------------------------------------------------------- what /metrics shows
    def waiting_models(self) -> set[str]:
        return self.loading | {req.model for _, req in self.slot_queue}

    def queued(self) -> int:
        return len(self.slot_queue) + sum(len(q) for q in self.deferred.values())

    def kv_usage(self) -> float:
        return max((n / self.parallel for n in self.running.values()), default=0.0)

    def affinity(self, model: str) -> float:
        waiting = self.waiting_models()
        if model in self.loaded:
            return 1.0
        if len(self.loaded) + len(waiting) < self.models_max:
            return 0.8
        return 0.6 if model in waiting else 0.0

    def idle(self, model: str) -> bool:
        return not self.running.get(model) and not self.deferred.get(model)


class Cluster:
    """Discrete-event simulation of the routers for one policy."""

    def __init__(self, n: int, models_max: int, parallel: int, load_s: dict[str, float],
                 first_token_s: float, pick: Callable[[Cluster, Request], int]) -> None:
        self.routers = [Router(models_max, parallel) for _ in range(n)]
        self.load_s = load_s
        self.first_token_s = first_token_s
        self.pick = pick
        self.now = 0.0
        self.events: list[tuple[float, int, str, int, object]] = []
        self._seq = 0
        self.ttfb: dict[int, float] = {}

    def _at(self, t: float, kind: str, router: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, self._seq, kind, router, payload))

    def run(self, trace: Sequence[Request]) -> None:
        for i, req in enumerate(trace):
            self._at(req.t, "arrive", -1, (i, req))
        while self.events:
            self.now, _, kind, r, payload = heapq.heappop(self.events)
            if kind == "arrive":
                i, req = payload  # type: ignore[misc]
                self._dispatch(self.pick(self, req), i, req)
            elif kind == "loaded":
                self._loaded(r, str(payload))
            else:
                self._done(r, str(payload))
        assert len(self.ttfb) == len(trace), "every request is served exactly once"

    # --------------------------------------------------------------- one router
    def _dispatch(self, r: int, i: int, req: Request) -> None:
        router = self.routers[r]
        m = req.model
        if m in router.loaded:
            router.loaded.move_to_end(m)
            router.deferred.setdefault(m, deque()).append((i, req))
            self._start(r, m)
        elif m in router.loading:
            router.deferred.setdefault(m, deque()).append((i, req))
        elif self._make_room(router):
            self._load(r, m)
            router.deferred.setdefault(m, deque()).append((i, req))
        else:
            router.slot_queue.append((i, req))
        router.max_queue = max(router.max_queue, router.queued())

    def _make_room(self, router: Router) -> bool:
        if len(router.loaded) + len(router.loading) < router.models_max:
            return True
        victim = next((m for m in router.loaded if router.idle(m)), None)
        if victim is None:
            return False
        del router.loaded[victim]
        router.evictions += 1
        return True

    def _load(self, r: int, model: str) -> None:
        router = self.routers[r]
        router.loading.add(model)
        router.loads += 1
        self._at(self.now + self.load_s[model], "loaded", r, model)

    def _loaded(self, r: int, model: str) -> None:
        router = self.routers[r]
        router.loading.discard(model)
        router.loaded[model] = None
        self._start(r, model)
        self._admit(r)

    def _start(self, r: int, model: str) -> None:
        router = self.routers[r]
        queue = router.deferred.get(model)
        while queue and router.running.get(model, 0) < router.parallel:
            i, req = queue.popleft()
            router.running[model] = router.running.get(model, 0) + 1
            self.ttfb[i] = self.now - req.t + self.first_token_s
            self._at(self.now + req.service_s, "done", r, model)

    def _done(self, r: int, model: str) -> None:
        router = self.routers[r]
        router.running[model] -= 1
        self._start(r, model)
        if router.idle(model):
            self._admit(r)

    def _admit(self, r: int) -> None:
        """Requests waiting for a model slot, in arrival order: those whose model is now
        loaded or loading join it; the others get slots while slots can be had."""
        router = self.routers[r]
        waiting, router.slot_queue = router.slot_queue, deque()
        room = True
        for i, req in waiting:
            if req.model in router.loaded or req.model in router.loading:
                self._dispatch(r, i, req)
            elif room and self._make_room(router):
                self._load(r, req.model)
                router.deferred.setdefault(req.model, deque()).append((i, req))
            else:
                room = False
                router.slot_queue.append((i, req))


# ------------------------------------------------------------------- policies
def random_policy(rng: random.Random) -> Callable[[Cluster, Request], int]:
    def pick(cluster: Cluster, req: Request) -> int:
        return rng.randrange(len(cluster.routers))
    return pick


def picker_policy(rng: random.Random, weights: tuple[float, float, float] = WEIGHTS
                  ) -> Callable[[Cluster, Request], int]:
    w_aff, w_queue, w_kv = weights

    def pick(cluster: Cluster, req: Request) -> int:
        queued = [r.queued() for r in cluster.routers]
        lo, hi = min(queued), max(queued)
        best: list[int] = []
        top = -1.0
        for idx, router in enumerate(cluster.routers):
            queue_score = 1.0 if hi == lo else (hi - queued[idx]) / (hi - lo)
            score = (w_aff * router.affinity(req.model) + w_queue * queue_score
                     + w_kv * (1.0 - router.kv_usage()))
            if score > top + 1e-12:
                top, best = score, [idx]
            elif abs(score - top) <= 1e-12:
                best.append(idx)
        return rng.choice(best)
    return pick


# ------------------------------------------------------------------- trace
def generate_trace(rng: random.Random, requests: int, models: int, rate: float,
                   zipf_s: float, service_mean: float) -> list[Request]:
    """Poisson arrivals; model popularity Zipf(s) over m0..m{models-1}; service times
    exponential (a generation's length), capped at ten times the mean."""
    names = [f"m{i}" for i in range(models)]
    weights = [1 / (k + 1) ** zipf_s for k in range(models)]
    t = 0.0
    out = []
    for _ in range(requests):
        t += rng.expovariate(rate)
        service = min(rng.expovariate(1 / service_mean), 10 * service_mean)
        out.append(Request(round(t, 4), rng.choices(names, weights)[0], round(service, 4)))
    return out


def read_trace(path: Path) -> list[Request]:
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            out.append(Request(float(item["t"]), str(item["model"]), float(item["service_s"])))
        except (ValueError, KeyError, TypeError) as exc:
            raise SystemExit(f"{path}:{n}: not a trace line ({exc}): {line[:80]}") from None
    return sorted(out, key=lambda r: r.t)


def load_times(seed: int, names: Sequence[str], lo: float, hi: float) -> dict[str, float]:
    """Per model, from its own generator: the same for a generated trace and its replay."""
    rng = random.Random(f"load-{seed}")
    return {name: round(rng.uniform(lo, hi), 3) for name in sorted(set(names))}


# ------------------------------------------------------------------- report
def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def simulate(trace: Sequence[Request], policy: str, routers: int, models_max: int,
             parallel: int, load_s: dict[str, float], first_token_s: float, seed: int,
             weights: tuple[float, float, float] = WEIGHTS) -> dict[str, object]:
    rng = random.Random(seed)
    pick = random_policy(rng) if policy == "random" else picker_policy(rng, weights)
    cluster = Cluster(routers, models_max, parallel, load_s, first_token_s, pick)
    cluster.run(trace)
    ttfb = list(cluster.ttfb.values())
    return {
        "policy": policy,
        "requests": len(trace),
        "loads": sum(r.loads for r in cluster.routers),
        "evictions": sum(r.evictions for r in cluster.routers),
        "loads_per_router": [r.loads for r in cluster.routers],
        "ttfb_mean_s": round(statistics.fmean(ttfb), 3),
        "ttfb_p50_s": round(percentile(ttfb, 0.50), 3),
        "ttfb_p95_s": round(percentile(ttfb, 0.95), 3),
        "ttfb_p99_s": round(percentile(ttfb, 0.99), 3),
        "max_router_queue": max(r.max_queue for r in cluster.routers),
    }


def table(results: Sequence[dict[str, object]]) -> str:
    head = ("| routing | loads | evictions | loads per router | TTFB mean | p50 | p95 | p99 "
            "| largest router queue |\n|---|---|---|---|---|---|---|---|---|")
    rows = [
        f"| {r['policy']} | {r['loads']} | {r['evictions']} | "
        f"{', '.join(map(str, r['loads_per_router']))} | {r['ttfb_mean_s']} s | "  # type: ignore[call-overload]
        f"{r['ttfb_p50_s']} s | {r['ttfb_p95_s']} s | {r['ttfb_p99_s']} s | {r['max_router_queue']} |"
        for r in results
    ]
    return "\n".join([head, *rows])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cluster_sim", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--routers", type=int, default=3)
    p.add_argument("--models-max", type=int, default=2)
    p.add_argument("--parallel", type=int, default=4, help="requests a child serves at once (-np)")
    p.add_argument("--models", type=int, default=8)
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--rate", type=float, default=1.0, help="requests per second, Poisson")
    p.add_argument("--zipf", type=float, default=1.0, help="model popularity skew")
    p.add_argument("--service-mean", type=float, default=3.0, help="seconds a request is served")
    p.add_argument("--load-min", type=float, default=5.0, help="seconds, the fastest model load")
    p.add_argument("--load-max", type=float, default=15.0, help="seconds, the slowest model load")
    p.add_argument("--first-token", type=float, default=0.1, help="seconds from slot to first byte")
    p.add_argument("--weights", default=",".join(f"{w:g}" for w in WEIGHTS),
                   help="the picker's affinity,queue,kv-cache scorer weights")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--trace", type=Path, help="replay this JSONL trace instead of generating one")
    p.add_argument("--write-trace", type=Path, help="write the trace used to this file")
    p.add_argument("--json", action="store_true", help="JSON instead of a Markdown table")
    args = p.parse_args(argv)
    for name in ("routers", "models_max", "parallel", "models", "requests"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.load_min <= args.load_max or args.rate <= 0 or args.service_mean <= 0:
        p.error("--rate, --service-mean and 0 < --load-min <= --load-max must be positive")

    try:
        w_aff, w_queue, w_kv = (float(w) for w in args.weights.split(","))
    except ValueError:
        p.error(f"--weights takes three numbers, affinity,queue,kv-cache: {args.weights!r}")
    if min(w_aff, w_queue, w_kv) < 0:
        p.error("--weights must not be negative")

    rng = random.Random(args.seed)
    if args.trace:
        trace = read_trace(args.trace)
        if not trace:
            p.error(f"{args.trace} holds no requests")
    else:
        trace = generate_trace(rng, args.requests, args.models, args.rate, args.zipf, args.service_mean)
    if args.write_trace:
        args.write_trace.write_text("".join(
            json.dumps({"t": r.t, "model": r.model, "service_s": r.service_s}) + "\n" for r in trace))
    load_s = load_times(args.seed, [r.model for r in trace], args.load_min, args.load_max)
    results = [
        simulate(trace, policy, args.routers, args.models_max, args.parallel, load_s,
                 args.first_token, args.seed, (w_aff, w_queue, w_kv))
        for policy in ("random", "picker")
    ]
    if args.json:
        json.dump({"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                   "load_s": load_s, "results": results}, sys.stdout, indent=1)
        print()
    else:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
