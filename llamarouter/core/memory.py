"""The memory budget: what there is (NVML per GPU, else system RAM), what each model
needs (estimated from its GGUF before loading, measured from its load report after), and
whether one more model fits.

With no budget configured none of this runs, and scheduling counts models only, as upstream.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..errors import ConfigError
from ..settings.config import ModelSpec, Timeouts
from .gguf_info import Estimate, FactsCache, RunSettings, estimate
from .placement import Decision, DeviceState, ModelToPlace, PlacedModel, Placement, place
from .sleep import held_bytes, sleeping_from_log
from .states import State

if TYPE_CHECKING:
    from .process import ModelProcess
    from .scheduler import Candidate

log = logging.getLogger("llamarouter.core.memory")

_T = TypeVar("_T")

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(i?)B?\s*$", re.IGNORECASE)


def parse_bytes(text: str) -> int:
    """`24GiB`, `24G` (binary), `24GB` (decimal), `512MiB`, `1000000` -> bytes."""
    m = _SIZE.match(text)
    if m is None:
        raise ConfigError(f"not a size: {text!r} (use e.g. 24GiB, 512MB or a number of bytes)")
    number, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    if not unit:
        return int(number)
    power = "KMGT".index(unit) + 1
    decimal = text.strip().upper().endswith(unit + "B") and not binary
    return int(number * (1000 if decimal else 1024) ** power)


@dataclass(frozen=True)
class Device:
    name: str  # "cuda:0" or "cpu"
    total: int
    free: int


@dataclass(frozen=True)
class DeviceBudget:
    """One GPU's share of the budget: models placed on it count against `capacity`."""

    index: int  # NVML index
    name: str
    total: int
    margin: int

    @property
    def capacity(self) -> int:
        return self.total - self.margin


def parse_budget(text: str, margin: int, devices: Sequence[Device], gpu: bool) -> tuple[int, list[DeviceBudget]]:
    """`--memory-budget` as the pool's bytes and, for several GPUs' budgets, one per device.

    - `auto` on a GPU host: each GPU's total from NVML less the margin, which each device
      keeps (it is there for a child's device context, and every device holds its own);
    - `auto` without NVML: system RAM less the margin, one pool;
    - `24GiB,12GiB`: per device, NVML index 0, 1, ... (all of them, when NVML sees GPUs);
      like a single size, what you give is the budget, no margin taken off;
    - `20GiB`: one pool.
    """
    text = text.strip()
    if text.lower() == "auto":
        if not devices:
            raise ConfigError("--memory-budget auto: NVML did not report the GPUs' memory (see the log)")
        if not gpu:
            budget = sum(d.total for d in devices) - margin
            if budget <= 0:
                raise ConfigError(f"--memory-budget auto: the margin {margin} exceeds device memory")
            return budget, []
        per = [DeviceBudget(i, d.name, d.total, margin) for i, d in enumerate(devices)]
        small = [f"{b.name} ({b.total} bytes)" for b in per if b.capacity <= 0]
        if small:
            raise ConfigError(f"--memory-budget auto: the margin {margin} exceeds the memory of {', '.join(small)}")
        return sum(b.capacity for b in per), per
    if "," in text:
        sizes = [parse_bytes(part) for part in text.split(",")]
        if any(n <= 0 for n in sizes):
            raise ConfigError(f"--memory-budget {text}: every device needs a size above 0")
        if gpu and devices and len(sizes) != len(devices):
            raise ConfigError(
                f"--memory-budget {text}: {len(sizes)} sizes for {len(devices)} GPUs "
                f"({', '.join(d.name for d in devices)}); give one per GPU, or auto"
            )
        per = [DeviceBudget(i, f"cuda:{i}", n, 0) for i, n in enumerate(sizes)]
        return sum(sizes), per
    return parse_bytes(text), []


