"""The memory budget: what there is (NVML per GPU, else system RAM), what each model
needs (estimated from its GGUF before loading, measured from its load report after), and
whether one more model fits.

With no budget configured none of this runs, and scheduling counts models only, as upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from ..errors import ConfigError
from ..settings.config import ModelSpec
from .gguf_info import Estimate, FactsCache, RunSettings, estimate
from .sleep import held_bytes, sleeping_from_log
from .states import State

if TYPE_CHECKING:
    from .process import ModelProcess

log = logging.getLogger("llamarouter.core.memory")

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
    """Reads device memory: NVML when an NVIDIA driver is present, else system RAM."""

    def __init__(self) -> None:
        self._nvml: object | None = None
        with contextlib.suppress(Exception):
            import pynvml

            pynvml.nvmlInit()
            if pynvml.nvmlDeviceGetCount() > 0:
                self._nvml = pynvml

    @property
    def gpu(self) -> bool:
        return self._nvml is not None

    def devices(self) -> list[Device]:
        nv = self._nvml
        if nv is not None:
            out = []
            for i in range(nv.nvmlDeviceGetCount()):  # type: ignore[attr-defined]  # pynvml is untyped and optional
                info = nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(i))  # type: ignore[attr-defined]  # pynvml is untyped and optional
                out.append(Device(f"cuda:{i}", int(info.total), int(info.free)))
            return out
        vm = psutil.virtual_memory()
        return [Device("cpu", int(vm.total), int(vm.available))]


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

    @classmethod
    def from_setting(
        cls, text: str, margin: int, recovery_wait: float, poll: float, probe: DeviceProbe | None = None
    ) -> MemoryManager:
        probe = probe or DeviceProbe()
        if text.strip().lower() == "auto":
            budget = sum(d.total for d in probe.devices()) - margin
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

    def footprint(self, proc: ModelProcess) -> int:
        """What a model counts against the budget: its measured load report when we have
        one, else the estimate (RSS is shown but not used: it counts shared pages)."""
        if proc.measured_bytes:
            return proc.measured_bytes
        est = self.estimate_of(proc)
        return est.total if est is not None else 0

    def held(self, proc: ModelProcess) -> int:
        """What a model holds of the budget now: its footprint, or nothing while its child
        sleeps (llama-server's --sleep-idle-seconds frees weights and context)."""
        return held_bytes(self.footprint(proc), proc.state == State.READY and sleeping_from_log(proc.logs))

    def used(self, procs: Iterable[ModelProcess]) -> int:
        # A child asleep (llama-server's --sleep-idle-seconds) has freed its weights and
        # context: it counts as what it holds, i.e. nothing, until a request wakes it.
        return sum(
            held_bytes(self.footprint(p), p.state == State.READY and sleeping_from_log(p.logs))
            for p in procs if p.holds_slot
        )

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
