"""Memory estimate from GGUF metadata, size parsing, load-report parsing, byte eviction."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from llamarouter.core.gguf_info import (
    FactsCache,
    RunSettings,
    effective_ctx,
    estimate,
    parse_buffer_line,
    read_facts,
)
from llamarouter.core.memory import Device, DeviceProbe, MemoryManager, parse_bytes
from llamarouter.core.scheduler import Candidate, plan_evictions
from llamarouter.devtools.tinymodel import ModelShape, write_model
from llamarouter.errors import ConfigError

SHAPE = ModelShape(n_embd=128, n_layer=3, n_head=4, n_head_kv=2, n_ff=256, n_ctx_train=2048)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("m") / "m.gguf", SHAPE)[0]


def test_facts_match_the_file(model: Path) -> None:
    f = read_facts(model)
    assert (f.arch, f.n_layer, f.n_embd, f.n_head, f.n_head_kv) == ("llama", 3, 128, 4, 2)
    assert (f.key_length, f.n_ctx_train, f.n_vocab, f.n_ff) == (32, 2048, 259, 256)
    # Tensor data is the file minus header/metadata: a little smaller than the file.
    size = model.stat().st_size
    assert 0.9 * size < f.weight_bytes < size
    assert sum(f.layer_bytes) + f.output_bytes + f.input_bytes == f.weight_bytes


def test_split_model_counts_every_shard(tmp_path: Path, model: Path) -> None:
    shards = write_model(tmp_path / "s.gguf", SHAPE, n_shards=2)
    assert len(shards) == 2
    assert read_facts(shards[0]).weight_bytes == read_facts(model).weight_bytes


def test_kv_cache_size_rules(model: Path) -> None:
    f = read_facts(model)
    # K and V: n_ctx cells x 3 layers x (2 kv heads x 32) x 2 bytes (f16) each.
    e = estimate(f, RunSettings(n_ctx=1024, n_parallel=1), gpu=False)
    assert e.n_ctx == 1024 and e.kv == 2 * 1024 * 3 * 64 * 2
    # -c 0: the training context; -np auto: one unified cache of n_ctx cells.
    assert estimate(f, RunSettings(), gpu=False).n_ctx == 2048
    # Per-sequence contexts are padded to 256: -c 2000 -np 3 -> 3 x 768 cells.
    assert effective_ctx(f, RunSettings(n_ctx=2000, n_parallel=3)) == 2304
    # Quantised cache types: q8_0 is 34 bytes per 32 values, q4_0 18.
    q = estimate(f, RunSettings(n_ctx=1024, n_parallel=1, cache_type_k="q8_0", cache_type_v="q4_0"), gpu=False)
    assert q.kv == 3 * (1024 * 64 // 32 * 34 + 1024 * 64 // 32 * 18)


def test_gpu_layer_split(model: Path) -> None:
    f = read_facts(model)
    cpu = estimate(f, RunSettings(n_gpu_layers=99), gpu=False)
    assert cpu.weights_gpu == 0 and cpu.weights_cpu == f.weight_bytes
    all_gpu = estimate(f, RunSettings(n_gpu_layers=99), gpu=True)
    # Everything but the token embeddings is offloaded.
    assert all_gpu.weights_cpu == f.input_bytes
    one = estimate(f, RunSettings(n_gpu_layers=1), gpu=True)
    assert one.weights_gpu == f.layer_bytes[-1]  # the last layer goes first


def test_run_settings_from_child_options() -> None:
    rs = RunSettings.from_options({"-c": "8192", "-np": "4", "-ngl": "all", "-ctk": "q8_0", "-kvu": "true"})
    assert (rs.n_ctx, rs.n_parallel, rs.cache_type_k, rs.kv_unified) == (8192, 4, "q8_0", True)
    assert rs.n_gpu_layers is not None and rs.n_gpu_layers > 1000
    assert RunSettings.from_options({"-ngl": "auto"}).n_gpu_layers is None


def test_facts_cache_rereads_a_changed_file(tmp_path: Path) -> None:
    path = write_model(tmp_path / "x.gguf", SHAPE)[0]
    cache = FactsCache()
    first = cache.get(path)
    assert cache.get(path) is first
    write_model(path, ModelShape(n_embd=64, n_layer=2, n_head=4, n_head_kv=4, n_ff=128))
    assert cache.get(path).n_embd == 64


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("0.00.010 I load_tensors:   CPU_Mapped model buffer size =     9.01 MiB", ("CPU", "model", int(9.01 * 2**20))),
        ("llama_kv_cache:      CUDA0 KV buffer size =  1024.00 MiB", ("CUDA0", "kv", 1024 * 2**20)),
        ("sched_reserve:        CPU compute buffer size =     6.02 MiB", ("CPU", "compute", int(6.02 * 2**20))),
        ("srv  update_slots: all slots are idle", None),
    ],
)
def test_parse_buffer_line(line: str, expected: tuple[str, str, int] | None) -> None:
    assert parse_buffer_line(line) == expected


def test_parse_bytes() -> None:
    assert parse_bytes("1024") == 1024
    assert parse_bytes("2GiB") == parse_bytes("2G") == 2 * 1024**3
    assert parse_bytes("2GB") == 2 * 10**9
    assert parse_bytes("1.5 MiB") == int(1.5 * 2**20)
    for bad in ("", "lots", "-1GB", "1XB"):
        with pytest.raises(ConfigError):
            parse_bytes(bad)


class FixedProbe:
    gpu = False
    start_failed = False

    def __init__(self, total: int, free: int) -> None:
        self._d = [Device("cpu", total, free)]

    def devices(self) -> list[Device]:
        return self._d


def test_budget_auto_is_device_memory_minus_margin() -> None:
    m = MemoryManager.from_setting("auto", 1000, 1.0, 0.1, FixedProbe(10_000, 5_000))  # type: ignore[arg-type]
    assert m.budget == 9_000
    with pytest.raises(ConfigError):
        MemoryManager.from_setting("auto", 20_000, 1.0, 0.1, FixedProbe(10_000, 5_000))  # type: ignore[arg-type]
    assert MemoryManager.from_setting("3MiB", 0, 1.0, 0.1, FixedProbe(1, 1)).budget == 3 * 2**20  # type: ignore[arg-type]


def _c(name: str, last_used: float, size: int, **kw: bool) -> Candidate:
    base = {"ready": True, "busy": False, "pinned": False, "wanted": False}
    base.update(kw)
    return Candidate(name=name, last_used=last_used, bytes=size, **base)


def test_plan_evictions_by_bytes() -> None:
    cands = [_c("a", 1, 100), _c("b", 2, 300), _c("c", 3, 50), _c("busy", 0, 999, busy=True)]
    assert plan_evictions(cands, 0, 100) == ["a"]
    assert plan_evictions(cands, 0, 101) == ["a", "b"]  # LRU order, not best fit
    assert plan_evictions(cands, 2, 10) == ["a", "b"]  # the slot count decides
    assert plan_evictions(cands, 0, 10_000) == ["a", "b", "c"]  # all idle ones; busy never
    assert plan_evictions(cands, 0, 0) == []


class _NvProc:
    def __init__(self, pid: int, used: int | None) -> None:
        self.pid, self.usedGpuMemory = pid, used


class FakeNvml:
    """pynvml's few calls the probe makes: two GPUs, each listing its processes."""

    def __init__(self, per_gpu: list[list[_NvProc]], broken: bool = False) -> None:
        self.per_gpu, self.broken = per_gpu, broken

    def nvmlDeviceGetCount(self) -> int:
        return len(self.per_gpu)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[_NvProc]:
        if self.broken:
            raise RuntimeError("driver gone")
        return self.per_gpu[handle]

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        if self.broken:
            raise RuntimeError("driver gone")
        return SimpleNamespace(total=1000, free=500 + handle)


