"""The scheduling loop (gunicorn's arbiter): one task that owns every decision.

Each pass takes a snapshot of the models and the waiting line, asks the pure scheduler
(`scheduler.plan`) what to do, and applies the actions with no await in between. Model
state is changed only by each model's owner task; the arbiter sends it commands. A state
change, a new or departing waiter, a released lease and a reload all wake the loop
(`kick`); deadlines and TTLs wake it on time; at rest nothing does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from ..settings.config import RouterConfig
from . import scheduler
from .admission import Admission, Usage
from .cpushare import CpuShare
from .loadcost import LoadCosts
from .memory import MemoryManager
from .models import ModelTable
from .placing import Go, Placing
from .process import ModelProcess
from .refusals import refusal
from .states import State, StopReason

log = logging.getLogger("llamarouter.supervisor")


class SchedulingWatch(Protocol):
    """Sees what the scheduler does beyond state changes (metrics, the dashboard); its
    methods never await and must not raise."""

    def waited(self, model: str, seconds: float) -> None: ...

    def drained(self, model: str) -> None: ...


@dataclass
class Counters:
    evictions: int = 0
    passes: int = 0  # scheduling passes run (what a test waits on to know one has run)


class Arbiter:
    def __init__(
        self,
        config: RouterConfig,
        table: ModelTable,
        admission: Admission,
        memory: MemoryManager | None,
        watch: SchedulingWatch | None,
        record: Callable[[], None],
        closing: Callable[[], bool],
    ) -> None:
        self._config = config
        self._table = table
        self._admission = admission
        self._memory = memory
        self._watch = watch
        self._record = record
        self._closing = closing
        self.kick = asyncio.Event()
        self.counters = Counters()
        # Giving way to requests past the drain bound: new requests queue, the model is
        # evicted once idle.
        self.drains: set[ModelProcess] = set()
        self.costs = LoadCosts(bool(config.limits.evict_cost))
        self._starts: dict[int, int] = {}  # id(proc) -> number of its latest load
        self._generations = itertools.count(1)
        self._task: asyncio.Task[None] | None = None
        # Per-device budgets: each Start is placed on devices first (placing.py).
        self.placing = Placing.of(
            config, memory, table, admission, self.drains, watch.drained if watch is not None else None,
        )
        self.cpu = CpuShare(config)
        if self.cpu.budget > 0 and config.server_devices == ():
            log.info("CPU turns: llama-server computes on the CPU here; its children take turns within "
                     "%d CPU threads (--cpu-budget)", self.cpu.budget)

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="scheduler")
        self._task.add_done_callback(_loop_done)
        self.kick.set()

    async def stop(self, timeout: float) -> None:
        """Cancel the loop and wait for it (bounded). Never raises: a loop that died of a
        bug (logged when it died) must not skip the rest of a shutdown."""
        task = self._task
        if task is None:
            return
        task.cancel()
        _, pending = await asyncio.wait([task], timeout=timeout)
        if pending:
            log.error("the scheduling loop did not end within %.1fs", timeout)

    def start_model(self, proc: ModelProcess) -> bool:
        """Start `proc`, placed first where there are per-device budgets; False when its
        placement put it off (evicting for it, waiting, or refused)."""
        go = self.placing.start(proc) if self.placing is not None else Go(True)
        self.counters.evictions += go.evicted
        if go.now:
            self.note_start(proc)
            proc.start(go.placement)
        return go.now

    def forget(self, proc: ModelProcess) -> None:
        self._starts.pop(id(proc), None)
        self.cpu.forget(proc)

    async def run(self) -> None:
        tick = self._config.timeouts.tick
        next_tick = time.monotonic() + tick
        while True:
            now = time.monotonic()
            wake = soonest = self.decide(now)
            if now >= next_tick:
                next_tick = now + tick
                try:
                    self._record()
                except Exception:
                    log.exception("recording the children in the state dir failed")
            if self._settling():
                wake = next_tick if soonest is None else min(next_tick, soonest)
            # At rest (nothing waits, nothing loads or stops) no timer is set: only an
            # event wakes the loop, so an idle router costs no CPU.
            timeout = None if wake is None else max(0.0, wake - time.monotonic()) + 0.001
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.kick.wait()
            self.kick.clear()

    def _settling(self) -> bool:
        """Whether the housekeeping tick is still needed: requests wait (what they wait
        for, such as memory a sleeping child gave back, may change without an event), or
        a child is loading, stopping or backing off (the state-dir record of a child
        spawned mid-load)."""
        return bool(self._admission.waiters) or any(
            p.state in (State.STARTING, State.STOPPING, State.BACKOFF) for p in self._table.all_processes()
        )

    def decide(self, now: float) -> float | None:
        """One scheduling pass: plan from a snapshot and apply it, with no await between.
        Returns when the next one is due without an event (None: only on an event)."""
        soonest = None
        # The whole pass, not only plan and apply: a loop that died of a bug would
        # leave every later request waiting for a grant that never comes.
        try:
            self._stop_drained()
            if self.placing is not None:
                self.placing.tidy()
            snap = self.snapshot(now)
            self.apply(scheduler.plan(snap))
            soonest = scheduler.next_wakeup(snap)
        except Exception:  # a bug of ours: log it, keep the loop (and the router) alive
            log.exception("scheduling pass failed")
        self.counters.passes += 1
        return soonest

    def _stop_drained(self) -> None:
        for proc in list(self._table.finishing):
            if self._admission.in_flight(proc) == 0 or proc.expected_state != State.READY:
                self._table.finishing.discard(proc)
                proc.stop(StopReason.RELOAD)

    def snapshot(self, now: float) -> scheduler.Snapshot:
        memory = self._memory
        views = []
        for proc in self._table.all_processes():
            usage = self._admission.usage.get(proc.name) if self._table.listed(proc) else Usage()
            # An extra replica is idle by its own requests, not its model's.
            used = self._admission.released_at(proc) if proc.replica else usage.last_used
            state = proc.expected_state
            starts = self._starts.get(id(proc), 0)
            replicas = proc.spec.replicas
            in_flight = self._admission.in_flight(proc)
            views.append(
                scheduler.ModelView(
                    name=proc.key,
                    model=proc.name,
                    replica=proc.replica,
                    replicas=replicas,
                    slots=proc.slots if replicas > 1 else 1,
                    state=state,
                    in_flight=in_flight,
                    last_used=used,
                    idle_since=max(used, proc.ready_at or 0.0),
                    pinned=self._table.pinned(proc) and not proc.replica,
                    bytes=memory.held(proc) if memory is not None else 0,
                    ttl=proc.ttl,
                    failed_at=proc.state_changed_at if proc.state == State.FAILED else None,
                    listed=self._table.listed(proc),
                    load_generation=starts,
                    draining=proc in self.drains,
                    device_drain=self.placing is not None and proc in self.placing.device_drains,
                    ready_at=proc.ready_at or 0.0,
                    reload_seconds=self.costs.reload_seconds(proc),
                    # A child unloaded or crashed while serving keeps its turn until its
                    # requests end: it may compute until its process is gone. A stopped
                    # model's are its last child's: what its load would compute with.
                    cpu_threads=(
                        self.cpu.threads(proc)
                        if in_flight or state in (State.READY, State.STARTING, State.STOPPED, State.FAILED) else 0
                    ),
                    loading_since=proc.state_changed_at if state == State.STARTING else 0.0,
                    stop_reason=proc.stop_reason,
                )
            )
        waiters = self._admission.waiters.views(self._table.aliases)
        return scheduler.Snapshot(
            now=now,
            models=views,
            waiters=waiters,
            models_max=self._config.limits.models_max,
            # Per-device budgets: the pool's bytes say nothing of which device has room;
            # placing.py counts each device's at every Start.
            budget=memory.budget if memory is not None and self.placing is None else None,
            failed_holdoff=self._config.limits.failed_holdoff,
            closing=self._closing(),
            drain_after=self._config.limits.drain_after,
            evict_cost=self._config.limits.evict_cost,
            cpu_budget=self.cpu.budget,
            cpu_load_wait=self._config.limits.cpu_load_wait,
        )

    def apply(self, actions: list[scheduler.Action]) -> None:
        by_id = self._admission.waiters.by_id()
        for action in actions:
            if isinstance(action, scheduler.Start | scheduler.Drain | scheduler.Undrain | scheduler.Evict):
                target = self._table.by_key(action.model)
                assert target is not None, action  # the plan names listed models only
                self._apply_to_model(action, target)
                continue
            waiter = by_id.get(action.waiter)
            if waiter is None:
                continue
            if isinstance(action, scheduler.Track):
                generation = action.generation
                if generation is None:  # the load the Start just before began
                    if self.placing is not None and waiter.model in self.placing.deferred:
                        continue  # placement put the start off: no load to wait for yet
                    started = self._table.models.get(waiter.model)
                    generation = self._starts.get(id(started), 0) if started is not None else 0
                waiter.saw_generation = generation
            elif waiter.fut.done():
                continue
            elif isinstance(action, scheduler.Grant):
                if self._watch is not None:
                    self._watch.waited(waiter.model, time.monotonic() - waiter.since)
                target = self._table.by_key(action.model)
                assert target is not None, action
                waiter.fut.set_result(self._admission.grant(target, choose=False))  # the plan's child
            elif isinstance(action, scheduler.Resolve):
                waiter.fut.set_result(None)
            else:
                waiter.fut.set_exception(refusal(
                    action, self._table.models.get(action.model), self._config, self._memory, self._admission.retry_after(),
                ))

    def _apply_to_model(
        self, action: scheduler.Start | scheduler.Drain | scheduler.Undrain | scheduler.Evict, proc: ModelProcess
    ) -> None:
        if isinstance(action, scheduler.Start):
            self.start_model(proc)
        elif isinstance(action, scheduler.Drain):
            self.drains.add(proc)
            log.info(
                "[%s] draining: a request has waited %gs (--drain-after) for a slot; new "
                "requests queue behind the swap, %d in flight finish first",
                proc.name, self._config.limits.drain_after or 0.0, self._admission.in_flight(proc),
            )
            if self._watch is not None:
                self._watch.drained(proc.name)
        elif isinstance(action, scheduler.Undrain):
            if proc in self.drains:
                self.drains.discard(proc)
                log.info("[%s] no longer draining: nothing waits for its slot any more", proc.name)
        else:
            if action.reason == StopReason.TTL:
                log.info("[%s] idle past its ttl (%gs): unloading", proc.name, proc.ttl or 0)
            elif action.reason == StopReason.DRAINED:
                log.info("[%s] drained: unloading it for the waiting requests", proc.name)
                self.counters.evictions += 1
            else:
                log.info("[%s] evicting the idle least recently used model", proc.name)
                self.counters.evictions += 1
            proc.stop(action.reason)

    def note_start(self, proc: ModelProcess) -> None:
        # Load numbers are unique across all processes: a reload's new process of the same
        # name never reuses the number a waiter saw on the old one.
        if proc.expected_state in (State.STOPPED, State.FAILED):
            self._starts[id(proc)] = next(self._generations)


def _loop_done(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("the scheduling loop died: %r", task.exception(), exc_info=task.exception())
