"""What loading a model again would cost, for `--evict-cost`: its last measured load
time, or before it has loaded once its file size read at a nominal rate."""

from __future__ import annotations

import os

from .process import ModelProcess

# Before a model has loaded once, --evict-cost guesses its load time from its size.
_NOMINAL_LOAD_BYTES_PER_S = 1024**3


class LoadCosts:
    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled
        self._seconds: dict[str, float] = {}  # the last load of each model, by name
        self._sizes: dict[str, int] = {}  # model file sizes, read once per path

    def loaded(self, proc: ModelProcess) -> None:
        """`proc` became ready: remember how long its load took."""
        if proc.load_started_at is not None and proc.ready_at is not None:
            self._seconds[proc.name] = proc.ready_at - proc.load_started_at

    def reload_seconds(self, proc: ModelProcess) -> float:
        """Seconds a new load of `proc` would take (0 when --evict-cost is off)."""
        if not self._enabled:
            return 0.0
        measured = self._seconds.get(proc.name)
        if measured is not None:
            return measured
        path = proc.spec.model_path
        if not path:
            return 0.0
        size = self._sizes.get(path)
        if size is None:
            try:
                size = os.stat(path).st_size  # once per path: a local stat
            except OSError:
                size = 0
            self._sizes[path] = size
        return size / _NOMINAL_LOAD_BYTES_PER_S
