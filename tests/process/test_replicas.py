"""A model with `replicas = N` against scripted children: a request finds a free slot or
waits in the router, and a request waiting while every ready child's slots are busy
starts another child when there is room; requests on the least busy child, each replica
restarted on its own, extra ones stopped when idle or when room is needed."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from llamarouter.core.admission import Lease
from llamarouter.core.states import State
from llamarouter.core.supervisor import Supervisor
from llamarouter.errors import ConfigError
from llamarouter.settings.discovery import per_model
from tests.fakes.helpers import wait_for
from tests.process.fakes import FakeLauncher, FakeProbe, fast_config, spec


async def _both_busy(sup: Supervisor) -> tuple[Lease, Lease]:
    """A request on the first child's only slot, and one that waits for a slot: the second
    child starts for it and takes it."""
    first = await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)
    second = await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)
    assert {first.proc.replica, second.proc.replica} == {0, 1}
    return first, second


def _supervisor(
    launcher: FakeLauncher, models_max: int = 3, slots: int = 1, tick: float | None = None, **limits: object,
) -> Supervisor:
    specs = {"a": spec("a", replicas=2), "b": spec("b")}
    # The children's slots come from their environment, as llama-server reads -np there too.
    config = dataclasses.replace(
        fast_config(models_max, **limits), child_env=(("LLAMA_ARG_N_PARALLEL", str(slots)),),
    )
    if tick is not None:  # no housekeeping pass to hide a missing decision
        config = dataclasses.replace(config, timeouts=dataclasses.replace(config.timeouts, tick=tick))
    return Supervisor(
        config, lambda: dict(specs), launcher, FakeProbe(launcher), lambda s, port: [s.name, str(port)],
    )


async def test_a_request_waiting_for_a_slot_starts_the_second_replica() -> None:
    launcher = FakeLauncher()
    sup = _supervisor(launcher)
    await sup.start()
    try:
        first = await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)
        assert first.proc.replica == 0
        extra = sup.table.extra["a"][0]
        assert extra.state == State.STOPPED  # one request, one slot: nothing waits yet
        # The first child's one slot is busy: this one waits in the router, which starts
        # replica 2, and is granted there.
        second = await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)
        assert second.proc is extra and extra.key == "a#2" and len(launcher.alive("a")) == 2
        # Both slots busy and no third replica: the next one waits for a slot to free.
        third = asyncio.create_task(sup.acquire(sup.models["a"], True))
        await wait_for(lambda: sup.waiting == 1, 5, message="the third request to wait")
        first.release()
        lease = await asyncio.wait_for(third, 5)
        assert lease.proc is first.proc  # the slot that freed
        for held in (second, lease):
            held.release()
    finally:
        await sup.shutdown()
    assert launcher.alive() == []


async def test_a_freed_slot_goes_at_once_to_a_request_waiting_for_one() -> None:
    """Two slots per child, both replicas' slots busy: one request ending (its child still
    busy with the other) lets a waiting request in at once, not when the child is idle."""
    launcher = FakeLauncher()
    sup = _supervisor(launcher, slots=2, tick=60.0)
    await sup.start()
    try:
        leases = [await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5) for _ in range(3)]
        leases.append(await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5))
        assert sorted(lease.proc.replica for lease in leases) == [0, 0, 1, 1]
        waiting = asyncio.create_task(sup.acquire(sup.models["a"], True))
        await wait_for(lambda: sup.waiting == 1, 5, message="a request waiting for a slot")
        leases.pop(0).release()
        lease = await asyncio.wait_for(waiting, 1)
        leases.append(lease)
        for held in leases:
            held.release()
    finally:
        await sup.shutdown()


async def test_no_extra_replica_while_a_slot_is_free() -> None:
    launcher = FakeLauncher()
    sup = _supervisor(launcher, slots=2)
    await sup.start()
    try:
        leases = [await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5) for _ in range(2)]
        assert {lease.proc.replica for lease in leases} == {0}  # both slots of the first child
        for _ in range(3):  # passes that see every slot busy but nobody waiting
            passes = sup.counters.passes
            sup.kick()
            await wait_for(lambda: sup.counters.passes > passes, 5, message="a scheduling pass")
        assert sup.table.extra["a"][0].state == State.STOPPED
        for lease in leases:
            lease.release()
    finally:
        await sup.shutdown()


async def test_an_extra_replica_stops_after_its_idle_ttl_and_the_first_stays() -> None:
    launcher = FakeLauncher()
    sup = _supervisor(launcher, replica_ttl=0.2)
    await sup.start()
    try:
        leases = await _both_busy(sup)
        extra = sup.table.extra["a"][0]
        for lease in leases:
            lease.release()
        await wait_for(lambda: extra.state == State.STOPPED, 5, message="the idle extra replica to stop")
        assert extra.stop_reason == "ttl" and sup.models["a"].state == State.READY
    finally:
        await sup.shutdown()


async def test_an_extra_replica_is_evicted_before_an_idle_model() -> None:
    launcher = FakeLauncher()
    sup = _supervisor(launcher, models_max=2)
    await sup.start()
    try:
        leases = await _both_busy(sup)
        extra = sup.table.extra["a"][0]
        for lease in leases:
            lease.release()
        # Both slots are a's: b needs one, and a's extra child is the one to go.
        b = await asyncio.wait_for(sup.acquire(sup.models["b"], True), 5)
        assert extra.state in (State.STOPPING, State.STOPPED) and sup.models["a"].state == State.READY
        assert extra.stop_reason == "evicted"
        b.release()
    finally:
        await sup.shutdown()


async def test_a_crashed_replica_is_restarted_while_the_other_serves() -> None:
    launcher = FakeLauncher()
    sup = _supervisor(launcher)
    await sup.start()
    try:
        leases = await _both_busy(sup)
        extra = sup.table.extra["a"][0]
        leases[1 if leases[1].proc is extra else 0].release()
        lease = leases[0] if leases[0].proc is not extra else leases[1]
        crashed = launcher.by_port(extra.port or 0)
        assert crashed is not None
        crashed.exit(1)
        await wait_for(lambda: extra.restarts == 1 and extra.state == State.READY, 5, message="a restart")
        assert sup.models["a"].state == State.READY and sup.models["a"].restarts == 0
        lease.release()
    finally:
        await sup.shutdown()


async def test_requests_go_to_a_ready_replica_while_the_first_child_restarts() -> None:
    launcher = FakeLauncher()
    sup = _supervisor(launcher)
    await sup.start()
    try:
        leases = await _both_busy(sup)
        extra = sup.table.extra["a"][0]
        for lease in leases:
            lease.release()
        first = sup.models["a"]
        launcher.script("a").load_secs = 0.5  # its restart takes a while
        child = launcher.by_port(first.port or 0)
        assert child is not None
        child.exit(1)
        await wait_for(lambda: first.state in (State.BACKOFF, State.STARTING), 5)
        served = await asyncio.wait_for(sup.acquire(first, True), 5)
        assert served.proc is extra
        served.release()
    finally:
        await sup.shutdown()


async def test_events_tell_the_models_status_not_an_extra_replicas() -> None:
    launcher = FakeLauncher()
    sup = _supervisor(launcher, replica_ttl=0.1)
    await sup.start()
    try:
        async with sup.events.subscribe() as events:
            leases = await _both_busy(sup)
            for lease in leases:
                lease.release()
            extra = sup.table.extra["a"][0]
            await wait_for(lambda: extra.state == State.STOPPED, 5, message="the extra replica to stop")
            seen = []
            while not events.empty():
                line = events.get_nowait()
                assert line is not None
                seen.append(line)
        # a loaded once (its first child): no "loading"/"unloaded" for the extra one.
        statuses = [line for line in seen if b'"model":"a"' in line]
        assert len(statuses) == 2 and b"loading" in statuses[0] and b"loaded" in statuses[1], seen
    finally:
        await sup.shutdown()


async def test_unload_stops_every_replica() -> None:
    launcher = FakeLauncher()
    sup = _supervisor(launcher)
    await sup.start()
    try:
        for lease in await _both_busy(sup):
            lease.release()
        sup.unload("a")
        await wait_for(lambda: launcher.alive("a") == [], 5, message="both children to stop")
    finally:
        await sup.shutdown()


@pytest.mark.parametrize("value", ["0", "65", "two", "1.5"])
def test_a_bad_replicas_key_is_refused_with_the_model_named(value: str) -> None:
    with pytest.raises(ConfigError, match=r"preset \[m\]: replicas must be"):
        per_model({"replicas": value}, "m")


def test_the_replicas_key_is_read() -> None:
    assert per_model({"replicas": "3"}, "m") == {"replicas": 3}
