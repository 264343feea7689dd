"""Placement applied: where a model the scheduler starts goes on a host with per-device
budgets, and what the arbiter does about it (placement.py decides, this acts).

With per-device budgets the scheduler counts slots only (the pool's bytes say nothing of
which device has room) and every `Start` comes here first:

- place/split: the placement is recorded (`MemoryManager.assign`) and the model starts
  with it, so its child is told its devices (`placement.child_launch`);
- evict: the idle models the decision names are stopped, on the devices the new model
  will use; it starts on a later pass, once they have stopped (their memory is then free);
- wait: it does not start now; a pass after a busy model there goes idle tries again.
  Once one of its requests has waited `--drain-after`, a busy model on the devices is
  drained for it (as the scheduler drains for a slot): new requests for that model queue,
  its requests in flight finish, then it leaves;
- refuse: the requests waiting for it get a 503 `BudgetExceeded` with the decision's
  reason, which names each device and its free memory.

Runs inside a scheduling pass: no await, and it changes models only by sending commands.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..errors import BudgetExceeded
from ..settings.config import RouterConfig
from .admission import Admission
from .memory import MemoryManager
from .models import ModelTable
from .placement import Decision, ModelToPlace, Placement, manual_from_options
from .process import ModelProcess
from .scheduler import Candidate
from .states import State, StopReason

log = logging.getLogger("llamarouter.supervisor")


@dataclass(frozen=True)
class Go:
    """What the arbiter does with a `Start`: start now (with `placement`), or not yet."""

    now: bool
    placement: Placement | None = None
    evicted: int = 0  # idle models stopped for its room (the arbiter counts evictions)


@dataclass
class Placing:
    config: RouterConfig
    memory: MemoryManager
    table: ModelTable
    admission: Admission
    # Models whose Start of this pass did not start them: their waiters keep no load number
    # (a start that never happened is no aborted load).
    deferred: set[str] = field(default_factory=set)
    # The arbiter's drains, and the ones made here: busy models giving way on a device to
    # a model waiting past --drain-after (victim -> the waiting model's name).
    drains: set[ModelProcess] = field(default_factory=set)
    device_drains: dict[ModelProcess, str] = field(default_factory=dict)
    # Told of each drain made here (metrics, the dashboard's timeline), as the arbiter's are.
    drained: Callable[[str], None] | None = None

    @staticmethod
    def of(
        config: RouterConfig, memory: MemoryManager | None, table: ModelTable, admission: Admission,
        drains: set[ModelProcess], drained: Callable[[str], None] | None = None,
    ) -> Placing | None:
        """A placing step when there are per-device budgets (several GPUs' budgets, or
        NVML's devices with --memory-budget auto); None: one pool, the scheduler's bytes."""
        if memory is None or not memory.devices:
            return None
        return Placing(config, memory, table, admission, drains=drains, drained=drained)

    def start(self, proc: ModelProcess) -> Go:
        """Decide where `proc` goes and act on it (see the module's docstring)."""
        decision = self._decide(proc)
        self._note(proc.key, decision)
        if decision.action in ("place", "split") and decision.placement is not None:
            self.deferred.discard(proc.name)
            self._undrain(lambda waiting: waiting == proc.name)
            self.memory.assign(proc.key, decision.placement)
            return Go(True, decision.placement)
        if proc.replica:
            # An extra replica is started only where there is room (nothing is evicted or
            # refused for it): the model serves on with the children it has.
            return Go(False)
        self.deferred.add(proc.name)
        if decision.action == "wait":
            self._drain_for(proc)
        if decision.action == "refuse":
            self._refuse(proc.name, decision.reason)
        return Go(False, evicted=self._evict(proc.key, decision) if decision.action == "evict" else 0)

    def tidy(self) -> None:
        """Call off the drains for models nobody waits for any more (their requests were
        served elsewhere or went away): the drained model takes requests again."""
        self._undrain(lambda waiting: not self.admission.waiters.wants(waiting))

    def _drain_for(self, proc: ModelProcess) -> None:
        """`proc` waits for busy models on the devices: past --drain-after, drain one."""
        bound = self.config.limits.drain_after
        if bound is None or proc.name in self.device_drains.values():
            return
        now = time.monotonic()
        since = min((w.since for w in self.admission.waiters if w.model == proc.name and not w.load), default=now)
        if now - since < bound:
            return
        victims = sorted(
            (
                p for p in self.table.all_processes()
                if p.expected_state == State.READY and p not in self.drains and self._devices_of(p)
                and not (self.table.pinned(p) and not p.replica) and p.name != proc.name
                and now - (p.ready_at or now) >= bound  # each model gets its turn first
            ),
            key=lambda p: (self.admission.in_flight(p), p.ready_at or 0.0, p.key),
        )
        if victims:
            victim = victims[0]
            self.drains.add(victim)
            self.device_drains[victim] = proc.name
            if self.drained is not None:
                self.drained(victim.name)
            log.info(
                "[%s] draining: a request for %s has waited %gs (--drain-after) for room on its "
                "devices; %d in flight finish first", victim.key, proc.name, bound, self.admission.in_flight(victim),
            )

    def _undrain(self, done: Callable[[str], bool]) -> None:
        for victim, waiting in list(self.device_drains.items()):
            if done(waiting):
                del self.device_drains[victim]
                if victim.expected_state == State.READY:
                    self.drains.discard(victim)

    def changed(self, proc: ModelProcess, new: State) -> None:
        """A model's transition: once its child is gone (stopped, failed) its devices are
        free of it; a start the owner made itself (after a stop, a restart) runs where
        its placement says. A model that a reload replaced leaves the placement of the one
        that took its name alone."""
        if not self.table.listed(proc) and self.table.by_key(proc.key) is not None:
            return
        if new != State.READY:
            self.device_drains.pop(proc, None)
        if new in (State.STOPPED, State.FAILED, State.SHUTDOWN):
            self.memory.unassign(proc.key)
        elif new == State.STARTING and proc.placement is not None:
            self.memory.assign(proc.key, proc.placement)

    # ------------------------------------------------------------------ deciding
    def _decide(self, proc: ModelProcess) -> Decision:
        try:
            manual = self._manual(proc)
        except ValueError as exc:
            return Decision("refuse", None, f"model {proc.name}: {exc}")
        procs = self.table.all_processes()
        # Models already stopping leave room behind them: decided as if gone (or every pass
        # until they have stopped would stop one more), started once they are gone.
        leaving = [p for p in procs if p.expected_state == State.STOPPING and p is not proc]
        staying = [p for p in procs if p not in leaving]
        decision = self.memory.plan(proc, staying, self._candidates(staying), manual)
        if decision.action not in ("place", "split") or decision.placement is None:
            return decision
        devices = set(decision.placement.devices)
        blocking = sorted({p.key for p in leaving if devices & set(self._devices_of(p))})
        if not blocking:
            return decision
        return replace(decision, action="wait", reason=f"{decision.reason}, once {', '.join(blocking)} "
                       f"{'has' if len(blocking) == 1 else 'have'} stopped")

    def _manual(self, proc: ModelProcess) -> ModelToPlace | None:
        opts = dict(proc.spec.options)
        opts.update(self.config.child_options)
        return manual_from_options(opts, proc.spec.devices)

    def _devices_of(self, proc: ModelProcess) -> tuple[int, ...]:
        placement = self.memory.placement_of(proc.key)
        return placement.devices if placement is not None else ()

    def _candidates(self, procs: list[ModelProcess]) -> dict[str, Candidate]:
        """Which models may be stopped for room: ready, nothing in flight, nothing queued
        for them, not pinned (the scheduler's eviction rule)."""
        out: dict[str, Candidate] = {}
        for p in procs:
            # By key: each replica of a model is placed (and may be evicted) on its own.
            out[p.key] = Candidate(
                name=p.key,
                last_used=self.admission.released_at(p) if p.replica else self.admission.usage.get(p.name).last_used,
                ready=p.expected_state == State.READY,
                busy=self.admission.in_flight(p) > 0,
                pinned=self.table.pinned(p) and not p.replica,
                wanted=self.admission.waiters.wants(p.name) and not p.replica,
                extra=p.replica > 0,
            )
        return out

    def _note(self, name: str, decision: Decision) -> None:
        # A model waiting for room is decided on every pass: say it once per change.
        if self.memory.decided(name, decision.action, decision.reason):
            level = logging.WARNING if decision.action == "refuse" else logging.INFO
            log.log(level, "[%s] placement: %s: %s", name, decision.action, decision.reason)

    # ------------------------------------------------------------------ acting
    def _evict(self, name: str, decision: Decision) -> int:
        stopped = 0
        for victim in decision.evict:
            for p in self.table.all_processes():
                if p.key == victim and p.expected_state == State.READY:
                    log.info("[%s] evicting the device's idle least recently used model for %s: %s",
                             victim, name, decision.reason)
                    p.stop(StopReason.EVICTED)
                    stopped += 1
        return stopped

    def _refuse(self, name: str, reason: str) -> None:
        for waiter in self.admission.waiters:
            if waiter.model == name and not waiter.fut.done():
                waiter.fut.set_exception(BudgetExceeded(reason))
