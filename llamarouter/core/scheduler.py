"""The scheduler: a pure function from a snapshot to actions. No I/O, no asyncio, no logging.

Rules follow upstream's router (server-models.cpp): requests for a model that is not
running wait in one FIFO queue; requests for the same model share one load; a load takes a
free `--models-max` slot or evicts the least recently used idle model; a busy model is never
evicted. On top: a memory budget counted in bytes, pinned models kept loaded, idle TTL,
deadlines, and a fast refusal for a failed model during its hold-off.

Under contention (`drain_after` set, the default), three rules of our own, none of which a
client can tell from upstream's except by waiting less:

- a bound on waiting: once a request has waited `drain_after` seconds for a slot, the
  model that must give way is *drained*: new requests for it queue behind the swap, its
  in-flight requests finish, then it is evicted. Only a model that has been loaded for
  `drain_after` (its turn) is drained; the victim is the one that frees its slot soonest
  (fewest requests in flight), then the one that has held its slot longest;
- swap less, serve more: among models waiting for a slot, one with a request past the
  bound goes first (oldest first); otherwise the one with the most waiting requests, so
  one load serves as many as possible (AABB instead of ABAB);
- a model that goes idle while others wait for room is evicted at that instant (the
  supervisor runs a pass when a release leaves a model idle), as upstream does.

With `evict_cost` > 0 an idle model's reload cost (measured load seconds, or its size
before it has loaded once) counts as that many seconds of recency per second of reload.

With `cpu_budget` > 0, children that compute on the host's CPUs (`cpu_threads` > 0) take
turns: a request to one is granted while the threads of the children computing now (with
requests in flight, or loading: for the first `cpu_load_wait` seconds of a load) and its
own fit the budget, or nothing else computes. A load takes its turn the same way, by its
oldest request: until then it is not started, its slot kept for it. Once a model has
to wait for its turn, every request that came after it waits too, the computing model's
new requests included, so the turn passes when its requests in flight end; a turn serves
every request its model has waiting (grouped, as loads are).

The supervisor builds a `Snapshot`, calls `plan()`, and applies the actions in order with
no await in between (llama-swap's pure scheduler behind an effects seam).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from .states import SLOT_STATES, State, StopReason


class Why(enum.StrEnum):
    """Why a waiter is refused; the supervisor turns each into the client's error."""

    REMOVED = "removed"  # the model left the configuration (reload)
    FAILED = "failed"  # FAILED and still inside its hold-off
    BUDGET = "budget"  # cannot fit the memory budget even with every evictable model gone
    NOT_LOADED = "not_loaded"  # autoload off and the model is not running
    RUNNING = "running"  # POST /models/load of a model that is already running
    NO_ROOM = "no_room"  # POST /models/load and nothing can be evicted for it
    DEADLINE = "deadline"  # waited longer than --max-wait
    ABORTED = "aborted"  # the load it waited for was stopped (unload, reload)
    SHUTDOWN = "shutdown"


@dataclass(frozen=True)
class ModelView:
    name: str  # unique: a model's name, or for its extra replicas "name#2", "name#3"...
    state: State  # the expected state (commands already sent count as done)
    in_flight: int = 0
    last_used: float = 0.0  # monotonic; 0 = never used
    idle_since: float = 0.0  # last use or ready time, for TTL
    pinned: bool = False
    bytes: int = 0  # what it holds (or would hold) of the memory budget
    ttl: float | None = None
    failed_at: float | None = None  # when it became FAILED
    listed: bool = True  # False: replaced or removed by a reload, still stopping
    load_generation: int = 0  # a new number on every start: tells a waiter its load was aborted
    draining: bool = False  # giving way: new requests queue, evicted once idle
    ready_at: float = 0.0  # monotonic: when its current life became READY (its turn so far)
    reload_seconds: float = 0.0  # what loading it again costs (measured, or from its size)
    model: str = ""  # the model requests name ("" = `name`): its replicas share it
    replica: int = 0  # 0: the model's first child, whose view requests are planned on
    replicas: int = 1  # children the model may run (preset key `replicas`)
    slots: int = 1  # the child's parallel slots: all busy on every ready child -> one more
    device_drain: bool = False  # drained for room on a device (placing.py calls it off)
    cpu_threads: int = 0  # the host CPU threads its child computes with; 0 = not on the CPU budget
    loading_since: float = 0.0  # monotonic: when its current load began (STARTING)
    stop_reason: StopReason | None = None  # why its current life was asked to stop

    @property
    def model_name(self) -> str:
        return self.model or self.name


