"""The supervision core against scripted children (no processes, no sockets): the model
owner, the admission path and the scheduling loop, including the old core's hangs."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import pytest

from llamarouter.core.admission import Lease
from llamarouter.core.logring import LogRing
from llamarouter.core.process import ModelProcess
from llamarouter.core import scheduler
from llamarouter.core.states import State, StopReason
from llamarouter.core.supervisor import Supervisor
from llamarouter.errors import (
    InvalidRequest,
    ModelFailed,
    ModelNotFound,
    ShuttingDown,
    StartAborted,
)
from tests.fakes.helpers import wait_for
from tests.process.fakes import FakeLauncher, fast_config, make_supervisor, spec


async def started(
    names: str, models_max: int = 2, server_devices: tuple[str, ...] | None = None, **limits: object,
) -> tuple[Supervisor, FakeLauncher, dict]:
    specs = {n: spec(n) for n in names.split()}
    launcher = FakeLauncher()
    config = dataclasses.replace(fast_config(models_max, **limits), server_devices=server_devices)
    sup = make_supervisor(specs, config, launcher)
    await sup.start()
    return sup, launcher, specs


async def state_is(sup: Supervisor, name: str, state: State, timeout: float = 5) -> None:
    await wait_for(lambda: sup.models[name].state == state, timeout, message=f"{name} to be {state}")


async def test_request_loads_the_model_and_is_granted() -> None:
    sup, launcher, _ = await started("a")
    try:
        lease = await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)
        assert sup.models["a"].state == State.READY and sup.models["a"].in_flight == 1
        lease.release()
        lease.release()  # only the first release counts
        assert sup.models["a"].in_flight == 0
    finally:
        await sup.shutdown()
    assert launcher.alive() == []


async def test_reload_removing_a_queued_model_refuses_its_waiter() -> None:
    sup, launcher, specs = await started("a b", models_max=1)
    try:
        lease = await sup.acquire(sup.models["a"], True)  # a busy: b queues
        waiter = asyncio.create_task(sup.acquire(sup.models["b"], True))
        await wait_for(lambda: sup.waiting == 1, 5)
        del specs["b"]
        await sup.reload()
        with pytest.raises(ModelNotFound):
            await asyncio.wait_for(waiter, 5)
        lease.release()
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


async def test_stop_during_the_post_ready_info_fetch() -> None:
    sup, launcher, _ = await started("a")
    launcher.script("a").info_delay = 0.08
    try:
        await sup.load("a")
        await wait_for(lambda: launcher.alive("a") and launcher.alive("a")[0].ready(asyncio.get_running_loop().time()), 5)
        sup.unload("a")
        await state_is(sup, "a", State.STOPPED)
        assert launcher.alive() == []
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


async def test_unload_during_a_load_aborts_its_waiters() -> None:
    sup, launcher, _ = await started("a")
    launcher.script("a").load_secs = 10
    try:
        waiter = asyncio.create_task(sup.acquire(sup.models["a"], True))
        await state_is(sup, "a", State.STARTING)
        await wait_for(lambda: launcher.alive("a"), 5)
        sup.unload("a")
        with pytest.raises(StartAborted, match="stopped while loading"):
            await asyncio.wait_for(waiter, 5)
        await state_is(sup, "a", State.STOPPED)
        assert sup.models["a"].api_status == "unloaded" and not sup.models["a"].crashed
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


async def test_pinned_model_is_restarted_after_unload_crash_and_reload() -> None:
    specs = {"p": spec("p", pin=True)}
    launcher = FakeLauncher()
    sup = make_supervisor(specs, fast_config(1), launcher)
    await sup.start()
    try:
        await state_is(sup, "p", State.READY)
        first = launcher.alive("p")[0]
        sup.unload("p")
        await wait_for(lambda: launcher.alive("p") and launcher.alive("p")[0] is not first, 5)
        await state_is(sup, "p", State.READY)
        launcher.alive("p")[0].exit(1)  # crash
        await wait_for(lambda: len(launcher.children) == 3 and sup.models["p"].state == State.READY, 5)
        specs["p"] = spec("p", pin=True, options=(("ctx-size", "2000"),))
        await sup.reload()
        await wait_for(lambda: sup.models["p"].spec == specs["p"] and sup.models["p"].state == State.READY, 5)
        assert len(launcher.alive("p")) == 1
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


async def test_load_racing_a_reload_starts_nothing_untracked() -> None:
    sup, launcher, specs = await started("x y", models_max=1)
    try:
        (await sup.acquire(sup.models["y"], True)).release()
        del specs["x"]
        results = await asyncio.gather(sup.load("x"), sup.reload(), return_exceptions=True)
        assert isinstance(results[0], ModelNotFound), results
        assert "x" not in sup.models
        (await sup.acquire(sup.models["y"], True)).release()
        assert [c.name for c in launcher.alive()] == ["y"]
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


async def test_crash_loop_ends_failed_and_refuses_fast_until_the_holdoff() -> None:
    sup, launcher, _ = await started("a", failed_holdoff=5.0)
    launcher.script("a").crash_on_start = True
    try:
        with pytest.raises(ModelFailed):
            await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)
        assert sup.models["a"].state == State.FAILED
        assert len(launcher.children) == 3  # --restart-max
        with pytest.raises(ModelFailed) as info:
            await asyncio.wait_for(sup.acquire(sup.models["a"], True), 1)
        assert info.value.retry_after is not None and info.value.retry_after > 0
        assert len(launcher.children) == 3  # refused without a new try
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


async def test_crash_of_a_ready_model_is_restarted_for_the_next_request() -> None:
    sup, launcher, _ = await started("a")
    try:
        (await sup.acquire(sup.models["a"], True)).release()
        launcher.alive("a")[0].exit(-9)
        await wait_for(lambda: sup.models["a"].state != State.READY, 5)
        lease = await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)
        lease.release()
        assert sup.models["a"].restarts == 1
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


async def test_hung_child_is_replaced() -> None:
    sup, launcher, _ = await started("a")
    try:
        (await sup.acquire(sup.models["a"], True)).release()
        first = launcher.alive("a")[0]
        first.script.hang_health = True
        await wait_for(lambda: first.returncode is not None, 5, message="the hung child to be killed")
        await wait_for(lambda: sup.models["a"].state == State.READY and launcher.alive("a"), 5)
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


async def test_stalled_load_is_failed_not_waited_for_forever() -> None:
    sup, launcher, _ = await started("a", restart_max=1)
    launcher.script("a").hang_health = True
    try:
        with pytest.raises(ModelFailed, match="stalled"):
            await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


async def test_an_error_inside_a_life_leaves_the_model_defined(caplog: pytest.LogCaptureFixture) -> None:
    specs = {"a": spec("a")}
    launcher = FakeLauncher()

    def broken_argv(s: object, port: int) -> list[str]:
        raise RuntimeError("bug in argv building")

    sup = Supervisor(fast_config(1), lambda: dict(specs), launcher, None, broken_argv)  # type: ignore[arg-type]
    await sup.start()
    try:
        with caplog.at_level(logging.ERROR), pytest.raises(ModelFailed, match="internal error"):
            await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)
        assert sup.models["a"].state == State.FAILED
        assert any("[a]" in r.getMessage() for r in caplog.records)
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


async def test_a_broken_state_listener_does_not_break_the_owner() -> None:
    specs = {"a": spec("a")}
    launcher = FakeLauncher()

    def observer(*args: object) -> None:
        raise RuntimeError("listener bug")

    from tests.process.fakes import FakeProbe

    sup = Supervisor(
        fast_config(1), lambda: dict(specs), launcher, FakeProbe(launcher),
        lambda s, port: [s.name, str(port)], observer=observer,
    )
    await sup.start()
    try:
        (await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)).release()
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


async def test_shutdown_ends_a_child_that_ignores_sigterm_and_refuses_new_work() -> None:
    sup, launcher, _ = await started("a b")
    launcher.script("a").ignore_term = True
    launcher.script("b").load_secs = 10
    (await sup.acquire(sup.models["a"], True)).release()
    waiter = asyncio.create_task(sup.acquire(sup.models["b"], True))
    await state_is(sup, "b", State.STARTING)
    await asyncio.wait_for(sup.shutdown(), 5)
    with pytest.raises(ShuttingDown):
        await waiter
    assert launcher.alive() == []
    assert {p.state for p in sup.models.values()} == {State.SHUTDOWN}
    with pytest.raises(ShuttingDown):
        await sup.acquire(sup.models["a"], True)


async def test_cancelled_waiter_leaves_and_a_racing_grant_is_given_back() -> None:
    sup, launcher, _ = await started("a b", models_max=1)
    try:
        lease = await sup.acquire(sup.models["a"], True)
        waiter = asyncio.create_task(sup.acquire(sup.models["b"], True))
        await wait_for(lambda: sup.waiting == 1, 5)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert sup.waiting == 0
        passes = sup.counters.passes
        lease.release()
        # The release wakes the loop; once a pass has run after it, nothing may have been
        # evicted for the waiter that left.
        await wait_for(lambda: sup.counters.passes > passes, 5, message="a scheduling pass")
        assert sup.models["a"].state == State.READY and sup.models["b"].state == State.STOPPED
        assert sup.models["a"].in_flight == 0
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


async def test_autoload_off_refuses_a_stopped_model() -> None:
    sup, _, _ = await started("a")
    try:
        with pytest.raises(InvalidRequest, match="not loaded"):
            await asyncio.wait_for(sup.acquire(sup.models["a"], False), 5)
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


def test_log_follower_that_falls_behind_gets_the_end_marker() -> None:
    ring = LogRing(size=10, follow_queue=3)
    q = ring.follow()
    for i in range(10):
        ring.append(f"line {i}")
    items = []
    while not q.empty():
        items.append(q.get_nowait())
    assert items[-1] is None  # dropped, and told so
    assert ring.followers == 0
    assert ring.tail(2) == ["line 8", "line 9"]


async def test_request_on_a_model_readded_by_a_reload_keeps_it_busy() -> None:
    """Was: a reload that dropped a model while it served forgot the model's request count;
    the request's end, on the retired child, then counted against the model a later reload
    added back. Its next request read as idle, so the model was evicted mid-response (the
    reload storm's rare 'child closed the connection' errors)."""
    sup, launcher, specs = await started("a b", models_max=1)
    try:
        old = await sup.acquire(sup.models["a"], True)
        dropped = specs.pop("a")
        await sup.reload()
        specs["a"] = dropped
        await sup.reload()  # listed again; the old child still serves its request
        old.release()
        lease = await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)
        assert lease.proc is sup.models["a"] and sup.models["a"].in_flight == 1
        waiter = asyncio.create_task(sup.acquire(sup.models["b"], True))
        await wait_for(lambda: sup.waiting == 1, 5)
        passes = sup.counters.passes
        await wait_for(lambda: sup.counters.passes > passes, 5, message="a scheduling pass")
        assert sup.models["a"].state == State.READY, "a busy model was evicted"
        assert not waiter.done()
        lease.release()
        (await asyncio.wait_for(waiter, 5)).release()
        assert sup.models["a"].in_flight == 0 and sup.models["b"].in_flight == 0
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


