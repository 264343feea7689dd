"""Whether a child sleeps: llama-server's own `--sleep-idle-seconds`.

A sleeping child has freed its weights and its context (server-context.cpp
`handle_sleeping_state` calls `destroy()`) but keeps its process, port and slot; the next
task wakes it by loading the model again. Two ways to know, both free of side effects:

* its output: it logs "server is entering sleeping state" and "... exiting sleeping state"
  (the words are stable upstream log text); the last such line since the child started
  tells the state without asking the child anything;
* its `GET /props`, which answers from a cache while sleeping and says `is_sleeping`
  (it never wakes the child, unlike `/slots` or a completion): ChildClient.sleeping.
"""

from __future__ import annotations

from collections.abc import Iterable, Reversible

_ENTER = "server is entering sleeping state"
_EXIT = "server is exiting sleeping state"
# process.py notes each spawn with this prefix: lines before it belong to an older child.
_SPAWN = "[llamarouter] starting:"


def sleep_transition(line: str) -> bool | None:
    """True when `line` says the child went to sleep, False when it woke, else None."""
    if _ENTER in line:
        return True
    if _EXIT in line:
        return False
    return None


def sleeping_from_log(lines: Reversible[str]) -> bool:
    """Whether the child whose output ends with `lines` sleeps now (newest line last).

    Reads backwards and stops at the first sleep line or at the current child's spawn note,
    so an awake child costs one pass over its kept lines at most.
    """
    for line in reversed(lines):
        found = sleep_transition(line)
        if found is not None:
            return found
        if line.startswith(_SPAWN):
            return False
    return False


def held_bytes(full: int, sleeping: bool, asleep: int = 0) -> int:
    """What a model holds of what the memory budget counts: a sleeping child has freed
    its weights, KV cache and compute buffers and keeps only `asleep` (a GPU device
    context, where one was measured); in full again once it wakes."""
    return asleep if sleeping else full


def sleep_lines(lines: Iterable[str]) -> list[bool]:
    """Every sleep transition in `lines`, oldest first (for tests and diagnostics)."""
    return [t for t in (sleep_transition(line) for line in lines) if t is not None]