def test_process_bytes_sums_a_child_over_every_gpu() -> None:
    probe = DeviceProbe()
    probe._nvml = FakeNvml([[_NvProc(7, 600), _NvProc(8, 50)], [_NvProc(7, 400), _NvProc(9, None)]])
    assert probe.gpu
    assert probe.process_bytes(7) == 1000
    assert probe.process_bytes(8) == 50
    assert probe.process_bytes(9) is None  # listed without a figure (no permission): unknown
    assert probe.process_bytes(10) is None
    assert probe.devices() == [Device("cuda:0", 1000, 500), Device("cuda:1", 1000, 501)]
    probe._nvml = FakeNvml([[_NvProc(7, 600)]], broken=True)
    assert probe.process_bytes(7) is None
    assert probe.devices() == []  # a driver error is no figure, not an exception in a load
    probe._nvml = None
    assert probe.process_bytes(7) is None


class WedgedNvml(FakeNvml):
    """A driver that has stopped answering (a GPU fallen off the bus): every call that
    reads the GPU blocks until the test lets it go."""

    def __init__(self) -> None:
        super().__init__([[_NvProc(7, 600)]])
        self.release = threading.Event()
        self.calls = 0

    def nvmlInit(self) -> None:
        self.calls += 1
        self.release.wait()

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        self.calls += 1
        self.release.wait()
        return SimpleNamespace(total=100, free=60)

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[_NvProc]:
        self.calls += 1
        self.release.wait()
        return super().nvmlDeviceGetComputeRunningProcesses(handle)


