"""CPU turns: children that compute on the host's CPUs share them (`--cpu-budget`).

llama-server computes with a pool of threads, one per physical core by default, that
spin at each step's barrier waiting for one another. Two such children computing at once
on the same cores do not each get half the machine: a thread that holds a core waits for
a sibling that the other child's threads keep off the CPU, and a short chat costs many
times its CPU (about 120 ms of CPU per 8-token chat against 40 on a 2-core machine in the
scheduling benchmark). So a request to a CPU-only child is granted while the threads of
the children computing now and its own fit the budget (or nothing else computes); the
scheduler (scheduler.py, `cpu_budget`) passes the turn on in order of waiting.

A child is on the budget when it computes on the CPU: the llama-server build lists no
devices (`--list-devices`, asked once at startup), or its command line offloads nothing
(`-ngl 0`, `--device none`). Children of a model with `replicas` are not: they are there to
compute side by side.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path

from ..settings.build import cpu_budget_text
from ..settings.childargs import running_options
from ..settings.config import RouterConfig
from .process import ModelProcess


def resolve_budget(text: str, cpus: int | None = None) -> int:
    """`--cpu-budget`: `auto` is the CPUs this router may run on (its affinity, and its
    cgroup's CPU quota in a container); `0` turns turns off."""
    value = cpu_budget_text(text)  # the one parser; the config holds its result already
    if value == "auto":
        return cpus if cpus is not None else usable_cpus()
    return int(value)


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process may use: its affinity, lowered to its cgroup's CPU quota
    (a container given 2 CPUs of a 64-core host sees all 64 in its affinity)."""
    # macOS has no affinity call: every CPU.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_quota(cgroup)
    return max(1, min(cpus, math.ceil(quota))) if quota is not None else cpus


def cgroup_quota(cgroup: Path) -> float | None:
    """CPUs' worth of time the cgroup allows (v2 `cpu.max`, else v1's CFS quota), or None
    for no limit."""
    try:
        quota, _, period = (cgroup / "cpu.max").read_text().strip().partition(" ")
        if quota != "max":
            return int(quota) / int(period or "100000")
        return None
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def physical_cores(sys_cpu: Path = Path("/sys/devices/system/cpu")) -> int:
    """What llama-server computes with by default: one thread per physical core (its
    common_cpu_get_num_physical_cores: distinct hyper-thread sibling sets), else the
    logical CPUs, halved above four."""
    siblings = set()
    for topo in sys_cpu.glob("cpu[0-9]*/topology/thread_siblings"):
        try:
            siblings.add(topo.read_text().strip())
        except OSError:
            continue
    if siblings:
        return len(siblings)
    n = os.cpu_count() or 4
    return n if n <= 4 else n // 2


def compute_threads(opts: Mapping[str, str], default: int) -> int:
    """The threads a child computes with: `-t` (and `-tb` for prompts, which defaults to
    `-t`), from its options as `running_options` reads them back."""

    def value(key: str, fallback: int) -> int:
        try:
            n = int(opts[key])
        except (KeyError, ValueError):
            return fallback
        return n if n > 0 else os.cpu_count() or fallback  # <= 0: hardware concurrency

    threads = value("-t", default)
    return max(threads, value("-tb", threads))


def offloads_nothing(opts: Mapping[str, str]) -> bool:
    return opts.get("-ngl", "").strip() == "0" or opts.get("-dev", "").strip().lower() == "none"


class CpuShare:
    """Which children are on the CPU budget and with how many threads."""

    def __init__(self, config: RouterConfig, default_threads: int | None = None) -> None:
        self.budget = resolve_budget(config.limits.cpu_budget)
        # None: the build was not asked (no turns unless a child offloads nothing).
        self._cpu_build = config.server_devices is not None and not config.server_devices
        self._env = dict(config.child_env)
        self._default = default_threads if default_threads is not None else physical_cores()
        self._known: dict[ModelProcess, tuple[list[str], int]] = {}

    def threads(self, proc: ModelProcess) -> int:
        """`proc`'s child's threads when it is on the budget, else 0."""
        if self.budget <= 0 or proc.spec.replicas > 1:
            return 0
        argv = proc.argv
        known = self._known.get(proc)
        if known is not None and (known[0] is argv or not argv):
            # No command line yet: a restart is building its child's. Until it has one, the
            # last child's threads stand (its requests may still be in flight).
            return known[1]
        threads = 0
        if argv:
            opts = running_options(argv, self._env)  # once per command line
            if self._cpu_build or offloads_nothing(opts):
                threads = compute_threads(opts, self._default)
        self._known[proc] = (argv, threads)
        return threads

    def forget(self, proc: ModelProcess) -> None:
        self._known.pop(proc, None)

    def free_now(self, proc: ModelProcess, busy: Collection[ModelProcess], loading: Iterable[ModelProcess]) -> bool:
        """Whether a request to `proc` may compute at once, nobody waiting in line (`busy`:
        the children with requests in flight; `loading`: those starting): it computes
        already, nothing else does, or its threads fit beside theirs. The scheduler's
        rule for a request that has not waited."""
        mine = self.threads(proc)
        if mine <= 0 or proc in busy:
            return True
        others = sum(self.threads(p) for p in {*busy, *loading})
        return others == 0 or others + mine <= self.budget