async def test_a_ready_childs_output_is_held_between_reads_and_released_once_it_exits() -> None:
    """Loading lines are read at once; after that each batch of lines is followed by a hold
    (llama-server logs about nine lines per request, and a wakeup per line competed with
    request intake). Once the child has exited its last lines are read at once: a stop
    must not wait out a hold."""
    sup, launcher, _ = await started("a")
    try:
        lease = await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)
        lease.release()
        (child,) = launcher.alive("a")
        assert child.holds == []  # the loading line came while STARTING
        child.say(b"slot launch_slot_: id 0 | task 1 | processing task")
        await wait_for(lambda: child.holds, 5, message="a hold after a ready child's line")
        assert child.holds == [sup.config.timeouts.output_hold]
        assert "slot launch_slot_: id 0 | task 1 | processing task" in sup.models["a"].log_tail(5)
        sup.unload("a")
        await state_is(sup, "a", State.STOPPED)
        assert child.output_calls[-2:] == ["release", "close"]
    finally:
        await sup.shutdown()


def _one_model_under_a_budget(memory: object) -> tuple[Supervisor, FakeLauncher]:
    """A supervisor of one model, "a", whose loads go through `memory`."""
    from tests.process.fakes import FakeProbe

    specs = {"a": spec("a")}
    launcher = FakeLauncher()
    sup = Supervisor(
        fast_config(1), lambda: dict(specs), launcher, FakeProbe(launcher),
        lambda s, port: [s.name, str(port)], memory=memory,  # type: ignore[arg-type]
    )
    return sup, launcher