@dataclass(frozen=True)
class WaiterView:
    id: int
    model: str
    load: bool = False  # POST /models/load (resolved once started) vs a request (granted once READY)
    autoload: bool = True
    deadline: float | None = None
    # The load generation the waiter saw when the model was loading for it; a stop in
    # between means its load was aborted.
    saw_generation: int | None = None
    since: float = 0.0  # monotonic: when it joined the queue


@dataclass(frozen=True)
class Snapshot:
    now: float
    models: Sequence[ModelView]
    waiters: Sequence[WaiterView]  # FIFO order
    models_max: int = 0  # 0 = unlimited
    budget: int | None = None  # bytes; None = count models only
    failed_holdoff: float = 30.0
    closing: bool = False
    drain_after: float | None = None  # None: a busy model is never drained, FIFO across models
    evict_cost: float = 0.0  # seconds of recency per second of reload (0 = plain LRU)
    cpu_budget: int = 0  # CPU threads children may compute with at once; 0 = no turns
    cpu_load_wait: float = 0.0  # how long a loading child on the budget holds others' requests


@dataclass(frozen=True)
class Grant:
    waiter: int
    model: str


@dataclass(frozen=True)
class Resolve:
    """A POST /models/load waiter: its model was started."""

    waiter: int
    model: str


@dataclass(frozen=True)
class Refuse:
    waiter: int
    model: str
    why: Why
    retry_after: float | None = None
    detail: int = 0  # BUDGET: bytes held by pinned models


@dataclass(frozen=True)
class Start:
    model: str


@dataclass(frozen=True)
class Evict:
    model: str
    reason: StopReason  # EVICTED, TTL or DRAINED


@dataclass(frozen=True)
class Drain:
    """Stop granting `model`'s new requests (they queue behind the swap); it is evicted
    once its in-flight requests have finished."""

    model: str


@dataclass(frozen=True)
class Undrain:
    """The requests a drain was for are gone (served elsewhere, or their clients left):
    `model` keeps its slot and takes requests again."""

    model: str


@dataclass(frozen=True)
class Track:
    """Remember the load a waiter is waiting for: `generation`, or (None) the load that
    the Start just before this action begins."""

    waiter: int
    generation: int | None


Action = Grant | Resolve | Refuse | Start | Evict | Drain | Undrain | Track


@dataclass
class _Room:
    """Slots and bytes as the plan goes: starts take, nothing gives back until a stop ends."""

    @staticmethod
    def of(snap: Snapshot) -> _Room:
        holding = [m for m in snap.models if m.state in SLOT_STATES]
        return _Room(
            free_slots=None if snap.models_max <= 0 else snap.models_max - len(holding),
            free_bytes=None if snap.budget is None else snap.budget - sum(m.bytes for m in holding),
            stopping_slots=sum(1 for m in holding if m.state == State.STOPPING),
            stopping_bytes=sum(m.bytes for m in holding if m.state == State.STOPPING),
        )

    free_slots: int | None
    free_bytes: int | None
    stopping_slots: int = 0
    stopping_bytes: int = 0

    def fits(self, m: ModelView) -> bool:
        slot_ok = self.free_slots is None or self.free_slots > 0
        bytes_ok = self.free_bytes is None or m.bytes <= self.free_bytes
        return slot_ok and bytes_ok

    def take(self, m: ModelView) -> None:
        if self.free_slots is not None:
            self.free_slots -= 1
        if self.free_bytes is not None:
            self.free_bytes -= m.bytes


