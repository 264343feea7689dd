"""Child lifecycle states and the only transitions allowed between them.

Standard library only: the table is the contract that process.py enforces and that
docs/design.md draws, so it must be importable and testable on its own.
"""

from __future__ import annotations

import enum


class State(enum.StrEnum):
    STOPPED = "stopped"  # no process; may be started
    STARTING = "starting"  # spawned, model loading, not yet answering /health with 200
    READY = "ready"  # serving requests
    STOPPING = "stopping"  # asked to exit (unload, eviction, TTL, reload, shutdown)
    BACKOFF = "backoff"  # exited unexpectedly; waiting before the next start attempt
    FAILED = "failed"  # crash loop exhausted; requests get a fast 503 until reset
    SHUTDOWN = "shutdown"  # router is exiting; terminal


TRANSITIONS: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING, State.SHUTDOWN}),
    # STARTING -> STOPPED is a clean exit during load we did not ask for and will not retry
    # (nobody wants the model any more); -> FAILED when the retry budget is spent.
    State.STARTING: frozenset(
        {State.READY, State.STOPPING, State.BACKOFF, State.FAILED, State.STOPPED}
    ),
    State.READY: frozenset({State.STOPPING, State.BACKOFF, State.FAILED, State.STOPPED}),
    State.STOPPING: frozenset({State.STOPPED, State.SHUTDOWN}),
    State.BACKOFF: frozenset({State.STARTING, State.STOPPING, State.STOPPED, State.FAILED}),
    # A failed model is started again only by an explicit request (load, autoload after the
    # failure hold-off, or reload); the transition is explicit so the API can show it.
    State.FAILED: frozenset({State.STARTING, State.STOPPED, State.SHUTDOWN}),
    State.SHUTDOWN: frozenset(),
}

# Running: a child is loading or serving, or a restart is under way. What an unload or a
# reload stops, and what "model is not running" refuses.
RUNNING_STATES = frozenset({State.STARTING, State.READY, State.BACKOFF})
# Counted against --models-max: upstream counts loading + loaded (+ sleeping) children.
SLOT_STATES = RUNNING_STATES | {State.STOPPING}
# A process may exist in these states; shutdown must wait for them.
LIVE_STATES = frozenset({State.STARTING, State.READY, State.STOPPING})
TERMINAL_STATES = frozenset({State.SHUTDOWN})


class StopReason(enum.StrEnum):
    """Why a model was asked to stop: shown as `stop_reason` in GET /models, counted in
    metrics, and deciding whether keep-cache saves its slots first."""

    EVICTED = "evicted"  # the idle least recently used model, for room
    DRAINED = "drained"  # gave way to requests past --drain-after
    TTL = "ttl"  # idle past its ttl
    UNLOADED = "unloaded"  # POST /models/unload
    RELOAD = "reload"  # its definition changed or vanished
    SHUTDOWN = "shutdown"  # the router is exiting


# An idle model stopped for these keeps its slot caches on disk (keep-cache); a reload or
# a shutdown does not (the definition changed, or there is no time).
SAVE_ON_STOP = frozenset({StopReason.EVICTED, StopReason.DRAINED, StopReason.TTL, StopReason.UNLOADED})


def api_status(state: State, was_ready: bool = True) -> str:
    """The upstream status word for a state (upstream knows only these words).

    STOPPING stays "loaded" because upstream keeps a model loaded until its process has
    exited, but only for a child that had become ready: a load being cancelled stays
    "loading" until it is gone. BACKOFF shows "loading" because a restart is under way.
    """
    if state == State.STOPPING and not was_ready:
        return "loading"
    return _API_STATUS[state]


_API_STATUS: dict[State, str] = {
    State.STOPPED: "unloaded",
    State.STARTING: "loading",
    State.READY: "loaded",
    State.STOPPING: "loaded",
    State.BACKOFF: "loading",
    State.FAILED: "unloaded",
    State.SHUTDOWN: "unloaded",
}


def check_transition(current: State, new: State) -> None:
    if new not in TRANSITIONS[current]:
        raise InvalidTransition(f"{current} -> {new} is not allowed")


class InvalidTransition(RuntimeError):
    pass
