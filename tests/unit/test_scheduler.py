"""The pure scheduler: snapshots in, actions out. No asyncio, no processes, no sleeps."""

from __future__ import annotations

import pytest

from llamarouter.core.scheduler import (
    Drain,
    Evict,
    Grant,
    ModelView,
    Refuse,
    Resolve,
    Snapshot,
    Start,
    Track,
    Undrain,
    WaiterView,
    Why,
    next_wakeup,
    plan,
)
from llamarouter.core.states import State, StopReason

R, S, T, X, B, F = State.READY, State.STOPPED, State.STARTING, State.STOPPING, State.BACKOFF, State.FAILED


def m(name: str, state: State = S, **kw: object) -> ModelView:
    return ModelView(name=name, state=state, **kw)  # type: ignore[arg-type]


def w(i: int, model: str, **kw: object) -> WaiterView:
    return WaiterView(id=i, model=model, **kw)  # type: ignore[arg-type]


def snap(models: list[ModelView], waiters: list[WaiterView] = (), **kw: object) -> Snapshot:  # type: ignore[assignment]
    return Snapshot(now=kw.pop("now", 100.0), models=models, waiters=list(waiters), **kw)  # type: ignore[arg-type]


def kinds(actions: list[object], kind: type) -> list[object]:
    return [a for a in actions if isinstance(a, kind)]


def test_free_slot_starts_at_once_and_the_waiter_tracks_the_load() -> None:
    acts = plan(snap([m("a"), m("b")], [w(1, "a")], models_max=2))
    assert acts == [Start("a"), Track(1, None)]


def test_every_waiter_of_a_load_started_now_tracks_that_load() -> None:
    # The second waiter must not track the model's previous load number (0: never started),
    # or a later stop of an unrelated load would look like its own load being aborted.
    acts = plan(snap([m("a", load_generation=0)], [w(1, "a"), w(2, "a")], models_max=1))
    assert acts == [Start("a"), Track(1, None), Track(2, None)]


def test_ready_model_is_granted() -> None:
    assert plan(snap([m("a", R)], [w(1, "a")], models_max=1)) == [Grant(1, "a")]


def test_requests_for_one_model_share_one_load() -> None:
    acts = plan(snap([m("a")], [w(1, "a"), w(2, "a"), w(3, "a")], models_max=1))
    assert kinds(acts, Start) == [Start("a")]


def test_full_slots_evict_least_recently_used_idle_model() -> None:
    models = [m("a", R, last_used=5.0), m("b", R, last_used=1.0), m("c")]
    acts = plan(snap(models, [w(1, "c")], models_max=2))
    assert acts == [Evict("b", "evicted")]  # c waits for b's slot


def test_stopping_model_counts_until_it_has_exited() -> None:
    models = [m("a", R), m("b", X), m("c")]
    assert plan(snap(models, [w(1, "c")], models_max=2)) == []


def test_busy_pinned_and_wanted_models_are_never_evicted() -> None:
    models = [
        m("a", R, in_flight=1, last_used=0.0),  # oldest but busy
        m("b", R, pinned=True),
        m("c", R, last_used=9.0),
        m("d"),
        m("e", R, last_used=1.0),  # wanted by a queued request
    ]
    acts = plan(snap(models, [w(1, "e"), w(2, "d")], models_max=4))
    assert kinds(acts, Evict) == [Evict("c", "evicted")]
    assert Grant(1, "e") in acts


def test_fifo_head_is_not_overtaken() -> None:
    # b needs more bytes than are free; c would fit, but must not jump ahead of b.
    models = [m("a", R, bytes=600, last_used=1.0), m("b", bytes=600), m("c", bytes=100)]
    acts = plan(snap(models, [w(1, "b"), w(2, "c")], budget=1000))
    assert kinds(acts, Start) == []
    assert kinds(acts, Evict) == [Evict("a", "evicted")]