@dataclass
class _Plan:
    actions: list[Action] = field(default_factory=list)
    state: dict[str, State] = field(default_factory=dict)  # as the plan changes it
    wanted: set[str] = field(default_factory=set)
    # Slots/bytes the queue still needs after what fits now (for eviction).
    need_slots: int = 0
    need_bytes: int = 0
    # Models that could not start for lack of room, with their waiters (oldest first).
    blocked: dict[str, list[WaiterView]] = field(default_factory=dict)
    # Models whose load waits for its CPU turn: when their oldest request came.
    load_turns: dict[str, float] = field(default_factory=dict)
    # Once the first in line cannot start, later models do not jump ahead.
    start_blocked: bool = False


# Stops the scheduler makes for room or idleness: a waiter's load stopped for one of these
# was not aborted by anyone, it waits for the next load.
_FOR_ROOM = frozenset({StopReason.EVICTED, StopReason.DRAINED, StopReason.TTL})


def plan(snap: Snapshot) -> list[Action]:
    models = {m.name: m for m in snap.models if m.listed}
    p = _Plan(state={m.name: m.state for m in snap.models if m.listed})
    if snap.closing:
        return [Refuse(w.id, w.model, Why.SHUTDOWN) for w in snap.waiters]

    room = _Room.of(snap)
    pinned_bytes = sum(m.bytes for m in models.values() if m.pinned)

    def want_start(m: ModelView) -> bool:
        """Start `m` now if it fits; else record what it needs. True when started."""
        if not p.start_blocked and room.fits(m):
            room.take(m)
            p.actions.append(Start(m.name))
            p.state[m.name] = State.STARTING
            return True
        p.start_blocked = True
        p.need_slots += 1
        p.need_bytes += m.bytes
        return False

    # Pinned models are kept loaded: they go first, like waiters at the head of the queue.
    for pinned in models.values():
        if pinned.pinned and pinned.state == State.STOPPED:
            p.wanted.add(pinned.name)
            want_start(pinned)

    # Models with a child that takes requests now (a READY replica not giving way), and
    # for a model with replicas the slots free on them: it takes no more at once, the rest
    # wait here (and that is what starts another child) instead of in a busy child's queue.
    servable = {v.model_name for v in snap.models if v.listed and v.state == State.READY and not v.draining}
    slots = _Slots(snap)
    saturated: dict[str, int] = {}  # requests waiting for a slot of a replicated model
    # Requests for models that must be started, grouped by model in order of arrival.
    starts: dict[str, list[WaiterView]] = {}
    behind: list[WaiterView] = []  # requests for a draining model
    turns: dict[str, list[WaiterView]] = {}  # requests for a ready model on the CPU budget
    for w in snap.waiters:
        found = models.get(w.model)
        if found is None:
            p.actions.append(Refuse(w.id, w.model, Why.REMOVED))
            continue
        m = found
        state = p.state[m.name]
        child = slots.free_child(m) if m.replicas > 1 else None
        takes = m.name in servable and (m.replicas <= 1 or child is not None)
        if w.deadline is not None and snap.now >= w.deadline and not takes:
            p.actions.append(Refuse(w.id, w.model, Why.DEADLINE))
            continue
        if not w.load and m.replicas > 1 and m.name in servable:
            _grant_on_replica(p, w, m, child, slots, saturated)
            continue
        if w.load:
            _plan_load(snap, p, room, w, m, state, pinned_bytes, want_start)
            continue
        if _plan_request(snap, p, w, m, state, pinned_bytes, behind, turns):
            starts.setdefault(m.name, []).append(w)

    _plan_starts(snap, p, room, models, starts, turns, want_start)
    _plan_drained(p, models)
    undrained = {a.model for a in p.actions if isinstance(a, Undrain)}
    for w in behind:  # their model takes requests again: in arrival order, as before
        if w.model in undrained:
            _plan_request(snap, p, w, models[w.model], State.READY, pinned_bytes, [], turns, undrained=True)
    waiting_turn = _plan_cpu_turns(snap, p, models, turns)
    _plan_replicas(p, room, models, saturated)
    _plan_evictions(snap, p, room, models)
    _plan_drains(snap, p, room, models, waiting_turn)
    _plan_ttl(snap, p, models)
    return p.actions