class DeviceProbe:
    """Reads device memory: NVML when an NVIDIA driver is present, else system RAM.

    A GPU that has fallen off the bus can leave NVML calls blocked in the driver for
    good (nvidia-smi hangs the same way). The calls come from the event loop's thread,
    so each runs on a daemon thread of its own and is waited for at most `timeout`
    seconds. While one that gave up has not returned, every later call gives up at
    once: a wedged driver stalls the router once, for `timeout`, and never piles up
    threads. A call that gives up or fails counts as "not known". Starting NVML gets
    `start_timeout` instead: without the persistence daemon, the driver initialises
    every GPU on that first call, which takes seconds on a host with several."""

    def __init__(self, timeout: float = Timeouts.device_probe, start_timeout: float = Timeouts.device_start) -> None:
        self._timeout = timeout
        self._stuck: threading.Thread | None = None
        self._nvml: object | None = None
        # NVML did not start in time: device figures would be the CPU host's, and wrong.
        self.start_failed = False
        pynvml = _import_pynvml()
        if pynvml is not None:
            started = self._bounded("start", lambda: _nvml_init(pynvml), start_timeout)
            self.start_failed = self.wedged
            if started:
                self._nvml = pynvml

    @property
    def gpu(self) -> bool:
        return self._nvml is not None

    @property
    def wedged(self) -> bool:
        """An NVML call gave up on the driver and has not returned since."""
        stuck = self._stuck
        return stuck is not None and stuck.is_alive()

    def _bounded(self, what: str, call: Callable[[], _T], limit: float | None = None) -> _T | None:
        limit = self._timeout if limit is None else limit
        if self.wedged:
            return None
        box: list[_T] = []

        def run() -> None:
            try:
                box.append(call())
            except Exception as exc:  # noqa: BLE001 (a driver error: the caller falls back)
                log.warning("NVML %s failed: %s", what, exc)

        worker = threading.Thread(target=run, name=f"nvml:{what}", daemon=True)
        worker.start()
        worker.join(limit or None)  # 0: no limit, as for the proxy timeout
        if worker.is_alive():
            self._stuck = worker
            log.error(
                "NVML did not answer (%s) within %gs; the GPU driver looks wedged, so device "
                "memory is unknown until it answers", what, limit,
            )
            return None
        return box[0] if box else None

    def devices(self) -> list[Device]:
        """Each GPU's memory, or system RAM without NVML; empty while NVML does not answer."""
        nv = self._nvml
        if nv is None:
            import psutil  # only with --memory-budget: off the router's resting memory otherwise

            vm = psutil.virtual_memory()
            return [Device("cpu", int(vm.total), int(vm.available))]

        def read() -> list[Device]:
            out = []
            for i in range(nv.nvmlDeviceGetCount()):  # type: ignore[attr-defined]  # pynvml is untyped and optional
                info = nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(i))  # type: ignore[attr-defined]  # pynvml is untyped and optional
                out.append(Device(f"cuda:{i}", int(info.total), int(info.free)))
            return out

        return self._bounded("memory info", read) or []

    def process_bytes(self, pid: int) -> int | None:
        """The VRAM one process uses over all GPUs, as NVML counts it (device context,
        library workspaces and every buffer); None without a GPU, when NVML lists no use,
        or when it does not answer."""
        nv = self._nvml
        if nv is None:
            return None

        def read() -> int:
            total = 0
            for i in range(nv.nvmlDeviceGetCount()):  # type: ignore[attr-defined]  # pynvml is untyped and optional
                handle = nv.nvmlDeviceGetHandleByIndex(i)  # type: ignore[attr-defined]  # pynvml is untyped and optional
                for p in nv.nvmlDeviceGetComputeRunningProcesses(handle):  # type: ignore[attr-defined]  # pynvml is untyped and optional
                    if p.pid == pid and p.usedGpuMemory:
                        total += int(p.usedGpuMemory)
            return total

        return self._bounded("process list", read) or None


def _import_pynvml() -> object | None:
    try:
        import pynvml
    except Exception:  # noqa: BLE001 (optional: absent or broken means no GPU figures)
        return None
    return pynvml  # type: ignore[no-any-return]  # pynvml is untyped and optional


def _nvml_init(nv: object) -> bool:
    """True when NVML starts and sees at least one GPU."""
    try:
        nv.nvmlInit()  # type: ignore[attr-defined]  # pynvml is untyped and optional
        return bool(nv.nvmlDeviceGetCount() > 0)  # type: ignore[attr-defined]  # pynvml is untyped and optional
    except Exception:  # noqa: BLE001 (no driver: a CPU host)
        return False