@pytest.mark.timeout(30)
async def test_a_gpu_driver_that_stops_answering_does_not_hang_loads_requests_or_shutdown() -> None:
    """NVML calls block in the driver when a GPU has fallen off the bus. The owner measures
    a ready child through the real probe (over a fake NVML that never answers): the model
    still becomes ready, serves, unloads and shuts down; its VRAM is just not known."""
    import threading

    from llamarouter.core.memory import DeviceProbe, MemoryManager

    release = threading.Event()
    asked: list[str] = []

    class StuckNvml:
        def nvmlDeviceGetCount(self) -> int:
            return 1

        def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
            return i

        def nvmlDeviceGetMemoryInfo(self, handle: int) -> object:
            asked.append("memory info")
            release.wait()
            raise RuntimeError("released")

        def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[object]:
            asked.append("process list")
            release.wait()
            return []

    probe = DeviceProbe(timeout=0.05)
    probe._nvml = StuckNvml()
    memory = MemoryManager(2**40, probe, 1.0, 0.01)
    sup, _ = _one_model_under_a_budget(memory)
    await sup.start()
    try:
        proc = sup.models["a"]
        lease = await asyncio.wait_for(sup.acquire(proc, True), 5)
        assert proc.state == State.READY and proc.device_bytes is None and probe.wedged
        lease.release()  # the first request's re-measure gives up at once
        (await asyncio.wait_for(sup.acquire(proc, True), 5)).release()
        sup.unload("a")
        await state_is(sup, "a", State.STOPPED)  # the owner has handled the re-measure too
        assert len(asked) == 1  # one call went into the driver, none after it
    finally:
        try:
            await asyncio.wait_for(sup.shutdown(), 5)
        finally:
            release.set()


