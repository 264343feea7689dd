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
    def __init__(self, config: RouterConfig, make: Callable[[ModelSpec], ModelProcess]) -> None:
        self._config = config
        self._make = make
        self.models: dict[str, ModelProcess] = {}
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
        """Whether `proc` is the model its name stands for now (not a retired one)."""
        return self.models.get(proc.name) is proc

    def visible(self) -> list[ModelProcess]:
        return [p for p in self.models.values() if not p.spec.hidden]

    def all_processes(self) -> list[ModelProcess]:
        return [*self.models.values(), *self.retired]

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
                self.models[name] = self._open(spec)
        self.aliases = {
            alias: name for name, spec in specs.items() for alias in spec.aliases if alias != name
        }

    def unlist(self, proc: ModelProcess, busy: bool) -> None:
        """A reload changed or removed its definition: stop it, or, while it serves
        (`busy`), let it finish its requests first (it keeps its slot until it exits)."""
        del self.models[proc.name]
        state = proc.expected_state
        if state == State.READY and busy:
            self.retired.add(proc)
            self.finishing.add(proc)
        elif state in RUNNING_STATES or state == State.STOPPING:
            proc.stop(StopReason.RELOAD)
            self.retired.add(proc)
        else:
            self.close(proc)

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

    def _open(self, spec: ModelSpec) -> ModelProcess:
        proc = self._make(spec)
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
