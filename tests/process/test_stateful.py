"""A stateful property test of the whole core against scripted children.

Hypothesis interleaves requests, loads, unloads, reloads that add, remove and change
models, crashes, hangs, slow starts, stops in every phase, client disconnects and, at the
end of every run, shutdown. After every step it checks the invariants the core promises:

- loaded + loading models never exceed --models-max;
- a model serving a request is never evicted (checked at the moment of each eviction);
- no model stays in a transitional state past its bound;
- the event loop is never blocked for more than 100 ms;
- every waiter is answered, and shutdown completes with no child left;
- fairness: after every scheduling pass, no request has waited past the drain bound for a
  model that cannot start while a drainable model (loaded for at least the bound, not
  pinned, not already giving way) stays put: something is on its way out for it, or it was
  started;
- CPU turns: the children are on a CPU budget that fits one of them at a time, so no two
  models ever have requests in flight at once.

Derandomized (a fixed seed), so CI runs the same examples each time and a failure replays.
LLAMAROUTER_STATEFUL_EXAMPLES raises the number of runs for a longer local search.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import os
import time
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from llamarouter.core import scheduler
from llamarouter.core.arbiter import Arbiter
from llamarouter.core.process import ModelProcess
from llamarouter.core.states import State
from llamarouter.core.supervisor import Supervisor
from llamarouter.errors import LlamaRouterError
from llamarouter.settings.config import ModelSpec
from tests.process.fakes import FAST, FakeLauncher, fast_config, make_supervisor, spec

NAMES = ("a", "b", "c", "d")
MODELS_MAX = 2
# Longest time a model may stay in a state that is on its way somewhere else.
BOUNDS = {
    State.STARTING: FAST.load_stall + FAST.spawn + FAST.info + 0.5,
    State.STOPPING: FAST.stop + FAST.reap + FAST.drain + 0.5,
    State.BACKOFF: FAST.backoff_max + 0.5,
}
LOOP_LAG_LIMIT = 0.1
EXAMPLES = int(os.environ.get("LLAMAROUTER_STATEFUL_EXAMPLES", "100"))
STEPS = 25  # EXAMPLES * STEPS >= 2,000 steps per CI run


class CheckedArbiter(Arbiter):
    """Checks, at the moment it happens, that no eviction hits a model serving a request.
    What counts as serving is the test's own count of the leases it holds on each
    process, not the supervisor's."""

    last_snapshot: scheduler.Snapshot | None = None

    def __init__(self, sup: Supervisor) -> None:
        super().__init__(
            sup.config, sup.table, sup.admission, sup.memory, None, lambda: None, lambda: sup.closing,
        )
        self.violations: list[str] = []
        self.held: collections.Counter[ModelProcess] = collections.Counter()

    def snapshot(self, now: float) -> scheduler.Snapshot:
        snap = super().snapshot(now)
        self.last_snapshot = snap
        return snap

    def apply(self, actions: list[scheduler.Action]) -> None:
        for action in actions:
            if not isinstance(action, scheduler.Evict):
                continue
            proc = self._table.models.get(action.model)
            if proc is not None and self.held[proc] > 0:
                self.violations.append(f"evicted busy {proc.name} ({action.reason})")
        super().apply(actions)
        if self.last_snapshot is not None:
            self._check_fairness(self.last_snapshot, actions)

    def _check_fairness(self, snap: scheduler.Snapshot, actions: list[scheduler.Action]) -> None:
        bound = snap.drain_after
        if bound is None or snap.closing:
            return
        views = {m.name: m for m in snap.models if m.listed}
        overdue = [
            w for w in snap.waiters
            if not w.load and w.model in views and views[w.model].state == State.STOPPED
            and snap.now - w.since >= bound
        ]
        if not overdue:
            return
        started = {a.model for a in actions if isinstance(a, scheduler.Start)}
        leaving = {a.model for a in actions if isinstance(a, (scheduler.Evict, scheduler.Drain))}
        # A model whose requests wait for their CPU turn, none in flight, is drained once it
        # computes (turns pass in order): it is on its way out already.
        waiting = {w.model for w in snap.waiters if not w.load}
        next_out = {
            m.name for m in views.values()
            if m.state == State.READY and not m.draining and m.name in waiting and m.in_flight == 0
            and snap.now - m.ready_at >= bound
        }
        # A load on the CPU budget with a slot for it waits for its turn while another child
        # computes (or loads): it starts when their requests end (turns pass in order).
        held = sum(1 for m in snap.models if m.state in (State.STARTING, State.READY, State.STOPPING))
        computing = any(
            m.cpu_threads > 0 and (m.in_flight > 0 or m.state == State.STARTING) for m in snap.models
        ) or any(isinstance(a, scheduler.Grant) for a in actions)
        turn = snap.cpu_budget > 0 and computing and held < snap.models_max and any(
            views[w.model].cpu_threads > 0 for w in overdue
        )
        on_the_way = started or leaving or next_out or turn or any(
            m.state == State.STOPPING or m.draining for m in snap.models
        )
        # A model keeps its slot for the bound once loaded (its turn): not drainable yet.
        drainable = [
            m.name for m in views.values()
            if m.state == State.READY and not m.pinned and not m.draining and snap.now - m.ready_at >= bound
        ]
        if not on_the_way and drainable:
            self.violations.append(
                f"waiters for {sorted({w.model for w in overdue})} past the bound while "
                f"{drainable} stay loaded"
            )


class CoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.launcher = FakeLauncher()
        self.specs: dict[str, ModelSpec] = {n: spec(n) for n in NAMES[:3]}
        # A drain bound of the order of the requests' hold times, so drains happen; a CPU
        # budget of one thread on a CPU-only build, so every child computes alone.
        config = fast_config(MODELS_MAX, drain_after=0.02, cpu_budget="1")
        self.sup = make_supervisor(self.specs, dataclasses.replace(config, server_devices=()), self.launcher)
        self.checked = self.sup.arbiter = CheckedArbiter(self.sup)
        self.requests: list[asyncio.Task[Any]] = []
        self.max_lag = 0.0
        self.epoch = 0
        self.monitor: asyncio.Task[None] | None = None

    # ----------------------------------------------------------------- helpers
    def run(self, seconds: float) -> None:
        self.until(asyncio.sleep(seconds))

    def until(self, aw: Any) -> Any:
        self.epoch += 1
        return self.loop.run_until_complete(aw)

    def call(self, fn: Any) -> None:
        """Run a synchronous core call inside the loop, as handlers do."""

        async def inside() -> None:
            fn()

        self.until(inside())

    async def _lag_monitor(self) -> None:
        # How long the loop ran without coming back to this task, counted in the loop
        # thread's CPU time: on a shared 2-core machine the OS may stop the whole process
        # for a while, which says nothing about our code holding the loop.
        # Between steps the loop is not running and Hypothesis works in this thread: a
        # sample that spans a step boundary (`epoch` changed) is not the loop's.
        tick = 0.01
        while True:
            wall, cpu, epoch = time.monotonic(), time.thread_time(), self.epoch
            await asyncio.sleep(tick)
            if epoch != self.epoch:
                continue
            held = min(time.monotonic() - wall, time.thread_time() - cpu)
            self.max_lag = max(self.max_lag, held - tick)

    async def _request(self, name: str, hold: float) -> str:
        proc = self.sup.find(name)
        if proc is None:
            return "not found"
        try:
            lease = await self.sup.acquire(proc, autoload=True)
        except LlamaRouterError as exc:
            return type(exc).__name__
        self.checked.held[lease.proc] += 1
        try:
            await asyncio.sleep(hold)
        finally:
            self.checked.held[lease.proc] -= 1
            lease.release()
        return "ok"

    # ----------------------------------------------------------------- rules
    @initialize()
    def boot(self) -> None:
        self.monitor = self.loop.create_task(self._lag_monitor())
        self.until(self.sup.start())

    @rule(name=st.sampled_from(NAMES), hold=st.sampled_from((0.0, 0.01, 0.05)))
    def request(self, name: str, hold: float) -> None:
        self.requests.append(self.loop.create_task(self._request(name, hold)))
        self.run(0.005)

    @rule(name=st.sampled_from(NAMES))
    def load(self, name: str) -> None:
        async def go() -> None:
            try:
                await self.sup.load(name)
            except LlamaRouterError:
                pass

        self.requests.append(self.loop.create_task(go()))
        self.run(0.005)

    @rule(name=st.sampled_from(NAMES))
    def unload(self, name: str) -> None:
        def unload() -> None:
            try:
                self.sup.unload(name)
            except LlamaRouterError:
                pass

        self.call(unload)
        self.run(0.002)

    @rule(name=st.sampled_from(NAMES), change=st.sampled_from(("add", "remove", "change")))
    def reload(self, name: str, change: str) -> None:
        if change == "remove":
            self.specs.pop(name, None)
        elif change == "add":
            self.specs.setdefault(name, spec(name))
        else:
            ctx = str(1000 + len(self.launcher.children))
            self.specs[name] = spec(name, options=(("ctx-size", ctx),))
        self.until(self.sup.reload())
        self.run(0.002)

    @rule(name=st.sampled_from(NAMES))
    def crash(self, name: str) -> None:
        for child in self.launcher.alive(name):
            child.exit(-9)
        self.run(0.002)

    @rule(
        name=st.sampled_from(NAMES),
        kind=st.sampled_from(("fine", "slow", "hang", "crash_on_start", "ignore_term", "slow_info")),
    )
    def script(self, name: str, kind: str) -> None:
        s = self.launcher.script(name)
        s.load_secs, s.hang_health, s.crash_on_start = 0.0, False, False
        s.ignore_term, s.info_delay = False, 0.0
        if kind == "slow":
            s.load_secs = 0.08
        elif kind == "hang":
            s.hang_health = True
        elif kind == "crash_on_start":
            s.crash_on_start = True
        elif kind == "ignore_term":
            s.ignore_term = True
        elif kind == "slow_info":
            s.info_delay = 0.05

    @rule(index=st.integers(0, 50))
    def disconnect(self, index: int) -> None:
        # No precondition on what is pending: that depends on timing, and Hypothesis needs
        # the same choices to be drawable on a replay.
        pending = [t for t in self.requests if not t.done()]
        if pending:
            pending[index % len(pending)].cancel()
        self.run(0.002)

    @rule(seconds=st.sampled_from((0.01, 0.05, 0.2)))
    def wait(self, seconds: float) -> None:
        self.run(seconds)

    # ----------------------------------------------------------------- invariants
    @invariant()
    def slots_are_never_exceeded(self) -> None:
        holding = [p.name for p in self.sup.all_processes() if p.holds_slot]
        assert len(holding) <= MODELS_MAX, holding

    @invariant()
    def one_model_computes_at_a_time(self) -> None:
        computing = [p.key for p in self.sup.admission.busy if self.sup.arbiter.cpu.threads(p) > 0]
        assert len(computing) <= 1, computing

    @invariant()
    def no_busy_model_was_evicted(self) -> None:
        assert not self.checked.violations, self.checked.violations

    @invariant()
    def transitions_end_in_time(self) -> None:
        now = time.monotonic()
        for proc in self.sup.all_processes():
            bound = BOUNDS.get(proc.state)
            if bound is not None:
                assert now - proc.state_changed_at <= bound, (proc.name, proc.state, now - proc.state_changed_at)

    @invariant()
    def the_loop_is_never_blocked(self) -> None:
        assert self.max_lag <= LOOP_LAG_LIMIT, self.max_lag

    def teardown(self) -> None:
        try:
            # Every waiter is answered: with no new work, the queue drains in bounded time.
            pending = [t for t in self.requests if not t.done()]
            if pending:
                done, still = self.until(asyncio.wait(pending, timeout=10))
                assert not still, f"{len(still)} request(s) never answered"
            started = time.monotonic()
            self.until(asyncio.wait_for(self.sup.shutdown(), 10))
            assert time.monotonic() - started < 10
            assert self.launcher.alive() == [], self.launcher.alive()
            assert self.max_lag <= LOOP_LAG_LIMIT, self.max_lag
            assert not self.checked.violations, self.checked.violations
        finally:
            if self.monitor is not None:
                self.monitor.cancel()
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.until(asyncio.sleep(0))
            self.loop.close()


CoreMachine.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    print_blob=True,
)
TestCore = CoreMachine.TestCase