def test_memory_budget_evicts_until_the_bytes_fit() -> None:
    models = [
        m("a", R, bytes=300, last_used=1.0),
        m("b", R, bytes=300, last_used=2.0),
        m("c", R, bytes=300, last_used=3.0),
        m("big", bytes=700),
    ]
    acts = plan(snap(models, [w(1, "big")], budget=1000))
    # 900 used + 700 needed - 1000 = 600 to free: a and b (LRU), not c.
    assert kinds(acts, Evict) == [Evict("a", "evicted"), Evict("b", "evicted")]


def test_model_larger_than_the_budget_is_refused_without_evicting() -> None:
    models = [m("a", R, bytes=400, pinned=True), m("huge", bytes=700)]
    acts = plan(snap(models, [w(1, "huge")], budget=1000))
    assert acts == [Refuse(1, "huge", Why.BUDGET, detail=400)]


def test_removed_model_refuses_its_waiters() -> None:
    acts = plan(snap([m("a")], [w(1, "gone")], models_max=1))
    assert acts == [Refuse(1, "gone", Why.REMOVED)]


def test_deadline_refuses_a_waiter_that_is_not_granted() -> None:
    models = [m("a", R, in_flight=1), m("b")]
    acts = plan(snap(models, [w(1, "b", deadline=50.0)], models_max=1))
    assert acts == [Refuse(1, "b", Why.DEADLINE)]


def test_failed_model_refused_during_holdoff_then_retried() -> None:
    models = [m("a", F, failed_at=90.0)]
    acts = plan(snap(models, [w(1, "a")], models_max=1, failed_holdoff=30.0))
    assert acts == [Refuse(1, "a", Why.FAILED, retry_after=20.0)]
    acts = plan(snap(models, [w(1, "a")], models_max=1, failed_holdoff=5.0))
    assert kinds(acts, Start) == [Start("a")]


def test_autoload_off_refuses_a_model_that_is_not_running() -> None:
    acts = plan(snap([m("a")], [w(1, "a", autoload=False)], models_max=1))
    assert acts == [Refuse(1, "a", Why.NOT_LOADED)]


def test_a_load_stopped_on_purpose_aborts_its_waiters() -> None:
    # The waiter saw load 3 of a; a was unloaded meanwhile: refused, not restarted.
    models = [m("a", X, load_generation=3)]
    acts = plan(snap(models, [w(1, "a", saw_generation=3)], models_max=1))
    assert acts == [Refuse(1, "a", Why.ABORTED)]
    # A waiter from before a newer load starts it again.
    acts = plan(snap([m("a", S, load_generation=4)], [w(1, "a", saw_generation=3)], models_max=1))
    assert kinds(acts, Start) == [Start("a")]


def test_load_endpoint_rules() -> None:
    # Running: refused. Free slot: started and resolved.
    assert plan(snap([m("a", T)], [w(1, "a", load=True)], models_max=1)) == [
        Refuse(1, "a", Why.RUNNING)
    ]
    assert plan(snap([m("a")], [w(1, "a", load=True)], models_max=1)) == [Start("a"), Resolve(1, "a")]
    # Full and every other model busy: nothing can make room.
    models = [m("a", R, in_flight=1), m("b")]
    assert plan(snap(models, [w(1, "b", load=True)], models_max=1)) == [Refuse(1, "b", Why.NO_ROOM)]
    # Full with an idle model: it is evicted and the load waits for its slot.
    models = [m("a", R), m("b")]
    assert plan(snap(models, [w(1, "b", load=True)], models_max=1)) == [Evict("a", "evicted")]


def test_pinned_model_is_kept_loaded() -> None:
    models = [m("p", S, pinned=True), m("a", R, last_used=1.0)]
    acts = plan(snap(models, [], models_max=1))
    assert acts == [Evict("a", "evicted")]  # room for p, which starts once a is gone
    assert plan(snap([m("p", S, pinned=True)], [], models_max=1)) == [Start("p")]


