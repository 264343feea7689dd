"""Health from live traffic: a child whose requests keep failing by its own doing.

`/health` is answered by llama-server's HTTP thread, so a child whose inference is broken
(every completion a 500) can pass every liveness probe; the canary only runs while the
model is idle. The requests themselves say more. Each request routed to a READY child
ends in one of three ways:

* the child's fault: a 5xx from the child (other than 501, a feature that is off, and
  503, llama-server's "no slot available" or "loading"), or no response head at all (the
  connection was refused, reset or closed, or nothing came within the proxy timeout);
* an answer: any other status, 4xx included (a bad request is the client's, and a child
  that parses and refuses it is working);
* neither: the client went away, or the router itself cut the request (an unload).

`--request-failures` child-fault endings in a row, all within `--request-failure-window`
seconds, mark the child sick; any answer in between starts the count again. A pure
counter (no I/O, no asyncio): the process decides what a sick child means.
"""

from __future__ import annotations

import collections

# Statuses from a child that are not its fault: 501 says a feature is off (the same answer
# to every such request), 503 that it is busy ("no slot available") or loading.
_NOT_CHILD_FAULT = frozenset({501, 503})


def status_fault(status: int) -> str | None:
    """Why a response with `status` counts against the child, or None when it does not."""
    if status >= 500 and status not in _NOT_CHILD_FAULT:
        return f"HTTP {status}"
    return None


class RequestHealth:
    """Consecutive child-fault request endings of one child's life."""

    __slots__ = ("_failures", "_last", "threshold", "window")

    def __init__(self, threshold: int, window: float) -> None:
        self.threshold = threshold  # 0 = off
        self.window = window
        self._failures: collections.deque[float] = collections.deque()
        self._last = ""

    @property
    def streak(self) -> int:
        return len(self._failures)

    def note(self, now: float, fault: str | None) -> str | None:
        """Count one request ending; `fault` is why it was the child's fault (None: the
        child answered). Returns the cause text once the threshold is reached."""
        if self.threshold <= 0:
            return None
        if fault is None:
            self._failures.clear()
            return None
        self._failures.append(now)
        self._last = fault
        while self._failures and now - self._failures[0] > self.window:
            self._failures.popleft()
        if len(self._failures) < self.threshold:
            return None
        count = len(self._failures)
        self._failures.clear()
        return (
            f"{count} requests in a row failed by the child's doing within "
            f"{self.window:g}s (last: {fault}); replaced"
        )
