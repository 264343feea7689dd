"""CPU turns' side in the router: which children are on the CPU budget, with how many
threads, and the budget itself (core/cpushare.py); the build's devices (settings/probe.py)."""

from __future__ import annotations

import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from llamarouter.core.cpushare import CpuShare, compute_threads, offloads_nothing, physical_cores, resolve_budget
from llamarouter.errors import ConfigError
from llamarouter.settings.childargs import running_options
from llamarouter.settings.config import Limits, RouterConfig
from llamarouter.settings.probe import list_devices


class Proc(SimpleNamespace):
    """What CpuShare reads of a ModelProcess (hashable by identity, as a process is)."""

    __hash__ = object.__hash__
    __eq__ = object.__eq__


def proc(*args: str, replicas: int = 1) -> Any:
    return Proc(spec=SimpleNamespace(replicas=replicas), argv=["llama-server", *args])


def share(devices: tuple[str, ...] | None = (), budget: str = "2", **env: str) -> CpuShare:
    config = RouterConfig(limits=Limits(cpu_budget=budget), server_devices=devices, child_env=tuple(env.items()))
    return CpuShare(config, default_threads=2)


def test_the_budget_is_auto_a_count_or_off() -> None:
    assert resolve_budget("auto", cpus=6) == 6
    assert resolve_budget("auto") >= 1
    assert resolve_budget("0") == 0
    assert resolve_budget(" 12 ") == 12
    for bad in ("-1", "two", ""):
        with pytest.raises(ConfigError):
            resolve_budget(bad)


def test_threads_come_from_the_command_line_then_the_environment_then_the_default() -> None:
    assert compute_threads(running_options(["llama-server", "-t", "3"], {}), 2) == 3
    assert compute_threads(running_options(["llama-server", "--threads", "1", "-tb", "4"], {}), 2) == 4  # prompts
    assert compute_threads(running_options(["llama-server"], {"LLAMA_ARG_THREADS": "5"}), 2) == 5
    assert compute_threads(running_options(["llama-server"], {}), 2) == 2
    assert compute_threads(running_options(["llama-server", "-t", "-1"], {}), 2) >= 1  # llama-server: all CPUs


def test_offloading_nothing_is_ngl_zero_or_no_device() -> None:
    assert offloads_nothing(running_options(["llama-server", "-ngl", "0"], {}))
    assert offloads_nothing(running_options(["llama-server", "--device", "none"], {}))
    assert offloads_nothing(running_options(["llama-server"], {"LLAMA_ARG_N_GPU_LAYERS": "0"}))
    assert not offloads_nothing(running_options(["llama-server", "-ngl", "99"], {}))


def test_physical_cores_count_hyper_thread_sibling_sets(tmp_path: Path) -> None:
    for cpu, siblings in enumerate(["0,2", "1,3", "0,2", "1,3"]):
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "thread_siblings").write_text(siblings + "\n")
    assert physical_cores(tmp_path) == 2


def test_a_cpu_only_build_puts_every_single_child_on_the_budget() -> None:
    s = share(devices=())
    assert s.threads(proc("-t", "3")) == 3
    assert s.threads(proc()) == 2
    assert s.threads(proc(replicas=2)) == 0  # replicas are there to compute side by side
    assert s.threads(Proc(spec=SimpleNamespace(replicas=1), argv=[])) == 0  # not started yet


def test_a_gpu_build_puts_only_children_that_offload_nothing_on_the_budget() -> None:
    s = share(devices=("CUDA0",))
    assert s.threads(proc()) == 0
    assert s.threads(proc("-ngl", "0")) == 2
    # Not asked (None): the same, nothing is assumed of the build.
    assert share(devices=None).threads(proc()) == 0


def test_budget_zero_turns_turns_off() -> None:
    assert share(budget="0").threads(proc()) == 0


def test_a_new_command_line_is_read_again() -> None:
    s = share()
    p = proc("-t", "1")
    assert s.threads(p) == 1
    p.argv = ["llama-server", "-t", "2"]  # the next life's command line
    assert s.threads(p) == 2


def test_a_restart_building_its_command_line_keeps_the_last_childs_threads() -> None:
    # A child crashed while serving: its requests still count against the budget while the
    # restart has no command line yet (the process reads as no argv in that window).
    s = share()
    p = proc("-t", "2")
    assert s.threads(p) == 2
    p.argv = []
    assert s.threads(p) == 2
    assert share().threads(proc()) == 2 and share().threads(Proc(spec=p.spec, argv=[])) == 0  # never started


def test_free_now_is_the_schedulers_rule_for_one_request() -> None:
    s = share(budget="2")
    a, b, one = proc("-t", "2"), proc("-t", "2"), proc("-t", "1")
    assert s.free_now(a, busy=[], loading=[])
    assert s.free_now(a, busy=[a], loading=[])  # it computes already
    assert not s.free_now(b, busy=[a], loading=[])
    assert not s.free_now(b, busy=[], loading=[a])  # a load computes too
    assert s.free_now(one, busy=[proc("-t", "1")], loading=[])  # 1 + 1 fits in 2


def _script(tmp_path: Path, text: str, code: int = 0) -> str:
    path = tmp_path / "llama-server"
    path.write_text(f"#!/bin/sh\ncat <<'OUT'\n{text}\nOUT\nexit {code}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_list_devices_reads_llama_servers_listing(tmp_path: Path) -> None:
    gpu = _script(tmp_path, "Available devices:\n  CUDA0: NVIDIA H100 (81559 MiB, 80000 MiB free)\n"
                            "  CUDA1: NVIDIA H100 (81559 MiB, 80000 MiB free)")
    assert list_devices(gpu, {}, 10) == ("CUDA0", "CUDA1")
    assert list_devices(_script(tmp_path, "Available devices:\n  (none)"), {}, 10) == ()
    assert list_devices(_script(tmp_path, "error: invalid argument: --list-devices", code=1), {}, 10) is None
    assert list_devices(str(tmp_path / "missing"), {}, 10) is None


def test_a_containers_cpu_quota_bounds_the_auto_budget(tmp_path: Path) -> None:
    from llamarouter.core.cpushare import cgroup_quota, usable_cpus

    assert cgroup_quota(tmp_path) is None  # no cgroup files: no limit
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs (cgroup v2)
    assert cgroup_quota(tmp_path) == 1.5
    assert 1 <= usable_cpus(tmp_path) <= 2
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_quota(v1) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    assert cgroup_quota(v1) == 3.0


def test_without_an_affinity_call_every_cpu_counts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # macOS (Metal builds) has no os.sched_getaffinity: the budget is the CPU count.
    import os

    from llamarouter.core.cpushare import usable_cpus

    monkeypatch.delattr(os, "sched_getaffinity")
    assert usable_cpus(tmp_path) == (os.cpu_count() or 1)