def _plan_starts(
    snap: Snapshot, p: _Plan, room: _Room, models: dict[str, ModelView], starts: dict[str, list[WaiterView]],
    turns: dict[str, list[WaiterView]], want_start: Callable[[ModelView], bool],
) -> None:
    """Start the models requests wait for, in `_start_order`, while room allows; a load
    on the CPU budget that must wait for its turn keeps its slot (`_cpu_fits`)."""
    serving, loading = _computing(snap)
    computing = {**serving, **loading}
    for name in _start_order(snap, starts):
        m = models[name]
        # Ready models whose requests came before this load's are granted first (later).
        ahead = {(n, -1): models[n].cpu_threads for n, ws in turns.items() if ws[0].since < starts[name][0].since}
        if not p.start_blocked and room.fits(m) and not _cpu_fits(snap, m, {**computing, **ahead}):
            room.take(m)
            p.load_turns[name] = starts[name][0].since
            continue
        if want_start(m):
            p.actions.extend(Track(w.id, None) for w in starts[name])
            if m.cpu_threads > 0:
                computing[(name, -1)] = m.cpu_threads
        else:
            p.blocked[name] = starts[name]


def _plan_request(
    snap: Snapshot, p: _Plan, w: WaiterView, m: ModelView, state: State, pinned_bytes: int,
    behind: list[WaiterView], turns: dict[str, list[WaiterView]], undrained: bool = False,
) -> bool:
    """Answer a request for `m` now (grant, refuse, track a load under way, wait behind a
    swap or for its CPU turn); True when `m` must be started for it."""
    if state == State.READY:
        serves = undrained or not m.draining
        if serves and snap.cpu_budget > 0 and m.cpu_threads > 0:
            turns.setdefault(m.name, []).append(w)  # _plan_cpu_turns grants it, or not yet
            p.wanted.add(m.name)
        elif serves:
            p.actions.append(Grant(w.id, m.name))
            p.wanted.add(m.name)
        else:  # it waits behind the swap and is served when its model is back
            behind.append(w)
        return False
    if state in (State.STARTING, State.BACKOFF):
        if w.saw_generation is None:
            # A load this plan started has no number yet: the applier gives it one.
            started_now = m.state in (State.STOPPED, State.FAILED)
            p.actions.append(Track(w.id, None if started_now else m.load_generation))
        p.wanted.add(m.name)
        return False
    if w.saw_generation is not None and w.saw_generation == m.load_generation and state in (
        State.STOPPING, State.STOPPED,
    ) and m.stop_reason not in _FOR_ROOM:
        # The load this request waited for was stopped on purpose (unload, reload):
        # say so instead of starting it again behind the caller's back. A stop of the
        # scheduler's own (a drain while the request waited for its CPU turn) is not
        # that: the request waits for the swap back, like those queued behind the drain.
        p.actions.append(Refuse(w.id, w.model, Why.ABORTED))
        return False
    if state == State.FAILED:
        held = snap.now - (m.failed_at if m.failed_at is not None else snap.now)
        if held < snap.failed_holdoff:
            p.actions.append(
                Refuse(w.id, w.model, Why.FAILED, retry_after=snap.failed_holdoff - held)
            )
            return False
    if not w.autoload:
        p.actions.append(Refuse(w.id, w.model, Why.NOT_LOADED))
        return False
    if snap.budget is not None and m.bytes + _fixed(m, pinned_bytes) > snap.budget:
        p.actions.append(
            Refuse(w.id, w.model, Why.BUDGET, detail=_fixed(m, pinned_bytes))
        )
        return False
    p.wanted.add(m.name)
    return state != State.STOPPING  # a model stopping is started again by its stop's pass


