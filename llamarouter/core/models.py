"""The models the router knows: the listed ones by name (and their aliases), the ones a
reload retired that are still stopping, their owner tasks, and runtime pins.

The supervisor is its only user and calls it from the event loop only; a model's state
stays its owner's (process.py). A name can have two models for a while: a reload that
changes a busy model lists the new definition at once while the old child finishes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..errors import ModelNotFound
from ..settings.config import ModelSpec, RouterConfig
from .process import ModelProcess
from .states import RUNNING_STATES, State, StopReason

log = logging.getLogger("llamarouter.supervisor")


class ModelTable:
    def __init__(self, config: RouterConfig, make: Callable[[ModelSpec, int], ModelProcess]) -> None:
        self._config = config
        self._make = make
        self.models: dict[str, ModelProcess] = {}  # each model's first child (replica 0)
        # The other replicas of a model with `replicas = N`, by name (replica 1 first).
        self.extra: dict[str, list[ModelProcess]] = {}
        self.aliases: dict[str, str] = {}
        self.retired: set[ModelProcess] = set()  # replaced or removed by a reload, stopping
        # Retired while serving: they finish the requests they have, then stop.
        self.finishing: set[ModelProcess] = set()
        self._owners: set[asyncio.Task[None]] = set()
        self._pins: dict[str, bool] = {}  # runtime pin/unpin over the preset's `pin`

    # ----------------------------------------------------------------- lookup
    def resolve(self, name: str) -> ModelProcess:
        proc = self.models.get(name)
        if proc is None:
            canonical = self.aliases.get(name)
            if canonical is not None:
                proc = self.models.get(canonical)
        if proc is None:
            raise ModelNotFound(f"model '{name}' not found")
        return proc

    def find(self, name: str) -> ModelProcess | None:
        try:
            return self.resolve(name)
        except ModelNotFound:
            return None

    def listed(self, proc: ModelProcess) -> bool:
        """Whether `proc` is the model its name stands for now, or one of its replicas (not
        a retired one)."""
        if proc.replica:
            return proc in self.extra.get(proc.name, ())
        return self.models.get(proc.name) is proc

    def replicas(self, proc: ModelProcess) -> list[ModelProcess]:
        """Every listed child of `proc`'s model, its first one first."""
        first = self.models.get(proc.name)
        return [first, *self.extra.get(proc.name, ())] if first is not None else []

    def by_key(self, key: str) -> ModelProcess | None:
        """A listed model or replica by its key (a model's name, or "name#2")."""
        proc = self.models.get(key)
        if proc is not None:
            return proc
        name, sep, _ = key.rpartition("#")
        if sep:
            return next((p for p in self.extra.get(name, ()) if p.key == key), None)
        return None

    def visible(self) -> list[ModelProcess]:
        return [p for p in self.models.values() if not p.spec.hidden]

    def all_processes(self) -> list[ModelProcess]:
        return [*self.models.values(), *(p for group in self.extra.values() for p in group), *self.retired]

    # ----------------------------------------------------------------- pins
    def pinned(self, proc: ModelProcess) -> bool:
        """Kept loaded: a runtime pin or unpin if one was given, else its preset's `pin`
        (the one model of -m/-hf mode is pinned by its spec)."""
        override = self._pins.get(proc.name)
        return proc.spec.pin if override is None else override

    def pin(self, name: str, on: bool) -> ModelProcess | None:
        proc = self.find(name)
        if proc is not None:
            self._pins[proc.name] = on
        return proc

    # ----------------------------------------------------------------- changes
    def apply(self, specs: dict[str, ModelSpec]) -> None:
        """List every spec whose name is not listed yet, and the aliases of all of them."""
        for name, spec in specs.items():
            if name not in self.models:
                self.models[name] = self._open(spec, 0)
                self.extra[name] = [self._open(spec, i) for i in range(1, spec.replicas)]
        self.aliases = {
            alias: name for name, spec in specs.items() for alias in spec.aliases if alias != name
        }

    def unlist(self, name: str, busy: Callable[[ModelProcess], bool]) -> list[ModelProcess]:
        """A reload changed or removed the model's definition: stop each of its children,
        or, while one serves (`busy`), let it finish its requests first (it keeps its slot
        until it exits). The children that left the table at once (nothing to stop)."""
        closed = []
        for proc in [self.models.pop(name), *self.extra.pop(name, [])]:
            if not self._retire(proc, busy(proc)):
                closed.append(proc)
        return closed

    def _retire(self, proc: ModelProcess, busy: bool) -> bool:
        state = proc.expected_state
        if state == State.READY and busy:
            self.retired.add(proc)
            self.finishing.add(proc)
        elif state in RUNNING_STATES or state == State.STOPPING:
            proc.stop(StopReason.RELOAD)
            self.retired.add(proc)
        else:
            self.close(proc)
            return False
        return True

    def finished(self, proc: ModelProcess) -> bool:
        """A retired model came to rest: it leaves the table. True when it was retired."""
        if proc not in self.retired:
            return False
        self.retired.discard(proc)
        self.finishing.discard(proc)
        self.close(proc)
        return True

    def close(self, proc: ModelProcess) -> None:
        if proc.state != State.SHUTDOWN:
            proc.close()

    def _open(self, spec: ModelSpec, replica: int) -> ModelProcess:
        proc = self._make(spec, replica)
        task = proc.open()
        self._owners.add(task)
        task.add_done_callback(self._owner_done)
        return proc

    def _owner_done(self, task: asyncio.Task[None]) -> None:
        self._owners.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s ended with an error: %r", task.get_name(), exc, exc_info=exc)

    async def end_owners(self, timeout: float) -> None:
        """Wait for every owner task to end (they were told to close), then cancel the rest;
        each wait bounded by `timeout`."""
        owners = list(self._owners)
        if not owners:
            return
        _, pending = await asyncio.wait(owners, timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=timeout)