def test_ttl_unloads_idle_models_only() -> None:
    models = [
        m("idle", R, ttl=10.0, idle_since=80.0),
        m("busy", R, ttl=10.0, idle_since=0.0, in_flight=1),
        m("fresh", R, ttl=10.0, idle_since=95.0),
        m("pinned", R, ttl=10.0, idle_since=0.0, pinned=True),
    ]
    assert plan(snap(models, [], models_max=0)) == [Evict("idle", "ttl")]


def test_unlisted_models_hold_their_slot_but_are_not_routable() -> None:
    models = [m("a", X, listed=False), m("a", S)]
    assert plan(snap(models, [w(1, "a")], models_max=1)) == []  # waits for the old a to exit


def test_closing_refuses_everything() -> None:
    acts = plan(snap([m("a", R)], [w(1, "a"), w(2, "b")], closing=True))
    assert acts == [Refuse(1, "a", Why.SHUTDOWN), Refuse(2, "b", Why.SHUTDOWN)]


def test_slots_never_exceeded_by_one_plan() -> None:
    models = [m(n) for n in "abcdef"]
    acts = plan(snap(models, [w(i, n) for i, n in enumerate("abcdef")], models_max=2))
    assert len(kinds(acts, Start)) == 2


def test_next_wakeup_is_the_earliest_deadline_ttl_or_holdoff() -> None:
    models = [m("a", R, ttl=10.0, idle_since=95.0), m("f", F, failed_at=90.0)]
    s = snap(models, [w(1, "f", deadline=120.0)], failed_holdoff=30.0)
    assert next_wakeup(s) == 105.0
    assert next_wakeup(snap([m("a", R)], [])) is None


# ----------------------------------------------------------------------------- contention
# The drain bound, grouping by model and cost-aware victims (Snapshot.drain_after, evict_cost).

def test_a_busy_model_keeps_its_slot_until_a_request_has_waited_the_bound() -> None:
    models = [m("a", R, in_flight=2), m("b")]
    acts = plan(snap(models, [w(1, "b", since=99.8)], models_max=1, drain_after=0.5))
    assert acts == []


def test_a_request_past_the_bound_drains_the_model_that_must_give_way() -> None:
    models = [m("a", R, in_flight=2), m("b")]
    acts = plan(snap(models, [w(1, "b", since=99.4)], models_max=1, drain_after=0.5))
    assert acts == [Drain("a")]


def test_without_a_bound_a_busy_model_is_never_drained() -> None:
    models = [m("a", R, in_flight=2), m("b")]
    assert plan(snap(models, [w(1, "b", since=0.0)], models_max=1)) == []


def test_a_drained_model_leaves_once_its_last_request_ends() -> None:
    models = [m("a", R, draining=True), m("b")]
    acts = plan(snap(models, [w(1, "b", since=99.0)], models_max=1, drain_after=0.5))
    assert acts == [Evict("a", "drained")]


def test_a_drained_model_is_not_drained_twice_nor_another_one_with_it() -> None:
    models = [m("a", R, in_flight=1, draining=True), m("c", R, in_flight=1), m("b")]
    acts = plan(snap(models, [w(1, "b", since=90.0)], models_max=2, drain_after=0.5))
    assert acts == []


def test_requests_for_a_draining_model_queue_behind_the_swap() -> None:
    models = [m("a", R, in_flight=1, draining=True), m("b")]
    acts = plan(snap(models, [w(1, "b", since=90.0), w(2, "a", since=99.9)], models_max=1, drain_after=0.5))
    assert kinds(acts, Grant) == []
    # ...and they still count: a drained model whose requests wait is evicted all the same.
    models = [m("a", R, draining=True), m("b")]
    acts = plan(snap(models, [w(1, "b", since=90.0), w(2, "a", since=99.9)], models_max=1, drain_after=0.5))
    assert acts == [Evict("a", "drained")]


def test_a_drained_model_comes_back_after_the_waiting_model_in_order() -> None:
    # b waited longest and gets the freed slot; a's requests (queued behind its drain) wait.
    models = [m("a", S), m("b")]
    acts = plan(snap(models, [w(1, "b", since=90.0), w(2, "a", since=99.9)], models_max=1, drain_after=0.5))
    assert acts == [Start("b"), Track(1, None)]