@pytest.mark.timeout(20)
def test_a_wedged_gpu_driver_stalls_one_call_for_the_probe_timeout_and_no_more() -> None:
    nv = WedgedNvml()
    probe = DeviceProbe(timeout=0.05)
    probe._nvml = nv
    try:
        assert probe.process_bytes(7) is None  # gave up: unknown
        assert probe.wedged and nv.calls == 1
        assert probe.process_bytes(7) is None
        assert probe.devices() == []  # not system RAM: this is a GPU host
        assert nv.calls == 1  # no second thread sent into the driver while the first is stuck
    finally:
        nv.release.set()
    stuck = probe._stuck
    assert stuck is not None
    stuck.join(10)
    assert not probe.wedged  # the driver answered: figures again
    assert probe.process_bytes(7) == 600
    assert probe.devices() == [Device("cuda:0", 100, 60)]


@pytest.mark.timeout(20)
def test_a_budget_on_a_gpu_host_whose_driver_does_not_answer_is_a_clear_startup_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from llamarouter.core import memory

    nv = WedgedNvml()
    monkeypatch.setattr(memory, "_import_pynvml", lambda: nv)
    try:
        with pytest.raises(ConfigError, match=r"NVML did not start within 0\.05s"):
            MemoryManager.from_setting("20GiB", 0, 1.0, 0.1, probe_timeout=0.05, start_timeout=0.05)
        late = DeviceProbe(timeout=0.05, start_timeout=0.05)
    finally:
        nv.release.set()
    assert late._stuck is not None
    late._stuck.join(10)
    assert late.start_failed and not late.gpu  # a start that came too late stays a failed one
    with pytest.raises(ConfigError, match="NVML did not start"):
        MemoryManager.from_setting("auto", 0, 1.0, 0.1, late)
    # A slow start (the driver initialising its GPUs) gets the start timeout, not the
    # per-call one.
    slow = WedgedNvml()
    monkeypatch.setattr(memory, "_import_pynvml", lambda: slow)
    timer = threading.Timer(0.2, slow.release.set)
    timer.start()
    try:
        probe = DeviceProbe(timeout=0.05, start_timeout=10)
    finally:
        timer.cancel()
        slow.release.set()
    assert probe.gpu and not probe.start_failed and not probe.wedged
    # NVML starts, then stops answering before the budget is read.
    started = WedgedNvml()
    started.release.set()
    probe = DeviceProbe(timeout=0.05)
    probe._nvml = started
    started.release.clear()
    try:
        with pytest.raises(ConfigError, match="NVML did not report"):
            MemoryManager.from_setting("auto", 0, 1.0, 0.1, probe)
    finally:
        started.release.set()


@pytest.mark.timeout(20)
async def test_waiting_for_freed_vram_on_a_wedged_driver_ends_at_the_recovery_wait() -> None:
    nv = WedgedNvml()
    probe = DeviceProbe(timeout=0.05)
    probe._nvml = nv
    try:
        m = MemoryManager(2**30, probe, 0.3, 0.01)
        await asyncio.wait_for(m.wait_recovered(1), 5)
        assert nv.calls == 1  # every later look gave up at once
        assert m.report([])["devices"] == []
    finally:
        nv.release.set()