def _plan_cpu_turns(
    snap: Snapshot, p: _Plan, models: dict[str, ModelView], turns: dict[str, list[WaiterView]],
) -> set[str]:
    """Grant the requests of ready models on the CPU budget whose turn it is: models in
    order of their oldest request; each whose threads fit beside those computing now (or
    that computes alone) gets every request it has waiting; after the first that does not
    fit, nothing more is granted, so a model waiting for its turn is not overtaken.
    Returns the models whose requests still wait for their turn."""
    if not turns:
        return set()
    serving, loading = _computing(snap)
    # A load this pass started computes from now, and one waiting for its turn is in the
    # line too, by its oldest request.
    loading.update({(n, -1): models[n].cpu_threads for n in _started(p) if models[n].cpu_threads > 0})
    first_load = min(p.load_turns.values(), default=float("inf"))
    granted: set[str] = set()
    for name, waiting in sorted(turns.items(), key=lambda kv: kv[1][0].since):  # oldest request first
        m, child = models[name], (name, -1)
        if waiting[0].since > first_load:
            break
        computing = {**serving, **loading}
        alone = computing.keys() <= {child}
        fits = alone or sum(computing.values()) + (0 if child in serving else m.cpu_threads) <= snap.cpu_budget
        if not fits:
            break
        p.actions.extend(Grant(w.id, name) for w in waiting)
        serving[child] = m.cpu_threads
        granted.add(name)
    for name, waiting in turns.items():  # waiting for their turn: --max-wait still holds
        if name not in granted:
            p.actions.extend(
                Refuse(w.id, w.model, Why.DEADLINE) for w in waiting if w.deadline is not None and snap.now >= w.deadline
            )
    return turns.keys() - granted


_Child = tuple[str, int]


def _computing(snap: Snapshot) -> tuple[dict[_Child, int], dict[_Child, int]]:
    """The children on the CPU budget computing now, child -> threads: (those with
    requests in flight, those loading: for the first `cpu_load_wait` seconds of a load).
    Keyed by child, not name: a retired child (a reload replaced it) that still serves
    computes beside its successor under the same name (-1: the listed child)."""
    keyed = [((v.name, -1 if v.listed else i), v) for i, v in enumerate(snap.models)]
    serving: dict[_Child, int] = {k: v.cpu_threads for k, v in keyed if v.in_flight > 0 and v.cpu_threads > 0}
    loading: dict[_Child, int] = {
        k: v.cpu_threads for k, v in keyed
        if v.state == State.STARTING and v.cpu_threads > 0 and snap.now - v.loading_since < snap.cpu_load_wait
    }
    return serving, loading


def _cpu_fits(snap: Snapshot, m: ModelView, computing: dict[_Child, int]) -> bool:
    """Whether `m` may load now beside the children computing on the CPU budget. A load
    computes too (llama-server's warm-up run): started beside a child that computes on
    the same cores, both spin at every barrier waiting for threads the other keeps off
    the CPU, and a load of 0.05 s took 0.5 s, holding the other's requests as long. So
    it waits for its turn like a request (turns pass in order of the oldest request:
    the computing models' newer requests wait behind it, and their requests in flight
    end), then loads alone."""
    if snap.cpu_budget <= 0 or m.cpu_threads <= 0 or not computing:
        return True
    return sum(computing.values()) + m.cpu_threads <= snap.cpu_budget


def _start_order(snap: Snapshot, starts: dict[str, list[WaiterView]]) -> list[str]:
    """Which waiting model gets a slot first. Without a drain bound: order of arrival
    (upstream's FIFO). With one: a model with a request past the bound first, oldest
    first; then the model with the most requests waiting, so one load serves most."""
    if snap.drain_after is None:
        return list(starts)
    bound = snap.drain_after

    def key(name: str) -> tuple[int, float, float]:
        oldest = starts[name][0].since
        if snap.now - oldest >= bound:
            return (0, oldest, 0.0)
        return (1, -float(len(starts[name])), oldest)

    return sorted(starts, key=key)