def test_a_requests_deadline_still_applies_behind_a_drain() -> None:
    models = [m("a", R, in_flight=1, draining=True), m("b")]
    acts = plan(snap(models, [w(1, "a", deadline=99.0, since=98.0), w(2, "b", since=90.0)],
                     models_max=1, drain_after=0.5))
    assert acts == [Refuse(1, "a", Why.DEADLINE)]


def test_the_victim_is_the_one_that_frees_its_slot_soonest_then_the_longest_held() -> None:
    models = [m("a", R, in_flight=3, ready_at=1.0), m("b", R, in_flight=1, ready_at=50.0),
              m("c", R, in_flight=1, ready_at=10.0), m("d")]
    acts = plan(snap(models, [w(1, "d", since=90.0)], models_max=3, drain_after=0.5))
    assert acts == [Drain("c")]


def test_as_many_drains_as_models_past_the_bound_need() -> None:
    models = [m("a", R, in_flight=1, ready_at=1.0), m("b", R, in_flight=1, ready_at=2.0), m("c"), m("d")]
    waiters = [w(1, "c", since=90.0), w(2, "d", since=99.9)]  # only c is past the bound
    assert plan(snap(models, waiters, models_max=2, drain_after=0.5)) == [Drain("a")]
    waiters = [w(1, "c", since=90.0), w(2, "d", since=91.0)]
    assert plan(snap(models, waiters, models_max=2, drain_after=0.5)) == [Drain("a"), Drain("b")]


def test_pinned_models_are_never_drained() -> None:
    models = [m("a", R, in_flight=1, pinned=True), m("b")]
    assert plan(snap(models, [w(1, "b", since=0.0)], models_max=1, drain_after=0.5)) == []


def test_an_idle_model_is_evicted_at_once_without_waiting_for_the_bound() -> None:
    models = [m("a", R, last_used=5.0), m("b")]
    acts = plan(snap(models, [w(1, "b", since=99.99)], models_max=1, drain_after=0.5))
    assert acts == [Evict("a", "evicted")]


def test_with_a_bound_the_model_with_most_waiting_requests_loads_first() -> None:
    models = [m("a"), m("b"), m("c")]
    waiters = [w(1, "a", since=99.8), w(2, "b", since=99.85), w(3, "b", since=99.9), w(4, "c", since=99.9)]
    acts = plan(snap(models, waiters, models_max=1, drain_after=0.5))
    assert acts == [Start("b"), Track(2, None), Track(3, None)]


def test_a_request_past_the_bound_loads_before_larger_groups() -> None:
    models = [m("a"), m("b")]
    waiters = [w(1, "a", since=99.0), w(2, "b", since=99.85), w(3, "b", since=99.9)]
    acts = plan(snap(models, waiters, models_max=1, drain_after=0.5))
    assert acts == [Start("a"), Track(1, None)]


def test_without_a_bound_waiting_models_start_in_order_of_arrival() -> None:
    models = [m("a"), m("b")]
    waiters = [w(1, "a", since=99.8), w(2, "b", since=99.85), w(3, "b", since=99.9)]
    assert plan(snap(models, waiters, models_max=1)) == [Start("a"), Track(1, None)]


def test_evict_cost_keeps_a_slow_loading_model_over_a_fast_one() -> None:
    models = [m("big", R, last_used=10.0, reload_seconds=60.0), m("small", R, last_used=20.0, reload_seconds=2.0),
              m("c")]
    assert plan(snap(models, [w(1, "c")], models_max=2)) == [Evict("big", "evicted")]
    assert plan(snap(models, [w(1, "c")], models_max=2, evict_cost=1.0)) == [Evict("small", "evicted")]


