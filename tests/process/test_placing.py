"""Placement on several GPUs applied by the scheduling loop (core/placing.py), against
scripted children: best fit, eviction on the device the model needs (its requests wait
for it, not refused as an aborted load), a split, manual placement, a refusal naming the
devices, and the devices freed when a child exits."""

from __future__ import annotations

import asyncio

import pytest

from llamarouter.core.memory import Device, DeviceBudget, MemoryManager
from llamarouter.core.process import ModelProcess
from llamarouter.core.states import State
from llamarouter.core.supervisor import Supervisor
from llamarouter.errors import BudgetExceeded
from tests.fakes.helpers import wait_for
from tests.process.fakes import FakeLauncher, FakeProbe, fast_config, spec

MIB = 1024 * 1024
SIZES = {"a": 40, "b": 40, "c": 40, "d": 55, "big": 130, "huge": 200, "pinned": 40}


class HostProbe:
    """No NVML: device memory is the host's, plenty of it (before_spawn never waits)."""

    gpu = False

    def devices(self) -> list[Device]:
        return [Device("cpu", 2**40, 2**40)]

    def process_bytes(self, pid: int) -> int | None:
        return None


class SizedMemory(MemoryManager):
    """Footprints by name (the fakes have no model files to estimate)."""

    def footprint(self, proc: ModelProcess) -> int:
        return SIZES[proc.name] * MIB


def _supervisor(launcher: FakeLauncher, **specs_kw: dict[str, object]) -> tuple[Supervisor, SizedMemory]:
    memory = SizedMemory(
        150 * MIB, HostProbe(), 1.0, 0.01,  # type: ignore[arg-type]
        [DeviceBudget(0, "cuda:0", 100 * MIB, 0), DeviceBudget(1, "cuda:1", 50 * MIB, 0)],
    )
    specs = {n: spec(n, **specs_kw.get(n, {})) for n in SIZES}  # type: ignore[arg-type]
    sup = Supervisor(
        fast_config(0), lambda: dict(specs), launcher, FakeProbe(launcher),
        lambda s, port: [s.name, str(port)], memory=memory,
    )
    return sup, memory


async def _use(sup: Supervisor, name: str) -> None:
    (await asyncio.wait_for(sup.acquire(sup.models[name], True), 5)).release()


def _env(launcher: FakeLauncher, name: str) -> dict[str, str]:
    (child,) = launcher.alive(name)
    return child.env


@pytest.mark.timeout(30)
async def test_best_fit_then_eviction_on_the_needed_device_then_a_split() -> None:
    launcher = FakeLauncher()
    sup, memory = _supervisor(launcher)
    await sup.start()
    try:
        for name in ("a", "b", "c"):
            await _use(sup, name)
        assert [memory.placement_of(n).devices for n in ("a", "b", "c")] == [(1,), (0,), (0,)]  # type: ignore[union-attr]
        assert _env(launcher, "a")["CUDA_VISIBLE_DEVICES"] == "1"
        assert _env(launcher, "b")["CUDA_VISIBLE_DEVICES"] == "0"

        # d fits device 0 once b (its least recently used) is gone; a, older, is on device 1.
        # The request waits for the eviction and is served: no aborted load.
        await _use(sup, "d")
        assert sup.models["b"].state == State.STOPPED and sup.models["a"].state == State.READY
        assert memory.placement_of("d").devices == (0,)  # type: ignore[union-attr]
        assert memory.placement_of("b") is None  # unassigned once stopped
        assert sup.evictions == 1
        view = memory.placement_view("d")
        assert view is not None and view["action"] == "place"

        # big fits no device: every idle model goes, then it is split over both.
        await _use(sup, "big")
        placed = memory.placement_of("big")
        assert placed is not None and placed.devices == (0, 1) and placed.split is not None
        (child,) = launcher.alive("big")
        assert child.env["CUDA_VISIBLE_DEVICES"] == "0,1"
        assert child.argv[2:4] == ["--main-gpu", "0"] and child.argv[4] == "--tensor-split"
        assert [c.name for c in launcher.alive()] == ["big"]

        # huge fits nothing: refused with each device's free memory, nothing stopped.
        with pytest.raises(BudgetExceeded, match=r"cuda:0 .* MiB free of 100 MiB, cuda:1 .* MiB free of 50 MiB"):
            await asyncio.wait_for(sup.acquire(sup.models["huge"], True), 5)
        assert [c.name for c in launcher.alive()] == ["big"]
        assert sup.models["huge"].state == State.STOPPED
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