def _plan_drained(p: _Plan, models: dict[str, ModelView]) -> None:
    """A draining model whose last request has ended leaves now; requests that queued
    behind it are served when it is back. When nothing waits for room any more (the
    requests it gave way to were served or went away), it takes requests again."""
    for m in models.values():
        if not m.draining or p.state.get(m.name) != State.READY:
            continue
        if not p.blocked and not m.device_drain:
            p.actions.append(Undrain(m.name))
        elif m.in_flight == 0 and not m.pinned:
            p.actions.append(Evict(m.name, StopReason.DRAINED))
            p.state[m.name] = State.STOPPING


def _plan_drains(
    snap: Snapshot, p: _Plan, room: _Room, models: dict[str, ModelView], waiting_turn: set[str],
) -> None:
    """Drain as many busy models as the models waiting past the bound need."""
    if snap.drain_after is None or not p.blocked:
        return
    overdue = [
        name for name, ws in p.blocked.items() if snap.now - ws[0].since >= snap.drain_after
    ]
    if not overdue:
        return
    need_slots = len(overdue) if room.free_slots is not None else 0
    need_bytes = sum(models[n].bytes for n in overdue) if room.free_bytes is not None else 0
    # What is already on its way out counts: stopping, evicted or draining now.
    for m in snap.models:
        leaving = m.state == State.STOPPING or p.state.get(m.name) == State.STOPPING or (
            m.draining and p.state.get(m.name) == State.READY
        )
        if leaving:
            need_slots -= 1
            need_bytes -= m.bytes
    if room.free_slots is not None:
        need_slots -= max(room.free_slots, 0)
    if room.free_bytes is not None:
        need_bytes -= max(room.free_bytes, 0)
    if need_slots <= 0 and need_bytes <= 0:
        return
    victims = sorted(
        (
            m for m in models.values()
            if p.state.get(m.name) == State.READY and not m.draining and not m.pinned
            and m.name not in overdue
            # Each model gets a turn of at least the bound: one drained as soon as it was
            # loaded would serve only the requests that waited for it, and those arriving
            # during its turn would queue for another swap.
            and snap.now - m.ready_at >= snap.drain_after
        ),
        key=lambda m: (m.in_flight, m.ready_at + snap.evict_cost * m.reload_seconds, m.name),
    )
    for m in victims:
        if need_slots <= 0 and need_bytes <= 0:
            break
        need_slots -= 1
        need_bytes -= m.bytes
        if m.name in waiting_turn and m.in_flight == 0:
            # Its requests wait for their CPU turn: it computes next (turns pass in order)
            # and is drained then, when it has something in flight. Drained now, it left
            # unserved and came back for the same requests, again and again while another
            # model computed; passing it over drained a busier model in its place.
            continue
        p.actions.append(Drain(m.name))


def _fixed(m: ModelView, pinned_bytes: int) -> int:
    """Bytes held by pinned models other than `m` (they are never evicted)."""
    return pinned_bytes - (m.bytes if m.pinned else 0)


def _plan_load(
    snap: Snapshot,
    p: _Plan,
    room: _Room,
    w: WaiterView,
    m: ModelView,
    state: State,
    pinned_bytes: int,
    want_start: Callable[[ModelView], bool],
) -> None:
    if state in SLOT_STATES and m.name not in _started(p):
        p.actions.append(Refuse(w.id, w.model, Why.RUNNING))
        return
    if m.name in _started(p):
        p.actions.append(Resolve(w.id, m.name))
        return
    if snap.budget is not None and m.bytes + _fixed(m, pinned_bytes) > snap.budget:
        p.actions.append(Refuse(w.id, w.model, Why.BUDGET, detail=_fixed(m, pinned_bytes)))
        return
    if want_start(m):
        p.actions.append(Resolve(w.id, m.name))
        return
    # No room now: only worth waiting if something is stopping or can be evicted.
    evictable = any(_evictable(v, p) for v in snap.models if v.listed and v.name != m.name)
    if room.stopping_slots or room.stopping_bytes or evictable:
        p.wanted.add(m.name)
        return
    p.need_slots -= 1
    p.need_bytes -= m.bytes
    p.actions.append(Refuse(w.id, w.model, Why.NO_ROOM))