def test_evict_cost_weighs_drain_victims_too() -> None:
    models = [m("big", R, in_flight=1, ready_at=10.0, reload_seconds=60.0),
              m("small", R, in_flight=1, ready_at=20.0, reload_seconds=2.0), m("c")]
    assert plan(snap(models, [w(1, "c", since=0.0)], models_max=2, drain_after=0.5)) == [Drain("big")]
    acts = plan(snap(models, [w(1, "c", since=0.0)], models_max=2, drain_after=0.5, evict_cost=1.0))
    assert acts == [Drain("small")]


def test_a_model_whose_requests_wait_for_their_cpu_turn_is_drained_once_it_computes() -> None:
    # b's request waits for a to compute: b has had no turn yet. It is the victim (nothing
    # in flight), and it is drained when its turn has begun, not before; a keeps its slot.
    kw = {"models_max": 2, "drain_after": 0.5, "cpu_budget": 1}
    models = [m("a", R, in_flight=1, ready_at=1.0, cpu_threads=1), m("b", R, ready_at=2.0, cpu_threads=1), m("c")]
    assert plan(snap(models, [w(1, "b", since=95.0), w(2, "c", since=90.0)], **kw)) == []
    computing = [m("a", R, in_flight=2, ready_at=1.0, cpu_threads=1),
                 m("b", R, in_flight=1, ready_at=2.0, cpu_threads=1), m("c")]
    assert plan(snap(computing, [w(2, "c", since=90.0)], **kw)) == [Drain("b")]
    # Two models past the bound need two slots: b gives way after its turn, a now.
    models = [*models, m("d")]
    waiters = [w(1, "b", since=95.0), w(2, "c", since=90.0), w(3, "d", since=91.0)]
    assert plan(snap(models, waiters, **kw)) == [Drain("a")]


@pytest.mark.parametrize("reason", [StopReason.DRAINED, StopReason.EVICTED])
def test_a_request_whose_load_the_scheduler_stopped_for_room_waits_for_the_next(reason: StopReason) -> None:
    models = [m("a", X, load_generation=3, stop_reason=reason)]
    assert plan(snap(models, [w(1, "a", saw_generation=3)], models_max=1, drain_after=0.5)) == []
    stopped = [m("a", S, load_generation=3, stop_reason=reason)]
    assert plan(snap(stopped, [w(1, "a", saw_generation=3)], models_max=1)) == [Start("a"), Track(1, None)]


def test_a_request_whose_load_was_unloaded_is_told_so() -> None:
    models = [m("a", X, load_generation=3, stop_reason=StopReason.UNLOADED)]
    assert plan(snap(models, [w(1, "a", saw_generation=3)], models_max=1)) == [Refuse(1, "a", Why.ABORTED)]


def test_next_wakeup_is_when_the_oldest_blocked_request_reaches_the_bound() -> None:
    models = [m("a", R, in_flight=1), m("b")]
    s = snap(models, [w(1, "b", since=99.8), w(2, "b", since=99.9)], models_max=1, drain_after=0.5)
    assert next_wakeup(s) == 99.8 + 0.5


def test_next_wakeup_never_returns_a_time_already_past() -> None:
    # A busy model past its TTL, a request past the bound with nothing to drain: waking
    # for either changes nothing until an event does; a past time would spin the loop.
    models = [m("a", R, in_flight=1, pinned=False, ttl=1.0, idle_since=10.0), m("b")]
    s = snap(models, [w(1, "b", since=0.0)], models_max=1, drain_after=0.5)
    assert next_wakeup(s) is None


def test_a_model_is_drained_only_after_a_turn_of_the_bound() -> None:
    # b loaded 0.2 s ago: its turn is not over, even though c has waited long.
    models = [m("b", R, in_flight=1, ready_at=99.8), m("c")]
    s = snap(models, [w(1, "c", since=90.0)], models_max=1, drain_after=0.5)
    assert plan(s) == []
    assert next_wakeup(s) == 99.8 + 0.5


