"""Scheduling decisions of the Supervisor without processes: models are stand-ins whose
start/stop change state at once (and tell the supervisor), so each test replays a history
and checks what the scheduler decided."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from llamarouter.settings.config import Limits, ModelSpec, RouterConfig
from llamarouter.errors import BudgetExceeded, InvalidRequest, LlamaRouterError
from llamarouter.core.gguf_info import Estimate
from llamarouter.core.memory import Device, MemoryManager
from llamarouter.core.states import SLOT_STATES, State
from llamarouter.core.supervisor import Supervisor
from tests.fakes.helpers import wait_for


@dataclass(eq=False)
class StandIn:
    """What the supervisor reads and calls on a ModelProcess."""

    spec: ModelSpec
    sup: Supervisor
    state: State = State.STOPPED
    in_flight: int = 0
    waiters: int = 0
    last_used: float = 0.0
    estimate: Estimate | None = None
    estimate_spec: ModelSpec | None = None
    measured_bytes: int | None = None
    exit_code: int | None = None
    loaded_info: dict[str, object] = field(default_factory=dict)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    log: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def holds_slot(self) -> bool:
        return self.state in SLOT_STATES

    async def wait_stopped(self) -> None:
        while self.state != State.STOPPED:
            await self._stopped.wait()

    def reset_failed(self) -> None:
        pass

    def _move(self, new: State) -> None:
        if new == State.STOPPED:
            self._stopped.set()
        else:
            self._stopped.clear()
        old, self.state = self.state, new
        self.log.append(str(new))
        self.sup._on_state(self, old, new)  # type: ignore[arg-type]

    def start(self) -> None:
        if self.state in (State.STOPPED, State.FAILED):
            self._move(State.STARTING)

    def stop(self, reason: str) -> None:
        if self.state in (State.STARTING, State.READY, State.BACKOFF):
            self._move(State.STOPPING)

    # test helpers: what the run task would do
    def ready(self) -> None:
        self._move(State.READY)

    def exited(self) -> None:
        self._move(State.STOPPED)


def make(names: str, models_max: int, memory: MemoryManager | None = None, pinned: str = "") -> tuple[Supervisor, dict[str, StandIn]]:
    specs = {n: ModelSpec(name=n, source="models_dir", pin=n in pinned.split()) for n in names.split()}
    config = RouterConfig(limits=Limits(models_max=models_max))
    sup = Supervisor(config, lambda: specs, None, None, None, memory=memory)  # type: ignore[arg-type]
    procs = {n: StandIn(spec, sup) for n, spec in specs.items()}
    sup.models = procs  # type: ignore[assignment]
    return sup, procs


async def queue(sup: Supervisor, proc: StandIn) -> asyncio.Task[None]:
    """A request waiting for `proc`: returns once it joined the queue (or was granted)."""
    task = asyncio.create_task(sup._queue_for(proc))  # type: ignore[arg-type]
    entry_waiters = sup._queue[proc.name].waiters if proc.name in sup._queue else 0
    await wait_for(
        lambda: task.done() or (proc.name in sup._queue and sup._queue[proc.name].waiters > entry_waiters)
        or proc.state != State.STOPPED,
        2,
    )
    return task


async def test_free_slot_starts_at_once() -> None:
    sup, m = make("a b", models_max=2)
    t = await queue(sup, m["a"])
    assert m["a"].state == State.STARTING
    await t


async def test_full_slots_evict_least_recently_used_idle_model() -> None:
    sup, m = make("a b c", models_max=2)
    for name, used in (("a", 5.0), ("b", 1.0)):
        m[name].start()
        m[name].ready()
        m[name].last_used = used
    t = await queue(sup, m["c"])
    assert m["b"].state == State.STOPPING and m["a"].state == State.READY  # b is older
    assert m["c"].state == State.STOPPED  # waits for b's slot
    m["b"].exited()
    assert m["c"].state == State.STARTING
    await t


async def test_busy_and_pinned_models_are_never_evicted() -> None:
    sup, m = make("a b c d", models_max=3, pinned="b")
    for name in "abc":
        m[name].start()
        m[name].ready()
    m["a"].in_flight = 1  # oldest but busy
    m["c"].last_used = 9.0
    t = await queue(sup, m["d"])
    assert [m[n].state for n in "abc"] == [State.READY, State.READY, State.STOPPING]
    m["c"].exited()
    await t


async def test_fifo_and_one_entry_per_model() -> None:
    sup, m = make("a b c", models_max=1)
    m["a"].start()
    m["a"].ready()
    m["a"].in_flight = 1
    tb1 = await queue(sup, m["b"])
    tc = await queue(sup, m["c"])
    tb2 = await queue(sup, m["b"])
    assert list(sup._queue) == ["b", "c"] and sup._queue["b"].waiters == 2
    assert m["a"].state == State.READY  # busy: nothing evicted
    sup.release(m["a"])  # type: ignore[arg-type]
    assert m["a"].state == State.STOPPING  # one eviction for both b requests
    m["a"].exited()
    assert m["b"].state == State.STARTING and m["c"].state == State.STOPPED
    await asyncio.gather(tb1, tb2)
    m["b"].ready()
    # b's waiters were granted (stand-ins count no request in flight), so b is idle and
    # no longer wanted: it is evicted for c, the next in line.
    assert m["b"].state == State.STOPPING
    m["b"].exited()
    assert m["c"].state == State.STARTING
    await tc


async def test_cancelled_waiter_leaves_and_costs_no_slot() -> None:
    sup, m = make("a b", models_max=1)
    m["a"].start()
    m["a"].ready()
    m["a"].in_flight = 1
    t = await queue(sup, m["b"])
    t.cancel()
    with pytest.raises(asyncio.CancelledError):
        await t
    assert sup._queue == {}
    sup.release(m["a"])  # type: ignore[arg-type]
    assert m["a"].state == State.READY and m["b"].state == State.STOPPED


class Probe:
    gpu = False

    def devices(self) -> list[Device]:
        return [Device("cpu", 10**12, 10**12)]


def est(total: int) -> Estimate:
    return Estimate(weights_gpu=0, weights_cpu=total, kv=0, compute=0, n_ctx=512)


async def test_memory_budget_evicts_until_the_bytes_fit() -> None:
    memory = MemoryManager(1000, Probe(), 1.0, 0.1)  # type: ignore[arg-type]
    sup, m = make("a b c big", models_max=0, memory=memory)
    for name, size, used in (("a", 300, 1.0), ("b", 300, 2.0), ("c", 300, 3.0)):
        m[name].estimate, m[name].estimate_spec = est(size), m[name].spec
        m[name].start()
        m[name].ready()
        m[name].last_used = used
    m["big"].estimate, m["big"].estimate_spec = est(700), m["big"].spec
    t = await queue(sup, m["big"])
    # 900 used + 700 needed - 1000 budget = 600 to free: a and b (LRU), not c.
    assert [m[n].state for n in "abc"] == [State.STOPPING, State.STOPPING, State.READY]
    m["a"].exited()
    assert m["big"].state == State.STOPPED  # 600 + 700 > 1000: still waits
    m["b"].exited()
    assert m["big"].state == State.STARTING
    await t


async def test_model_larger_than_budget_is_refused_without_evicting() -> None:
    memory = MemoryManager(1000, Probe(), 1.0, 0.1)  # type: ignore[arg-type]
    sup, m = make("a huge", models_max=0, memory=memory, pinned="a")
    m["a"].estimate, m["a"].estimate_spec = est(400), m["a"].spec
    m["a"].start()
    m["a"].ready()
    m["huge"].estimate, m["huge"].estimate_spec = est(700), m["huge"].spec
    with pytest.raises(BudgetExceeded, match="pinned"):
        await sup.check_fits(m["huge"])  # type: ignore[arg-type]
    assert m["a"].state == State.READY


async def test_load_endpoint_rules() -> None:
    sup, m = make("a b", models_max=1)
    m["a"].start()
    m["a"].ready()
    m["a"].in_flight = 1
    with pytest.raises(LlamaRouterError, match="model limit reached"):
        await sup.load("b")
    with pytest.raises(InvalidRequest, match="already running"):
        await sup.load("a")
    m["a"].in_flight = 0
    load = asyncio.create_task(sup.load("b"))
    await wait_for(lambda: m["a"].state == State.STOPPING, 2)
    m["a"].exited()
    await load
    assert m["b"].state == State.STARTING