async def test_a_gpu_host_records_each_childs_vram_once_ready() -> None:
    """With a memory budget on a GPU host, the owner asks NVML (here a fake) for the
    child's VRAM when it is ready; the budget then counts it, and it survives the exit as
    the guess for the next start."""
    from llamarouter.core.memory import Device, MemoryManager

    class GpuProbe:
        gpu = True

        def __init__(self) -> None:
            self.asked: list[int] = []

        def devices(self) -> list[Device]:
            return [Device("cuda:0", 2**40, 2**40)]

        def process_bytes(self, pid: int) -> int | None:
            self.asked.append(pid)
            # A first request makes the child allocate workspaces (as cuBLAS does).
            return 700 * 2**20 + pid + (100 * 2**20 if len(self.asked) > 1 else 0)

    probe = GpuProbe()
    memory = MemoryManager(2**40, probe, 1.0, 0.01)  # type: ignore[arg-type]
    sup, launcher = _one_model_under_a_budget(memory)
    await sup.start()
    try:
        lease = await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)
        child = launcher.alive("a")[0]
        proc = sup.models["a"]
        assert probe.asked == [child.pid]  # once ready
        assert proc.device_bytes == 700 * 2**20 + child.pid
        assert memory.used(sup.models.values()) == proc.device_bytes  # no estimate: no model file
        lease.release()  # the first request of this life: measured again
        await wait_for(lambda: proc.device_bytes == 800 * 2**20 + child.pid, 5)
        (await asyncio.wait_for(sup.acquire(proc, True), 5)).release()
        assert probe.asked == [child.pid, child.pid]  # not after every request
        sup.unload("a")
        await state_is(sup, "a", State.STOPPED)
        assert proc.device_bytes == 800 * 2**20 + child.pid
        assert memory.footprint(proc) == proc.device_bytes
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


async def test_unload_all_passes_over_a_model_whose_stop_is_on_its_way() -> None:
    # `a` is still READY but a stop (a TTL, an eviction) was sent in the same pass: `*`
    # used to pick it by its state and fail on it, leaving `b` loaded.
    sup, launcher, _ = await started("a b")
    try:
        for name in ("a", "b"):
            (await asyncio.wait_for(sup.acquire(sup.models[name], True), 5)).release()
            await state_is(sup, name, State.READY)
        sup.models["a"].stop("ttl")
        assert sup.models["a"].state == State.READY  # the owner has not acted yet
        assert sup.unload_all() == ["b"]
        await state_is(sup, "a", State.STOPPED)
        await state_is(sup, "b", State.STOPPED)
    finally:
        await sup.shutdown()
    assert launcher.alive() == []


async def _waits_for_the_turn(sup: Supervisor, lease: Lease, proc: ModelProcess) -> None:
    """A request for `proc` stays in line through a scheduling pass while `lease` is held,
    and is granted once it is released."""
    waiter = asyncio.create_task(sup.acquire(proc, True))
    await wait_for(lambda: sup.waiting == 1 or waiter.done(), 5)
    sup.decide_now(time.monotonic())
    assert not waiter.done()
    lease.release()
    (await asyncio.wait_for(waiter, 5)).release()