def test_a_drain_ends_when_nothing_waits_for_room_any_more() -> None:
    # The request a drained to make room for went away (its client left): a keeps its slot,
    # and the requests that queued behind the drain are served by it at once, in order.
    models = [m("a", R, in_flight=1, draining=True), m("b")]
    acts = plan(snap(models, [w(2, "a", since=99.9), w(3, "a", since=99.95)], models_max=1, drain_after=0.5))
    assert acts == [Undrain("a"), Grant(2, "a"), Grant(3, "a")]
    # Idle and drained, with nobody waiting for room: not evicted either.
    acts = plan(snap([m("a", R, draining=True), m("b")], [], models_max=1, drain_after=0.5))
    assert acts == [Undrain("a")]


# --------------------------------------------------------------------------- replicas
def _replicated(first: State = R, second: State = S, **kw: object) -> list[ModelView]:
    """Model a with two children of one slot each (`replicas = 2`), and an idle model b."""
    common = dict(model="a", replicas=2, slots=1)
    return [
        m("a", first, **{**common, **kw}),  # type: ignore[arg-type]
        m("a#2", second, replica=1, ttl=60.0, **common),  # type: ignore[arg-type]
        m("b", R, last_used=1.0),
    ]


def test_a_replicated_model_takes_no_more_than_its_free_slots_and_the_rest_start_a_replica() -> None:
    acts = plan(snap(_replicated(), [w(1, "a"), w(2, "a")], models_max=4))
    assert kinds(acts, Grant) == [Grant(1, "a")]  # one slot: one grant
    assert kinds(acts, Start) == [Start("a#2")]  # the second waits, so a child starts for it


def test_no_replica_starts_while_nobody_waits_for_a_slot() -> None:
    assert plan(snap(_replicated(in_flight=1), [], models_max=4)) == []


def test_a_replica_takes_requests_while_the_first_child_restarts() -> None:
    acts = plan(snap(_replicated(first=State.BACKOFF, second=R), [w(1, "a")], models_max=4))
    assert acts == [Grant(1, "a#2")]  # named: nothing in the same plan (its TTL) stops it


def test_no_replica_is_started_by_evicting_another_model() -> None:
    # Three slots are full (a, b and a model c): the waiting request waits for a's slot.
    models = [*_replicated(in_flight=1), m("c", R)]
    acts = plan(snap(models, [w(1, "a")], models_max=3))
    assert kinds(acts, Start) == [] and kinds(acts, Evict) == []


def test_an_extra_replica_is_evicted_before_the_least_recently_used_model() -> None:
    models = [*_replicated(second=R, last_used=5.0), m("c", S)]
    models[1] = m("a#2", R, model="a", replica=1, replicas=2, slots=1, last_used=9.0)
    acts = plan(snap(models, [w(1, "c")], models_max=3))
    assert kinds(acts, Evict) == [Evict("a#2", StopReason.EVICTED)]


# CPU turns (Snapshot.cpu_budget, ModelView.cpu_threads): children computing on the same
# CPUs take turns so that their threads together stay within the budget.
def cpu(name: str, state: State = R, threads: int = 2, **kw: object) -> ModelView:
    return m(name, state, cpu_threads=threads, **kw)


def test_without_a_cpu_budget_every_ready_model_is_granted_at_once() -> None:
    acts = plan(snap([cpu("a", in_flight=1), cpu("b")], [w(1, "b")], models_max=2, cpu_budget=0))
    assert acts == [Grant(1, "b")]


def test_a_request_waits_while_another_child_computes_past_the_budget() -> None:
    acts = plan(snap([cpu("a", in_flight=1), cpu("b")], [w(1, "b")], models_max=2, cpu_budget=2))
    assert acts == []


def test_a_child_waiting_for_its_turn_is_not_evicted_for_a_load() -> None:
    # b is idle (nothing in flight) but its request waits for the turn: c's load takes
    # another slot's model, never b's.
    models = [cpu("a", in_flight=1, last_used=50.0), cpu("b", last_used=10.0), m("c")]
    acts = plan(snap(models, [w(1, "b"), w(2, "c")], models_max=2, cpu_budget=2))
    assert not kinds(acts, Evict) and not kinds(acts, Grant)