@pytest.mark.timeout(30)
async def test_manual_placement_wins_and_a_bad_one_is_refused_with_its_reason() -> None:
    launcher = FakeLauncher()
    sup, memory = _supervisor(launcher, a={"devices": "0"}, b={"devices": "0,7"}, c={"devices": "zero"})
    await sup.start()
    try:
        await _use(sup, "a")  # best fit would be device 1
        placed = memory.placement_of("a")
        assert placed is not None and placed.devices == (0,) and placed.source == "preset"
        assert _env(launcher, "a")["CUDA_VISIBLE_DEVICES"] == "0"
        with pytest.raises(BudgetExceeded, match=r"device\(s\) \[7\] that do not exist"):
            await asyncio.wait_for(sup.acquire(sup.models["b"], True), 5)
        with pytest.raises(BudgetExceeded, match="not a list of GPU numbers"):
            await asyncio.wait_for(sup.acquire(sup.models["c"], True), 5)
        sup.unload("a")
        await wait_for(lambda: sup.models["a"].state == State.STOPPED, 5)
        assert memory.placement_of("a") is None
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


@pytest.mark.timeout(30)
async def test_a_model_waiting_past_the_drain_bound_for_a_busy_device_drains_one() -> None:
    """d fits nowhere while a, b and c are all busy: after --drain-after one of them is
    drained (its request finishes, no new one joins it), then it leaves and d loads."""
    launcher = FakeLauncher()
    memory = SizedMemory(
        150 * MIB, HostProbe(), 1.0, 0.01,  # type: ignore[arg-type]
        [DeviceBudget(0, "cuda:0", 100 * MIB, 0), DeviceBudget(1, "cuda:1", 50 * MIB, 0)],
    )
    specs = {n: spec(n) for n in SIZES}

    class Watch:
        drains: list[str] = []

        def waited(self, model: str, seconds: float) -> None:
            pass

        def drained(self, model: str) -> None:
            self.drains.append(model)

    watch = Watch()
    sup = Supervisor(
        fast_config(0, drain_after=0.2), lambda: dict(specs), launcher, FakeProbe(launcher),
        lambda s, port: [s.name, str(port)], memory=memory, watch=watch,
    )
    await sup.start()
    try:
        a = await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)  # device 1
        b = await asyncio.wait_for(sup.acquire(sup.models["b"], True), 5)  # device 0
        c = await asyncio.wait_for(sup.acquire(sup.models["c"], True), 5)  # device 0
        assert {memory.placement_of(n).devices for n in ("b", "c")} == {(0,)}  # type: ignore[union-attr]
        d = asyncio.create_task(sup.acquire(sup.models["d"], True))
        await wait_for(lambda: any(sup.draining(sup.models[n]) for n in "abc"), 5, message="a drain")
        victim = next(n for n in "abc" if sup.draining(sup.models[n]))
        assert watch.drains == [victim]  # counted (metrics) and marked (the dashboard)
        assert not d.done() and sup.models[victim].state == State.READY  # its request runs on
        # A new request for the drained model waits behind the swap instead of joining it.
        queued = asyncio.create_task(sup.acquire(sup.models[victim], True))
        await wait_for(lambda: sup.queued_for(sup.models[victim]) == 1, 5, message="a queued request")
        held = {"a": a, "b": b, "c": c}
        held.pop(victim).release()
        lease = await asyncio.wait_for(d, 5)
        assert sup.models[victim].stop_reason == "drained" and sup.models[victim].state == State.STOPPED
        assert all(sup.models[n].state == State.READY for n in held)  # only the one drained
        lease.release()
        queued.cancel()
        for other in held.values():
            other.release()
    finally:
        await sup.shutdown()
    assert launcher.alive() == []