async def test_a_stopped_child_with_requests_in_flight_keeps_the_cpu_turn() -> None:
    # Unloaded while serving: its request ends when its connection closes, and until then
    # the child's turn is not over (the scheduler once dropped it from the count as soon as
    # the child left READY, and b computed beside it).
    # A CPU-only build (no devices) with a one-thread budget: one child computes at a time.
    sup, _, _ = await started("a b", server_devices=(), cpu_budget="1")
    try:
        await sup.load("a")
        await sup.load("b")
        lease = await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)
        sup.unload("a")
        await state_is(sup, "a", State.STOPPED)
        await _waits_for_the_turn(sup, lease, sup.models["b"])
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


async def test_a_retired_child_still_serving_keeps_the_cpu_turn() -> None:
    # A reload changed a while it served: the old child finishes its request and the new one
    # (same name, other process) waits for it before computing.
    sup, _, specs = await started("a", server_devices=(), cpu_budget="1")
    try:
        await sup.load("a")
        lease = await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)
        specs["a"] = spec("a", options=(("ctx-size", "2048"),))
        await sup.reload()
        new = sup.models["a"]
        assert new is not lease.proc
        await sup.load("a")
        await _waits_for_the_turn(sup, lease, new)
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


async def _b_loaded_behind_a(sup: Supervisor) -> tuple[Lease, asyncio.Task[Lease]]:
    """a computes (its request held); b is loaded for a request that waits for its CPU turn."""
    await sup.load("a")
    lease = await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)
    for_b = asyncio.create_task(sup.acquire(sup.models["b"], True))
    await state_is(sup, "b", State.READY)
    return lease, for_b


async def test_a_model_whose_requests_wait_for_their_cpu_turn_is_drained_only_once_it_computes() -> None:
    # b was loaded for a request that then waited for its CPU turn (a computes) when c's
    # request passed the bound. b, which has nothing in flight, was drained at once: it left
    # unserved and its request was refused as "stopped while loading (drained)". Now b
    # computes first (a's request ends), then gives way to c; b's request is served.
    sup, _, _ = await started("a b c", server_devices=(), cpu_budget="1", drain_after=0.05)
    try:
        lease, for_b = await _b_loaded_behind_a(sup)
        for_c = asyncio.create_task(sup.acquire(sup.models["c"], True))
        await wait_for(lambda: sup.waiting == 2 or for_c.done(), 5)
        # A pass as of a moment when c's request and b's load are both a second past the bound.
        sup.decide_now(time.monotonic() + 1.0)
        assert sup.models["b"].state == State.READY and not for_b.done()
        assert not sup.draining(sup.models["b"]) and not sup.draining(sup.models["a"])
        lease.release()
        (await asyncio.wait_for(for_b, 5)).release()
        (await asyncio.wait_for(for_c, 5)).release()
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


async def test_a_load_on_the_cpu_budget_waits_for_the_computing_childs_turn_to_end() -> None:
    # A load computes too (the child's warm-up): started beside a child computing on the
    # same cores, both spun at every barrier and a 0.05 s load took 0.5 s. b ran before, so
    # the threads its child computes with are known: its load waits until a's request ends.
    sup, launcher, _ = await started("a b", server_devices=(), cpu_budget="1")
    try:
        await sup.load("b")
        await state_is(sup, "b", State.READY)
        sup.unload("b")
        await state_is(sup, "b", State.STOPPED)
        spawned = len(launcher.children)
        await sup.load("a")
        lease = await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)
        for_b = asyncio.create_task(sup.acquire(sup.models["b"], True))
        await wait_for(lambda: sup.waiting == 1, 5)
        sup.decide_now(time.monotonic())
        assert sup.models["b"].expected_state == State.STOPPED and len(launcher.children) == spawned + 1
        lease.release()  # a's turn ends: b loads, alone, and serves
        (await asyncio.wait_for(for_b, 5)).release()
        assert len(launcher.children) == spawned + 2
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)


async def test_a_pass_between_a_drain_stop_sent_and_handled_does_not_abort_the_load_waited_for() -> None:
    # The stop is a command to b's owner; a pass that runs before the owner has handled it
    # sees b stopping already, and must see why (the scheduler's drain), or b's waiting
    # request is refused as if someone had stopped its load.
    sup, _, _ = await started("a b", server_devices=(), cpu_budget="1")
    try:
        lease, for_b = await _b_loaded_behind_a(sup)
        b = sup.models["b"]
        sup.arbiter.apply([scheduler.Drain("b"), scheduler.Evict("b", StopReason.DRAINED)])
        assert b.state == State.READY and b.expected_state == State.STOPPING
        sup.decide_now(time.monotonic())  # before b's owner has run
        lease.release()
        (await asyncio.wait_for(for_b, 5)).release()  # served by b's next load
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)