def test_children_whose_threads_fit_together_compute_at_once() -> None:
    acts = plan(snap([cpu("a", threads=1, in_flight=1), cpu("b", threads=1)], [w(1, "b")], models_max=2, cpu_budget=2))
    assert acts == [Grant(1, "b")]


def test_a_child_over_the_budget_alone_computes_when_nothing_else_does() -> None:
    acts = plan(snap([cpu("a", threads=8), cpu("b")], [w(1, "a")], models_max=2, cpu_budget=2))
    assert acts == [Grant(1, "a")]


def test_a_turn_serves_every_request_its_model_has_waiting() -> None:
    # Nothing computes: b's turn (its request is the oldest) takes all of b's, c waits.
    acts = plan(snap([cpu("b"), cpu("c")], [w(1, "b"), w(2, "c"), w(3, "b")], models_max=2, cpu_budget=2))
    assert acts == [Grant(1, "b"), Grant(3, "b")]


def test_the_computing_child_yields_to_a_request_that_waited_before_its_new_ones() -> None:
    # a computes; b waited first: a's later request waits too, so a's turn ends when its
    # requests in flight do and b's begins.
    acts = plan(snap([cpu("a", in_flight=1), cpu("b")], [w(1, "b"), w(2, "a")], models_max=2, cpu_budget=2))
    assert acts == []
    # Requests of a that came before b's are still a's turn.
    acts = plan(snap([cpu("a", in_flight=1), cpu("b")], [w(1, "a"), w(2, "b")], models_max=2, cpu_budget=2))
    assert acts == [Grant(1, "a")]


def test_a_loading_child_holds_other_requests_for_cpu_load_wait_at_most() -> None:
    models = [cpu("a"), cpu("b", T, loading_since=99.8)]
    held = snap(models, [w(1, "a")], models_max=2, cpu_budget=2, cpu_load_wait=0.5)
    assert plan(held) == []
    assert next_wakeup(held) == 100.3
    later = snap(models, [w(1, "a")], models_max=2, cpu_budget=2, cpu_load_wait=0.5, now=100.3)
    assert plan(later) == [Grant(1, "a")]


# A load computes too (llama-server's warm-up run): it waits for its CPU turn like a request.
def test_a_load_waits_for_its_cpu_turn_while_another_child_computes_its_slot_kept() -> None:
    models = [cpu("a", in_flight=1), cpu("b", S), cpu("c", S)]
    waiting = [w(1, "b", since=99.0), w(2, "c", since=99.5)]
    acts = plan(snap(models, waiting, models_max=3, cpu_budget=2))
    assert acts == []  # no Start for b, and c does not take the slot kept for b
    idle = [cpu("a"), cpu("b", S), cpu("c", S)]
    acts = plan(snap(idle, waiting, models_max=3, cpu_budget=2))
    assert acts == [Start("b"), Track(1, None)]  # a's requests ended: b loads, alone


def test_the_computing_childs_newer_requests_wait_behind_a_load_and_older_ones_do_not() -> None:
    models = [cpu("a", in_flight=1), cpu("b", S)]
    acts = plan(snap(models, [w(1, "b", since=99.0), w(2, "a", since=99.5)], models_max=2, cpu_budget=2))
    assert acts == []  # a's turn ends when its requests in flight do, then b loads
    acts = plan(snap(models, [w(1, "a", since=98.0), w(2, "b", since=99.0)], models_max=2, cpu_budget=2))
    assert acts == [Grant(1, "a")]


@pytest.mark.parametrize("first", ["a", "b"])
def test_in_one_pass_the_oldest_request_decides_between_a_turn_and_a_load(first: str) -> None:
    # a is ready with a request waiting for its turn, b must load: neither computes yet.
    models = [cpu("a"), cpu("b", S)]
    older, newer = (w(1, "a", since=98.0), w(2, "b", since=99.0))
    if first == "b":
        older, newer = (w(1, "b", since=98.0), w(2, "a", since=99.0))
    acts = plan(snap(models, [older, newer], models_max=2, cpu_budget=2))
    if first == "a":
        assert acts == [Grant(1, "a")]  # a computes; b's load waits for a's turn to end
    else:
        assert acts == [Start("b"), Track(1, None)]  # b loads; a waits for the load