async def test_a_gpu_child_counts_its_vram_and_its_device_context_while_asleep(model: Path) -> None:
    """The figures are an H200's: a child whose buffers come to ~330 MiB used 1108 MiB of
    VRAM (its device context and cuBLAS workspace are in no buffer report)."""
    from types import SimpleNamespace

    from llamarouter.core.states import State
    from llamarouter.settings.config import ModelSpec

    probe = FixedProbe(2**40, 2**40)
    probe.gpu = True  # the estimate splits weights by -ngl
    m = MemoryManager(10 * 2**30, probe, 1.0, 0.1)  # type: ignore[arg-type]
    proc: Any = SimpleNamespace(
        name="a", spec=ModelSpec(name="a", source="models_dir", model_path=str(model)),
        measured_bytes=None, device_bytes=None, state=State.READY, logs=[], holds_slot=True,
    )
    est = await m.estimate_for(proc, {"-c": "512", "-ngl": "2"})
    assert est is not None and 0 < est.weights_cpu < est.weights  # -ngl 2 of 3 layers leaves weights on the CPU
    assert m.footprint(proc) == est.total and m.asleep(proc) == 0  # nothing measured: the estimate
    probe.process_bytes = lambda pid: 1108 * 2**20 if pid == 42 else None  # type: ignore[attr-defined]
    assert m.measure_device(proc, 41) is None and m.context_bytes == 0
    proc.device_bytes = m.measure_device(proc, 42)
    assert proc.device_bytes == 1108 * 2**20
    assert m.footprint(proc) == proc.device_bytes + est.weights_cpu
    assert m.used([proc]) == proc.device_bytes + est.weights_cpu
    proc.logs = ["srv  operator(): server is entering sleeping state"]
    context = proc.device_bytes - (est.weights_gpu + est.kv + est.compute)
    assert m.held(proc) == m.used([proc]) == context > 0
    # A model not measured yet adds the overhead learned from this one.
    other: Any = SimpleNamespace(
        name="b", spec=ModelSpec(name="b", source="models_dir", model_path=str(model)),
        measured_bytes=None, device_bytes=None, state=State.STOPPED, logs=[], holds_slot=False,
    )
    other_est = await m.estimate_for(other, {"-c": "512"})
    assert other_est is not None and m.context_bytes == context
    assert m.footprint(other) == other_est.total + context
    # A load report larger than VRAM + CPU weights (CPU-heavy offload) still wins.
    proc.logs, proc.measured_bytes = [], 5 * 2**30
    assert m.footprint(proc) == 5 * 2**30


def test_without_nvml_the_device_is_system_ram() -> None:
    """The CPU path reads system memory through psutil, imported on this first use."""
    probe = DeviceProbe()
    probe._nvml = None
    (ram,) = probe.devices()
    with open("/proc/meminfo") as f:
        total_kib = int(next(line for line in f if line.startswith("MemTotal:")).split()[1])
    assert ram.name == "cpu" and ram.total == total_kib * 1024
    assert 0 < ram.free <= ram.total


# --- several GPUs: per-device budgets --------------------------------------------------

G = 2**30


class GpuProbe:
    gpu = True
    start_failed = False

    def __init__(self, *devices: tuple[int, int]) -> None:
        self._d = [Device(f"cuda:{i}", total, free) for i, (total, free) in enumerate(devices)]

    def devices(self) -> list[Device]:
        return self._d


def test_budget_auto_on_several_gpus_is_per_device_each_less_the_margin() -> None:
    m = MemoryManager.from_setting("auto", G, 1.0, 0.1, GpuProbe((24 * G, 20 * G), (12 * G, 12 * G)))  # type: ignore[arg-type]
    assert [(b.index, b.name, b.total, b.margin, b.capacity) for b in m.devices] == [
        (0, "cuda:0", 24 * G, G, 23 * G), (1, "cuda:1", 12 * G, G, 11 * G),
    ]
    assert m.budget == 34 * G  # the pool: what the devices' budgets add up to
    with pytest.raises(ConfigError, match=r"exceeds the memory of cuda:1"):
        MemoryManager.from_setting("auto", 13 * G, 1.0, 0.1, GpuProbe((24 * G, 0), (12 * G, 0)))  # type: ignore[arg-type]


def test_budget_as_a_list_is_one_per_device() -> None:
    m = MemoryManager.from_setting("24GiB, 12GiB", G, 1.0, 0.1, GpuProbe((32 * G, 0), (16 * G, 0)))  # type: ignore[arg-type]
    assert [(b.name, b.total, b.capacity) for b in m.devices] == [("cuda:0", 24 * G, 24 * G), ("cuda:1", 12 * G, 12 * G)]
    assert m.budget == 36 * G
    with pytest.raises(ConfigError, match=r"3 sizes for 2 GPUs \(cuda:0, cuda:1\)"):
        MemoryManager.from_setting("1GiB,1GiB,1GiB", 0, 1.0, 0.1, GpuProbe((G, G), (G, G)))  # type: ignore[arg-type]
    for bad in ("24GiB,", "24GiB,0", "24GiB,lots"):
        with pytest.raises(ConfigError):
            MemoryManager.from_setting(bad, 0, 1.0, 0.1, GpuProbe((G, G)))  # type: ignore[arg-type]
    # Without NVML a list still budgets each device (placement by the budget alone).
    m = MemoryManager.from_setting("2GiB,1GiB", 0, 1.0, 0.1, FixedProbe(1, 1))  # type: ignore[arg-type]
    assert [b.total for b in m.devices] == [2 * G, G]


def test_one_size_or_auto_without_nvml_stays_one_pool() -> None:
    assert MemoryManager.from_setting("20GiB", G, 1.0, 0.1, GpuProbe((24 * G, 0), (24 * G, 0))).devices == []  # type: ignore[arg-type]
    m = MemoryManager.from_setting("auto", 1000, 1.0, 0.1, FixedProbe(10_000, 5_000))  # type: ignore[arg-type]
    assert m.devices == [] and m.budget == 9_000
    assert "per_device" not in m.report([])


