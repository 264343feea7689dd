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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..errors import ConfigError
from ..settings.config import ModelSpec, Timeouts
from .gguf_info import Estimate, FactsCache, RunSettings, estimate
from .sleep import held_bytes, sleeping_from_log
from .states import State

if TYPE_CHECKING:
    from .process import ModelProcess

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
    """Per-model estimates and measurements against one budget (bytes)."""

    def __init__(self, budget: int, probe: DeviceProbe, recovery_wait: float, poll: float) -> None:
        self.budget = budget
        self.probe = probe
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
        if text.strip().lower() == "auto":
            devices = probe.devices()
            if not devices:
                raise ConfigError("--memory-budget auto: NVML did not report the GPUs' memory (see the log)")
            budget = sum(d.total for d in devices) - margin
            if budget <= 0:
                raise ConfigError(f"--memory-budget auto: the margin {margin} exceeds device memory")
        else:
            budget = parse_bytes(text)
        return cls(budget, probe, recovery_wait, poll)

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

    async def wait_recovered(self, need: int) -> None:
        """After children exit, device memory (VRAM above all) can come back late; wait for
        the device to report `need` free, bounded by the recovery wait."""
        deadline = time.monotonic() + self._recovery_wait
        while time.monotonic() < deadline:
            if max((d.free for d in self.probe.devices()), default=0) >= need:
                return
            await asyncio.sleep(self._poll)
        log.warning("device memory did not come back to %d free bytes within %.1fs", need, self._recovery_wait)

    def report(self, procs: Iterable[ModelProcess]) -> dict[str, object]:
        procs = list(procs)
        used = self.used(procs)
        return {
            "budget": self.budget,
            "used": used,
            "free": self.budget - used,
            "devices": [d.__dict__ for d in self.probe.devices()],
        }