def test_loads_whose_threads_fit_beside_the_computing_child_or_that_are_not_on_the_cpu_start_at_once() -> None:
    fits = plan(snap([cpu("a", threads=1, in_flight=1), cpu("b", S, threads=1)], [w(1, "b")], models_max=2, cpu_budget=2))
    assert fits == [Start("b"), Track(1, None)]
    gpu = plan(snap([cpu("a", in_flight=1), m("b")], [w(1, "b")], models_max=2, cpu_budget=2))
    assert gpu == [Start("b"), Track(1, None)]


@pytest.mark.parametrize("state", [S, State.FAILED])  # a failed one past its hold-off loads again
def test_a_load_waits_for_another_load_for_cpu_load_wait_at_most(state: State) -> None:
    models = [cpu("a", T, loading_since=99.8), cpu("b", state, failed_at=0.0)]
    held = snap(models, [w(1, "b")], models_max=2, cpu_budget=2, cpu_load_wait=0.5)
    assert plan(held) == []
    assert next_wakeup(held) == 100.3
    later = snap(models, [w(1, "b")], models_max=2, cpu_budget=2, cpu_load_wait=0.5, now=100.3)
    assert plan(later) == [Start("b"), Track(1, None)]


def test_a_request_waiting_for_its_turn_is_refused_at_its_deadline() -> None:
    acts = plan(snap([cpu("a", in_flight=1), cpu("b")], [w(1, "b", deadline=99.0)], models_max=2, cpu_budget=2))
    assert acts == [Refuse(1, "b", Why.DEADLINE)]


def test_children_off_the_budget_are_not_held() -> None:
    # A GPU child (cpu_threads 0) computes whatever the CPU children do.
    acts = plan(snap([cpu("a", in_flight=1), m("g", R)], [w(1, "g")], models_max=2, cpu_budget=2))
    assert acts == [Grant(1, "g")]


def test_requests_behind_a_called_off_drain_wait_for_their_cpu_turn_too() -> None:
    # a was draining; nothing waits for a slot any more, so the drain is called off, but b
    # computes past the budget: a's request waits for its turn instead of computing beside b.
    models = [cpu("a", draining=True), cpu("b", in_flight=1)]
    acts = plan(snap(models, [w(1, "a")], models_max=2, cpu_budget=2))
    assert acts == [Undrain("a")]
    acts = plan(snap(models, [w(1, "a")], models_max=2, cpu_budget=0))
    assert acts == [Undrain("a"), Grant(1, "a")]


def test_a_retired_child_still_serving_computes_as_another_model() -> None:
    # A reload changed b: the old child (no longer listed) finishes its request while the
    # new one is ready. They are two processes with their own threads: the new child's
    # request waits for the old one's to end.
    models = [cpu("b", in_flight=1, listed=False), cpu("b")]
    assert plan(snap(models, [w(1, "b")], models_max=2, cpu_budget=2)) == []
    assert plan(snap([cpu("b", listed=False), cpu("b")], [w(1, "b")], models_max=2, cpu_budget=2)) == [Grant(1, "b")]
    # Two reloads while serving: two retired children, each its own threads.
    models = [cpu("b", threads=1, in_flight=1, listed=False), cpu("b", threads=1, in_flight=1, listed=False), cpu("b", threads=1)]
    assert plan(snap(models, [w(1, "b")], models_max=3, cpu_budget=2)) == []


@pytest.mark.parametrize("state", [State.STOPPING, State.BACKOFF, State.STOPPED])
def test_a_child_that_still_holds_requests_past_ready_holds_the_turn(state: State) -> None:
    # Unloaded or crashed while serving: its requests end as its connections close; until
    # they have, another child's request waits (the old child may still be computing).
    acts = plan(snap([cpu("a", state, in_flight=1), cpu("b")], [w(1, "b")], models_max=2, cpu_budget=2))
    assert acts == []
