"""The requests' side of the supervisor: the waiting line, leases, and each model's
usage stamps.

Every request and every `POST /models/load` becomes a *waiter* in one FIFO line and
awaits one future, which resolves to a grant (a `Lease` on a READY model), a resolution
(the load was started) or an error. What to do with a waiter is the scheduler's decision
(scheduler.py), applied by the supervisor's loop; everything here runs on the event loop
and is changed only through `Admission`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Protocol

from ..errors import QueueFull, ShuttingDown
from ..settings.config import ModelSpec, RouterConfig
from . import scheduler
from .memory import MemoryManager
from .process import ModelProcess


@dataclass
class Usage:
    """Request accounting of one model, kept by the supervisor (not the process)."""

    last_used: float = 0.0  # monotonic; stamped by every routed POST and when a request ends
    last_used_wall: float = 0.0
    last_activity: float = 0.0  # a response started or ended (liveness hint)


class UsageBook:
    """Usage by model name: a reload that lists a model again keeps its stamps."""

    def __init__(self) -> None:
        self._by_name: dict[str, Usage] = {}

    def get(self, name: str) -> Usage:
        """The stamps of `name` (fresh zeros, not stored, for a name never used)."""
        return self._by_name.get(name) or Usage()

    def of(self, name: str) -> Usage:
        """The stored stamps of `name`, made on first use."""
        usage = self._by_name.get(name)
        if usage is None:
            usage = self._by_name[name] = Usage()
        return usage

    def used(self, name: str, now: float) -> None:
        usage = self.of(name)
        usage.last_used = now
        usage.last_used_wall = time.time()

    def forget(self, name: str) -> None:
        self._by_name.pop(name, None)


class Lease:
    """A granted request on a READY model. `release()` ends it; only the first call counts."""

    __slots__ = ("_release", "_released", "proc")

    def __init__(self, release: Callable[[ModelProcess], None], proc: ModelProcess) -> None:
        self.proc = proc
        self._release = release
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._release(self.proc)


@dataclass(eq=False)
class Waiter:
    id: int
    model: str
    fut: asyncio.Future[Lease | None]
    load: bool  # POST /models/load: resolves once the start is under way
    autoload: bool
    deadline: float | None
    since: float = 0.0  # monotonic: when it joined the line
    saw_generation: int | None = None


class WaiterQueue:
    """Every request and `POST /models/load` waiting for a model, in arrival order."""

    def __init__(self) -> None:
        self._waiters: list[Waiter] = []
        self._ids = itertools.count(1)

    def __bool__(self) -> bool:
        return bool(self._waiters)

    def __iter__(self) -> Iterator[Waiter]:
        return iter(self._waiters)

    def join(self, model: str, load: bool, autoload: bool, deadline: float | None) -> Waiter:
        fut: asyncio.Future[Lease | None] = asyncio.get_running_loop().create_future()
        waiter = Waiter(next(self._ids), model, fut, load, autoload, deadline, time.monotonic())
        self._waiters.append(waiter)
        return waiter

    def leave(self, waiter: Waiter) -> bool:
        """Take `waiter` out of the line; False when it had left already."""
        if waiter in self._waiters:
            self._waiters.remove(waiter)
            return True
        return False

    @property
    def requests(self) -> int:
        """Requests waiting (loads not counted: they are not --max-queue's business)."""
        return sum(1 for w in self._waiters if not w.load)

    def requests_for(self, name: str) -> int:
        return sum(1 for w in self._waiters if w.model == name and not w.load)

    def wants(self, name: str) -> bool:
        return any(w.model == name for w in self._waiters)

    def by_id(self) -> dict[int, Waiter]:
        return {w.id: w for w in self._waiters}

    def views(self, aliases: dict[str, str]) -> list[scheduler.WaiterView]:
        """The waiters still waiting, as the scheduler sees them (aliases resolved)."""
        return [
            scheduler.WaiterView(
                id=w.id, model=aliases.get(w.model, w.model), load=w.load,
                autoload=w.autoload, deadline=w.deadline, saw_generation=w.saw_generation,
                since=w.since,
            )
            for w in self._waiters
            if not w.fut.done()
        ]

    def fail_all(self, error: Callable[[], Exception]) -> None:
        for waiter in self._waiters:
            if not waiter.fut.done():
                waiter.fut.set_exception(error())


class Loop(Protocol):
    """What admission needs of the supervisor's scheduling loop."""

    closing: bool

    def kick(self) -> None:
        """Wake the loop: the line or a lease changed."""
        ...

    def decide_now(self, now: float) -> None:
        """Run a scheduling pass at once, without awaiting."""
        ...

    def grantable(self, proc: ModelProcess) -> bool:
        """Whether a request for `proc` may be granted without queueing."""
        ...

    def replicas(self, proc: ModelProcess) -> list[ModelProcess]:
        """Every listed child of `proc`'s model (just `proc` without `replicas`)."""
        ...

    def serving(self, proc: ModelProcess) -> bool:
        """READY and taking requests (not giving way to a swap)."""
        ...

    def waited(self, model: str, seconds: float) -> None: ...


class Admission:
    def __init__(
        self,
        config: RouterConfig,
        loop: Loop,
        memory: MemoryManager | None,
        options_for: Callable[[ModelSpec], dict[str, str]],
    ) -> None:
        self._config = config
        self._loop = loop
        self._memory = memory
        self._options_for = options_for
        self.waiters = WaiterQueue()
        self.usage = UsageBook()
        # Leases held on each process. Counted per process, not per name: a reload can
        # retire a busy model and list the same name again while the old child serves.
        self._serving: dict[ModelProcess, int] = {}
        self._released: dict[ModelProcess, float] = {}  # when each last finished a request

    def in_flight(self, proc: ModelProcess) -> int:
        return self._serving.get(proc, 0)

    @property
    def busy(self) -> Collection[ModelProcess]:
        """The children with requests in flight."""
        return self._serving.keys()

    def released_at(self, proc: ModelProcess) -> float:
        return self._released.get(proc, 0.0)

    def forget(self, proc: ModelProcess) -> None:
        self._serving.pop(proc, None)
        self._released.pop(proc, None)

    def touch(self, proc: ModelProcess) -> None:
        """Upstream stamps last_used on every POST it routes to a model, loads included."""
        self.usage.used(proc.name, time.monotonic())

    def retry_after(self) -> float:
        return max(1.0, self._config.timeouts.ready_poll * 20)

    async def acquire(self, proc: ModelProcess, autoload: bool) -> Lease:
        """Wait until `proc` is READY and hold it busy (see Supervisor.acquire)."""
        if self._loop.closing:
            raise ShuttingDown("server is shutting down")
        if self._loop.grantable(proc):
            # The scheduler's grant rule for a READY model, applied inline (no queue).
            self._loop.waited(proc.name, 0.0)
            return self.grant(proc)
        result = await self.wait(proc, load=False, autoload=autoload)
        assert result is not None
        return result

    async def wait(self, proc: ModelProcess, load: bool, autoload: bool) -> Lease | None:
        """Join the line for `proc` and wait for the scheduler's answer."""
        limits = self._config.limits
        waiting = self.waiters.requests
        if not load and limits.max_queue is not None and waiting >= limits.max_queue:
            raise QueueFull(
                f"too many requests waiting for a model ({waiting}); try again later",
                retry_after=self.retry_after(),
            )
        if self._memory is not None:
            # The estimate reads the GGUF header once (off the loop); the scheduler decides.
            await self._memory.estimate_for(proc, self._options_for(proc.spec))
            if self._loop.closing:
                raise ShuttingDown("server is shutting down")
        deadline = None
        if limits.max_wait is not None and not load:
            deadline = time.monotonic() + limits.max_wait
        waiter = self.waiters.join(proc.name, load, autoload, deadline)
        self._loop.kick()
        try:
            return await asyncio.shield(waiter.fut)
        except asyncio.CancelledError:
            _abandon(waiter)
            raise
        finally:
            if self.waiters.leave(waiter):
                self._loop.kick()

    def grant(self, proc: ModelProcess, choose: bool = True) -> Lease:
        """A lease on `proc`'s model: on its ready child with a free slot and the fewest
        requests in flight, then the most free slots (its only child without `replicas`);
        on `proc` itself when the scheduler chose it (`choose` False)."""
        if choose and proc.spec.replicas > 1:
            ready = [p for p in self._loop.replicas(proc) if self._loop.serving(p)]
            if ready:
                proc = min(ready, key=lambda p: (
                    self.in_flight(p) >= p.slots, self.in_flight(p), self.in_flight(p) - p.slots, p.replica,
                ))
        self._serving[proc] = self._serving.get(proc, 0) + 1
        return Lease(self._release, proc)

    def _release(self, proc: ModelProcess) -> None:
        now = time.monotonic()
        self.usage.used(proc.name, now)
        self.usage.of(proc.name).last_activity = now
        self._released[proc] = now
        left = self._serving.get(proc, 0) - 1
        proc.served()
        if left > 0:
            self._serving[proc] = left
            if proc.spec.replicas <= 1:
                return
            # A slot of a model with replicas came free: a request waiting for one takes
            # it now, not when the child next goes idle.
        else:
            self._serving.pop(proc, None)
        if self.waiters and not self._loop.closing:
            # Decide now, before another request can make the model busy again: an idle
            # model that others wait for is evicted at this instant (upstream's rule too),
            # a drained one leaves. Waiting for the loop's next pass let a trickle of
            # requests keep one model loaded while the queue waited.
            self._loop.decide_now(now)
        # An idle model matters to queued requests (it may be evicted for them), to TTL,
        # and to a reload waiting for it to finish its requests.
        self._loop.kick()


def _abandon(waiter: Waiter) -> None:
    """The caller went away: leave the line; a grant that raced in is given back."""
    if waiter.fut.done():
        if not waiter.fut.cancelled() and waiter.fut.exception() is None:
            lease = waiter.fut.result()
            if lease is not None:
                lease.release()
    else:
        waiter.fut.cancel()