def _started(p: _Plan) -> set[str]:
    return {a.model for a in p.actions if isinstance(a, Start)}


def _evictable(m: ModelView, p: _Plan) -> bool:
    return (
        p.state.get(m.name) == State.READY
        and m.in_flight == 0
        and not m.pinned
        and m.name not in p.wanted
    )


def _plan_evictions(snap: Snapshot, p: _Plan, room: _Room, models: dict[str, ModelView]) -> None:
    if p.need_slots <= 0 and p.need_bytes <= 0:
        return
    # Drained models evicted in this pass free their room too.
    leaving = [
        m for m in models.values() if m.state != State.STOPPING and p.state.get(m.name) == State.STOPPING
    ]
    slot_deficit = 0
    if room.free_slots is not None:
        slot_deficit = p.need_slots - max(room.free_slots, 0) - room.stopping_slots - len(leaving)
    bytes_deficit = 0
    if room.free_bytes is not None:
        bytes_deficit = (
            p.need_bytes - max(room.free_bytes, 0) - room.stopping_bytes - sum(m.bytes for m in leaving)
        )
    candidates = [
        Candidate(
            name=m.name,
            last_used=m.last_used + snap.evict_cost * m.reload_seconds,
            ready=p.state.get(m.name) == State.READY,
            busy=m.in_flight > 0,
            pinned=m.pinned,
            wanted=m.name in p.wanted,
            bytes=m.bytes,
            extra=m.replica > 0,
        )
        for m in models.values()
    ]
    for name in plan_evictions(candidates, slot_deficit, max(bytes_deficit, 0)):
        p.actions.append(Evict(name, StopReason.EVICTED))
        p.state[name] = State.STOPPING


def _grant_on_replica(
    p: _Plan, w: WaiterView, m: ModelView, child: ModelView | None, slots: _Slots, saturated: dict[str, int],
) -> None:
    """On the child with a slot free, whatever state its first child is in: named in the
    grant, so nothing later in this plan stops it. With none free, the request waits."""
    p.wanted.add(m.name)
    if child is not None:
        p.actions.append(Grant(w.id, child.name))
        p.wanted.add(child.name)
        slots.take(child)
    else:
        saturated[m.name] = saturated.get(m.name, 0) + 1


class _Slots:
    """The ready children of each model with replicas and their requests as the plan
    grants more."""

    def __init__(self, snap: Snapshot) -> None:
        self._ready: dict[str, list[ModelView]] = {}
        self._busy: dict[str, int] = {}
        for v in snap.models:
            if v.listed and v.replicas > 1 and v.state == State.READY and not v.draining:
                self._ready.setdefault(v.model_name, []).append(v)
                self._busy[v.name] = v.in_flight

    def free_child(self, m: ModelView) -> ModelView | None:
        """The child a request for `m`'s model goes to: a slot free, the fewest requests
        in flight, then the most free slots."""
        ready = self._ready.get(m.model_name, [])
        best = min(ready, key=lambda v: (self._busy[v.name], self._busy[v.name] - v.slots, v.replica), default=None)
        return best if best is not None and self._busy[best.name] < best.slots else None

    def take(self, v: ModelView) -> None:
        self._busy[v.name] += 1