def _loaded(name: str, size: int) -> Any:
    from llamarouter.core.states import State
    from llamarouter.settings.config import ModelSpec

    return SimpleNamespace(
        name=name, key=name, spec=ModelSpec(name=name, source="models_dir"), measured_bytes=size, device_bytes=None,
        state=State.READY, logs=[], holds_slot=True,
    )


def test_placed_models_count_on_their_devices_and_plan_around_them() -> None:
    from llamarouter.core.placement import Placement, manual_from_options

    probe = GpuProbe((24 * G, 24 * G), (12 * G, 12 * G))
    m = MemoryManager.from_setting("auto", 0, 1.0, 0.1, probe)  # type: ignore[arg-type]
    a, b, big, new = _loaded("a", 8 * G), _loaded("b", 6 * G), _loaded("big", 12 * G), _loaded("new", 11 * G)
    m.assign("a", Placement((1,), None, (8 * G,)))
    m.assign("b", Placement((0,), None, (6 * G,)))
    m.assign("big", Placement((0, 1), (0.75, 0.25), (9 * G, 3 * G)))
    procs = [a, b, big]
    cands = {
        "a": Candidate("a", 1.0, True, False, False, False),
        "b": Candidate("b", 2.0, True, False, False, False),
        "big": Candidate("big", 3.0, True, True, False, False),  # busy
    }
    d0, d1 = m.device_states(procs, cands)
    assert {x.name: x.bytes for x in d0.models} == {"b": 6 * G, "big": 9 * G}
    assert {x.name: x.bytes for x in d1.models} == {"a": 8 * G, "big": 3 * G}
    assert [x.idle for x in d0.models] == [True, False]
    # 11 GiB: no device has it free (9 and 1); the idle b on cuda:0 makes room there.
    decision = m.plan(new, [*procs, new], cands)
    assert decision.action == "evict" and decision.evict == ("b",)
    assert decision.placement is not None and decision.placement.devices == (0,)
    # 9 GiB would fit cuda:0 as it is; placed on cuda:1 by hand, a goes there instead.
    small = _loaded("small", 9 * G)
    assert m.plan(small, [*procs, small], cands).action == "place"
    decision = m.plan(small, [*procs, small], cands, manual_from_options({}, "1"))
    assert decision.evict == ("a",) and decision.placement is not None and decision.placement.devices == (1,)
    # As much again on cuda:1 waits for big, busy there.
    assert m.plan(new, [*procs, new], cands, manual_from_options({}, "1")).action == "wait"

    report = m.report(procs)
    per = report["per_device"]
    assert isinstance(per, list) and [(e["name"], e["used"], e["free"]) for e in per] == [
        ("cuda:0", 15 * G, 9 * G), ("cuda:1", 11 * G, G),
    ]
    assert per[1]["models"] == {"a": 8 * G, "big": 3 * G} and per[0]["measured_free"] == 24 * G
    assert report["placements"] == {
        "a": {"devices": [1], "tensor_split": None, "bytes": [8 * G], "source": "auto"},
        "b": {"devices": [0], "tensor_split": None, "bytes": [6 * G], "source": "auto"},
        "big": {"devices": [0, 1], "tensor_split": [0.75, 0.25], "bytes": [9 * G, 3 * G], "source": "auto"},
    }
    # The single-pool figures are as before.
    assert (report["budget"], report["used"]) == (36 * G, 26 * G)
    m.unassign("a")
    assert m.placement_of("a") is None and "a" not in m.report(procs)["placements"]  # type: ignore[operator]


async def test_waiting_for_vram_on_the_devices_of_a_placement() -> None:
    from llamarouter.core.placement import Placement

    probe = GpuProbe((24 * G, 2 * G), (12 * G, 10 * G))
    m = MemoryManager(36 * G, probe, 0.2, 0.01)  # type: ignore[arg-type]
    # cuda:1 has the 10 GiB, but the placement needs 4 GiB on cuda:0: waits out the bound.
    start = asyncio.get_running_loop().time()
    await m.wait_recovered(4 * G, Placement((0,), None, (4 * G,)))
    assert asyncio.get_running_loop().time() - start >= 0.2
    start = asyncio.get_running_loop().time()
    await m.wait_recovered(4 * G, Placement((0, 1), (0.2, 0.8), (G, 3 * G)))
    assert asyncio.get_running_loop().time() - start < 0.1