class MemoryManager:
    """Per-model estimates and measurements against one budget (bytes), and against each
    GPU's budget for the models placed on it when there are per-device budgets."""

    def __init__(
        self, budget: int, probe: DeviceProbe, recovery_wait: float, poll: float,
        devices: Sequence[DeviceBudget] = (),
    ) -> None:
        self.budget = budget
        self.probe = probe
        # Several GPUs' budgets (empty: one pool). Models count on a device once assigned.
        self.devices = list(devices)
        self._placements: dict[str, Placement] = {}
        # The latest placement decision per model, (action, reason): GET /models, /memory.
        self._decisions: dict[str, tuple[str, str]] = {}
        self._recovery_wait = recovery_wait
        self._poll = poll
        self._facts = FactsCache()
        # Estimates are the memory manager's, keyed by model and valid for one spec.
        self._estimates: dict[str, tuple[ModelSpec, Estimate]] = {}
        # GPU hosts: the largest per-child VRAM seen beyond the estimated buffers (device
        # context, library workspaces, the compute allowance's shortfall). A model not yet
        # measured counts its estimate plus this; 0 until a child was measured.
        self.context_bytes = 0

    @classmethod
    def from_setting(
        cls, text: str, margin: int, recovery_wait: float, poll: float, probe: DeviceProbe | None = None,
        probe_timeout: float = Timeouts.device_probe, start_timeout: float = Timeouts.device_start,
    ) -> MemoryManager:
        probe = probe or DeviceProbe(probe_timeout, start_timeout)
        if probe.start_failed:
            # Without NVML's figures a GPU host would be budgeted as a CPU host.
            raise ConfigError(f"--memory-budget: NVML did not start within {start_timeout:g}s (see the log)")
        needs_devices = text.strip().lower() == "auto" or (probe.gpu and "," in text)
        budget, per_device = parse_budget(text, margin, probe.devices() if needs_devices else [], probe.gpu)
        return cls(budget, probe, recovery_wait, poll, per_device)

    async def estimate_for(self, proc: ModelProcess, options: dict[str, str]) -> Estimate | None:
        """Estimate once per spec; None when the model file is unknown or unreadable."""
        known = self._estimates.get(proc.name)
        if known is not None and known[0] == proc.spec:
            return known[1]
        path = proc.spec.model_path
        if not path:
            return None
        try:
            facts = await asyncio.to_thread(self._facts.get, Path(path))
        except Exception as exc:  # noqa: BLE001 (a corrupt or unreadable file: the child will say why)
            log.warning("[%s] cannot read %s for a memory estimate: %s", proc.name, path, exc)
            return None
        est = estimate(facts, RunSettings.from_options(options), self.probe.gpu)
        self._estimates[proc.name] = (proc.spec, est)
        return est

    def estimate_of(self, proc: ModelProcess) -> Estimate | None:
        """The estimate made for the model's current spec, if any (no file access)."""
        known = self._estimates.get(proc.name)
        return known[1] if known is not None and known[0] == proc.spec else None

    def measure_device(self, proc: ModelProcess, pid: int) -> int | None:
        """The child's VRAM (NVML), learning the per-child overhead from it. Called from
        the child's life once ready and from its owner after the first request; synchronous,
        so nothing interleaves."""
        used = self.probe.process_bytes(pid)
        if used:
            est = self.estimate_of(proc)
            if est is not None:
                self.context_bytes = max(self.context_bytes, used - (est.weights_gpu + est.kv + est.compute))
        return used

    def footprint(self, proc: ModelProcess) -> int:
        """What a model counts against the budget: its measured load report when we have
        one, else the estimate (RSS is shown but not used: it counts shared pages). On a
        GPU host, at least the VRAM NVML saw its child use (once ready and after its first
        request) plus the weights -ngl leaves on the CPU: the device context and library workspaces are in no buffer
        report, and on a large GPU they are several hundred MiB per child. A model not yet
        measured adds the largest such overhead seen so far."""
        est = self.estimate_of(proc)
        base = proc.measured_bytes or (est.total if est is not None else 0)
        if proc.device_bytes:
            return max(base, proc.device_bytes + (est.weights_cpu if est is not None else 0))
        return base + self.context_bytes

    def asleep(self, proc: ModelProcess) -> int:
        """What a sleeping child still holds: nothing we can see on a CPU host; on a GPU
        host its device context, i.e. its measured VRAM less the weights, KV cache and
        compute buffers that sleep frees (as estimated, so it errs on the high side)."""
        if not proc.device_bytes:
            return 0
        est = self.estimate_of(proc)
        freed = est.weights_gpu + est.kv + est.compute if est is not None else 0
        return max(proc.device_bytes - freed, 0)

    def held(self, proc: ModelProcess) -> int:
        """What a model holds of the budget now: its footprint, or only what a sleeping
        child keeps (llama-server's --sleep-idle-seconds frees weights and context)."""
        sleeping = proc.state == State.READY and sleeping_from_log(proc.logs)
        return held_bytes(self.footprint(proc), sleeping, self.asleep(proc))

    def used(self, procs: Iterable[ModelProcess]) -> int:
        return sum(self.held(p) for p in procs if p.holds_slot)

    async def wait_recovered(self, need: int, placement: Placement | None = None) -> None:
        """After children exit, device memory (VRAM above all) can come back late; wait for
        the device to report `need` free (with a placement: each of its devices its share),
        bounded by the recovery wait."""
        deadline = time.monotonic() + self._recovery_wait
        while time.monotonic() < deadline:
            found = self.probe.devices()
            if placement is not None and placement.devices:
                if all(i < len(found) and found[i].free >= n
                       for i, n in zip(placement.devices, placement.bytes_on, strict=True)):
                    return
            elif max((d.free for d in found), default=0) >= need:
                return
            await asyncio.sleep(self._poll)
        log.warning("device memory did not come back to %d free bytes within %.1fs", need, self._recovery_wait)

    # --- several GPUs: placement -------------------------------------------------------

    def assign(self, name: str, placement: Placement) -> None:
        """Record where a model's child runs (from its start until it stops: `unassign`)."""
        self._placements[name] = placement

    def unassign(self, name: str) -> None:
        self._placements.pop(name, None)

    def placement_of(self, name: str) -> Placement | None:
        return self._placements.get(name)

    def decided(self, name: str, action: str, reason: str) -> bool:
        """Keep the latest decision for `name`; True when it differs from the one before."""
        new = (action, reason)
        changed = self._decisions.get(name) != new
        self._decisions[name] = new
        return changed

    def placement_view(self, name: str) -> dict[str, object] | None:
        """Where the model runs and why it was put there (or not yet, or refused), as
        GET /models and GET /memory show it; None before any decision."""
        seen = self._decisions.get(name)
        if seen is None:
            return None
        placement = self._placements.get(name)
        return {
            "action": seen[0], "reason": seen[1],
            **({"placement": placement.as_dict()} if placement is not None else {}),
        }

    def _shares(self, proc: ModelProcess) -> dict[int, int]:
        """What a placed model holds on each device now: what it holds of the budget, in
        the proportions of its placement (a measurement after the start rescales them)."""
        p = self._placements.get(proc.key)
        if p is None or not p.devices or not proc.holds_slot:
            return {}
        held = self.held(proc)
        planned = sum(p.bytes_on) or 1
        return {i: held * n // planned for i, n in zip(p.devices, p.bytes_on, strict=True)}

    def device_states(
        self, procs: Iterable[ModelProcess], candidates: Mapping[str, Candidate] | None = None,
    ) -> list[DeviceState]:
        """Each device's budget, NVML's free figure and the models assigned to it, for
        `placement.place`. `candidates` (the scheduler's, by name) says which models are
        idle and pinned; a model without one counts as busy."""
        measured = self.probe.devices() if self.probe.gpu else []
        candidates = candidates or {}
        placed: dict[int, list[PlacedModel]] = {b.index: [] for b in self.devices}
        for proc in procs:
            c = candidates.get(proc.key)
            idle = c is not None and c.ready and not c.busy and not c.wanted
            for i, n in self._shares(proc).items():
                placed.setdefault(i, []).append(PlacedModel(
                    proc.key, n, idle, c.last_used if c is not None else 0.0, c.pinned if c is not None else False,
                ))
        return [
            DeviceState(
                b.index, b.total, b.margin, tuple(placed[b.index]),
                measured[b.index].free if b.index < len(measured) else None, b.name,
            )
            for b in self.devices
        ]

    def plan(
        self, proc: ModelProcess, procs: Iterable[ModelProcess], candidates: Mapping[str, Candidate] | None = None,
        manual: ModelToPlace | None = None,
    ) -> Decision:
        """Where `proc` goes (see `placement.place`): its footprint, placed around the models
        assigned so far; `manual` from `placement.manual_from_options`. The caller logs the
        reason (placing.py, once per change: a model waiting for room is decided every pass)."""
        others = [p for p in procs if p is not proc]
        model = ModelToPlace(proc.key, self.footprint(proc), per_extra_device=self.context_bytes)
        if manual is not None:
            model = replace(manual, name=proc.key, bytes=model.bytes, per_extra_device=model.per_extra_device)
        return place(self.device_states(others, candidates), model)

    def report(self, procs: Iterable[ModelProcess]) -> dict[str, object]:
        procs = list(procs)
        used = self.used(procs)
        body: dict[str, object] = {
            "budget": self.budget,
            "used": used,
            "free": self.budget - used,
            "devices": [d.__dict__ for d in self.probe.devices()],
        }
        if self.devices:
            body["per_device"] = [
                {
                    "index": s.id, "name": s.label, "total": s.total, "margin": s.margin,
                    "budget": s.total - s.margin, "used": s.used, "free": s.free, "measured_free": s.measured_free,
                    "models": {m.name: m.bytes for m in s.models},
                }
                for s in self.device_states(procs)
            ]
            body["placements"] = {
                name: p.as_dict() for name, p in self._placements.items() if any(x.name == name for x in procs)
            }
            body["decisions"] = {
                name: {"action": action, "reason": reason}
                for name, (action, reason) in self._decisions.items() if any(x.name == name for x in procs)
            }
        return body
