"""The child state machine (states.py) and the eviction planner (eviction.py)."""

from __future__ import annotations

import itertools

import pytest

from llamarouter.core.scheduler import Candidate, plan_evictions
from llamarouter.core.states import (
    LIVE_STATES,
    SLOT_STATES,
    TERMINAL_STATES,
    TRANSITIONS,
    InvalidTransition,
    State,
    api_status,
    check_transition,
)

# --------------------------------------------------------------------------- states


def reachable_from(start: State) -> set[State]:
    seen = {start}
    todo = [start]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_state_has_a_row() -> None:
    assert set(TRANSITIONS) == set(State)
    for targets in TRANSITIONS.values():
        assert targets <= set(State)


def test_every_state_is_reachable_from_stopped() -> None:
    assert reachable_from(State.STOPPED) == set(State)


def test_every_state_can_reach_shutdown() -> None:
    for state in State:
        assert State.SHUTDOWN in reachable_from(state), state


def test_every_non_terminal_state_can_get_back_to_stopped() -> None:
    for state in set(State) - TERMINAL_STATES:
        assert State.STOPPED in reachable_from(state), state


def test_nothing_leaves_shutdown() -> None:
    assert TRANSITIONS[State.SHUTDOWN] == frozenset()
    assert TERMINAL_STATES == {State.SHUTDOWN}
    for state in State:
        with pytest.raises(InvalidTransition):
            check_transition(State.SHUTDOWN, state)


def test_no_self_transitions() -> None:
    for state in State:
        assert state not in TRANSITIONS[state]


@pytest.mark.parametrize(
    ("current", "new"),
    [(a, b) for a, b in itertools.product(State, State) if b in TRANSITIONS[a]],
)
def test_check_transition_accepts_legal_moves(current: State, new: State) -> None:
    check_transition(current, new)


@pytest.mark.parametrize(
    ("current", "new"),
    [
        (State.STOPPED, State.READY),  # must load first
        (State.STOPPED, State.STOPPING),
        (State.STARTING, State.STARTING),
        (State.READY, State.STARTING),
        (State.STOPPING, State.READY),
        (State.STOPPING, State.STARTING),
        (State.FAILED, State.READY),
        (State.SHUTDOWN, State.STOPPED),
    ],
)
def test_check_transition_rejects_illegal_moves(current: State, new: State) -> None:
    with pytest.raises(InvalidTransition) as info:
        check_transition(current, new)
    assert str(current) in str(info.value) and str(new) in str(info.value)


def test_invalid_transition_count_matches_table() -> None:
    illegal = 0
    for a, b in itertools.product(State, State):
        try:
            check_transition(a, b)
        except InvalidTransition:
            illegal += 1
    legal = sum(len(t) for t in TRANSITIONS.values())
    assert legal + illegal == len(State) ** 2


@pytest.mark.parametrize(
    ("state", "word"),
    [
        (State.STOPPED, "unloaded"),
        (State.STARTING, "loading"),
        (State.READY, "loaded"),
        (State.STOPPING, "loaded"),  # upstream keeps it loaded until the process exits
        (State.BACKOFF, "loading"),  # a restart is under way
        (State.FAILED, "unloaded"),  # upstream: unloaded + failed:true
        (State.SHUTDOWN, "unloaded"),
    ],
)
def test_api_status(state: State, word: str) -> None:
    assert api_status(state) == word


def test_api_status_uses_only_upstream_words() -> None:
    assert {api_status(s) for s in State} <= {"unloaded", "loading", "loaded"}


def test_state_values_are_lowercase_names() -> None:
    for state in State:
        assert state.value == state.name.lower()
        assert str(state) == state.value


def test_state_groups() -> None:
    assert State.STOPPED not in SLOT_STATES and State.FAILED not in SLOT_STATES
    assert {State.STARTING, State.READY} <= SLOT_STATES
    assert LIVE_STATES <= SLOT_STATES
    assert not TERMINAL_STATES & SLOT_STATES


# --------------------------------------------------------------------------- eviction


def cand(
    name: str,
    last_used: float = 0.0,
    *,
    ready: bool = True,
    busy: bool = False,
    pinned: bool = False,
    wanted: bool = False,
) -> Candidate:
    return Candidate(name, last_used, ready, busy, pinned, wanted)


def test_least_recently_used_first() -> None:
    cands = [cand("a", 30), cand("b", 10), cand("c", 20)]
    assert plan_evictions(cands, 1) == ["b"]
    assert plan_evictions(cands, 2) == ["b", "c"]
    assert plan_evictions(cands, 3) == ["b", "c", "a"]


def test_never_used_models_go_first() -> None:
    assert plan_evictions([cand("used", 5.0), cand("never", 0.0)], 1) == ["never"]


def test_ties_broken_by_name() -> None:
    cands = [cand("zeta", 7), cand("alpha", 7), cand("mid", 7)]
    assert plan_evictions(cands, 3) == ["alpha", "mid", "zeta"]
    assert plan_evictions(list(reversed(cands)), 1) == ["alpha"]


@pytest.mark.parametrize(
    "blocked",
    [
        cand("x", 0, busy=True),
        cand("x", 0, pinned=True),
        cand("x", 0, wanted=True),
        cand("x", 0, ready=False),
    ],
    ids=["busy", "pinned", "wanted", "not-ready"],
)
def test_ineligible_models_are_skipped(blocked: Candidate) -> None:
    # `blocked` is the least recently used, yet never picked
    other = cand("y", 100)
    assert plan_evictions([blocked, other], 1) == ["y"]
    assert plan_evictions([blocked], 1) == []


def test_count_zero_or_negative_gives_nothing() -> None:
    cands = [cand("a", 1), cand("b", 2)]
    assert plan_evictions(cands, 0) == []
    assert plan_evictions(cands, -3) == []


def test_count_larger_than_eligible_gives_all_eligible() -> None:
    cands = [
        cand("a", 3),
        cand("busy", 1, busy=True),
        cand("b", 2),
        cand("pinned", 0, pinned=True),
    ]
    assert plan_evictions(cands, 10) == ["b", "a"]


def test_empty_candidates() -> None:
    assert plan_evictions([], 2) == []


def test_accepts_any_iterable() -> None:
    assert plan_evictions((c for c in [cand("a", 2), cand("b", 1)]), 1) == ["b"]