def _plan_replicas(p: _Plan, room: _Room, models: dict[str, ModelView], saturated: dict[str, int]) -> None:
    """One more child for a model whose requests wait for a slot of its ready children,
    when there is room now (nothing is evicted for it) and none of its children is
    loading already."""
    if p.need_slots or p.need_bytes:
        return  # requests wait for room: they come first
    groups: dict[str, list[ModelView]] = {}
    for m in models.values():
        if m.replicas > 1:
            groups.setdefault(m.model_name, []).append(m)
    for group in groups.values():
        states = [p.state[m.name] for m in group]
        ready = [m for m, state in zip(group, states, strict=True) if state == State.READY]
        if not ready or any(state in (State.STARTING, State.BACKOFF) for state in states):
            continue
        if not saturated.get(group[0].model_name):
            continue
        spare = next(
            (m for m, state in zip(group, states, strict=True) if m.replica and state == State.STOPPED), None,
        )
        if spare is not None and room.fits(spare):
            room.take(spare)
            p.actions.append(Start(spare.name))
            p.state[spare.name] = State.STARTING


def _plan_ttl(snap: Snapshot, p: _Plan, models: dict[str, ModelView]) -> None:
    for m in models.values():
        if (
            m.ttl is not None
            and not m.pinned
            and p.state.get(m.name) == State.READY
            and m.in_flight == 0
            and m.name not in p.wanted
            and snap.now - m.idle_since >= m.ttl
        ):
            p.actions.append(Evict(m.name, StopReason.TTL))
            p.state[m.name] = State.STOPPING


def next_wakeup(snap: Snapshot) -> float | None:
    """The earliest time a plan could change without any event: a deadline, a TTL expiry,
    a failed model's hold-off ending while requests wait for it, or a waiting request
    reaching the drain bound. Only times still to come: one already past changes nothing
    until an event does, and waking for it would spin."""
    times: list[float] = [w.deadline for w in snap.waiters if w.deadline is not None]
    waiting = {w.model for w in snap.waiters}
    states = {m.name: m.state for m in snap.models if m.listed}
    for m in snap.models:
        if m.ttl is not None and m.state == State.READY and not m.pinned:
            times.append(m.idle_since + m.ttl)
        if m.state == State.FAILED and m.failed_at is not None and m.name in waiting:
            times.append(m.failed_at + snap.failed_holdoff)
    if snap.drain_after is not None:
        blocked = [
            w.since + snap.drain_after
            for w in snap.waiters
            if not w.load and states.get(w.model) in (State.STOPPED, State.FAILED)
        ]
        times += blocked
        if blocked:  # a loaded model's turn ends: it may be drained for them then
            times += [
                m.ready_at + snap.drain_after for m in snap.models
                if m.listed and m.state == State.READY and not m.pinned and not m.draining
            ]
    if snap.cpu_budget > 0 and any(states.get(w.model) in (State.READY, State.STOPPED, State.FAILED) for w in snap.waiters):
        # A loading child holds requests for ready models on the budget, and loads that
        # wait for their turn, this long at most.
        times += [m.loading_since + snap.cpu_load_wait for m in snap.models if m.state == State.STARTING and m.cpu_threads > 0]
    times = [t for t in times if t > snap.now]
    return min(times) if times else None


@dataclass(frozen=True)
class Candidate:
    name: str
    last_used: float  # monotonic; 0 = never used
    ready: bool  # only a model that finished loading may be evicted (a loading one is wanted)
    busy: bool  # requests in flight: never evicted, upstream's rule too
    pinned: bool
    wanted: bool  # a queued or waiting request needs it
    bytes: int = 0  # what stopping it frees of the memory budget
    extra: bool = False  # an extra replica: goes before any model's only or first child


def plan_evictions(candidates: Iterable[Candidate], count: int, free_bytes: int = 0) -> list[str]:
    """Least recently used idle models (name breaks ties, for determinism) until at least
    `count` are chosen and they free at least `free_bytes`. When the idle models cannot free
    enough, all of them are returned: the rest comes from busy models once they go idle."""
    if count <= 0 and free_bytes <= 0:
        return []
    eligible = sorted(
        (c for c in candidates if c.ready and not c.busy and not c.pinned and not c.wanted),
        key=lambda c: (not c.extra, c.last_used, c.name),
    )
    chosen: list[str] = []
    freed = 0
    for c in eligible:
        if len(chosen) >= count and freed >= free_bytes:
            break
        chosen.append(c.name)
        freed += c.bytes
    return chosen
