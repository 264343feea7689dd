"""What an unasked exit of a model's child leads to: restart after a backoff, give up
(`failed`), or rest (`stopped`). Pure bookkeeping, owned by the model's owner task."""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

from ..settings.config import Limits, Timeouts
from .child import Exited
from .failure import classify
from .states import State

log = logging.getLogger("llamarouter.process")


@dataclass(frozen=True)
class Verdict:
    state: State  # BACKOFF (restart after `delay`), FAILED or STOPPED
    failure: str
    delay: float = 0.0


class Restarts:
    """The crash budget (`--restart-max` within `--restart-window`) and the backoff delay,
    doubling from `--backoff-initial` up to `--backoff-max`."""

    def __init__(self, limits: Limits, timeouts: Timeouts) -> None:
        self._limits = limits
        self._timeouts = timeouts
        self.crash_times: collections.deque[float] = collections.deque()
        self._delay = timeouts.backoff_initial

    def fresh_start(self, after_failed: bool) -> None:
        """An explicit start: the backoff starts over; after FAILED the budget does too."""
        self._delay = self._timeouts.backoff_initial
        if after_failed:
            self.crash_times.clear()

    def after_exit(self, name: str, ex: Exited, log_tail: list[str], wanted: bool, now: float) -> Verdict:
        """An exit we did not ask for: what the model does next, and why it failed."""
        limits = self._limits
        failure = ex.cause or "child exited"
        found = classify(log_tail) if not ex.loaded else None
        if found is not None and found.cause:
            # The child's own words ("invalid magic characters", "No such file") say why.
            failure = f"{failure}; cause: {found.cause}"
        if found is not None and found.permanent:
            # A file that cannot load at all is not retried as if it had crashed.
            log.error("[%s] the model cannot load: %s", name, failure)
            return Verdict(State.FAILED, failure)
        self.crash_times.append(now)
        while self.crash_times and now - self.crash_times[0] > limits.restart_window:
            self.crash_times.popleft()
        log.warning("[%s] %s", name, failure)
        if len(self.crash_times) >= limits.restart_max:
            log.error(
                "[%s] giving up after %d failures in %.0fs: %s",
                name, len(self.crash_times), limits.restart_window, failure,
            )
            return Verdict(State.FAILED, failure)
        # A model that was serving is replaced (users expect a loaded model to stay
        # loaded); one that failed while loading is retried only while wanted.
        if not (ex.loaded or wanted):
            return Verdict(State.STOPPED, failure)
        if ex.loaded:
            # It served for a while: a fresh crash budget for the backoff too.
            self._delay = self._timeouts.backoff_initial
        delay = self._delay
        self._delay = min(delay * 2, self._timeouts.backoff_max)
        log.warning("[%s] restarting in %.2fs", name, delay)
        return Verdict(State.BACKOFF, failure, delay)
