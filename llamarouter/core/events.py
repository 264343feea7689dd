"""The `/models/sse` event stream: one hub, many subscribers, none of them able to hold
the router (a slow one is dropped; after close every subscriber ends at once)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from .logring import end_queue
from .states import State, api_status

if TYPE_CHECKING:
    from .process import ModelProcess


class EventHub:
    """Fan-out of /models/sse events. A subscriber that falls behind is dropped; once
    closed, a new subscriber gets the end marker at once."""

    def __init__(self, queue_size: int) -> None:
        self._queue_size = queue_size
        self._subscribers: set[asyncio.Queue[bytes | None]] = set()
        self._closed = False

    def publish(self, event: str, model: str, data: dict[str, object] | None = None) -> None:
        payload: dict[str, object] = {"model": model, "event": event}
        if data is not None:
            payload["data"] = data
        line = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
        for q in list(self._subscribers):
            try:
                q.put_nowait(line)
            except asyncio.QueueFull:
                # Too slow: drop the client; the end marker wakes its handler, which closes
                # the connection instead of hanging there.
                self._subscribers.discard(q)
                end_queue(q)

    def transition(self, proc: ModelProcess, old: State, new: State) -> None:
        """A listed model changed state: a load beginning is `model_status` loading, any
        change of the upstream status word a `status_change` (as upstream's router)."""
        # ever_ready is about the life that is ending (it resets only on entering STARTING).
        old_api = api_status(old, proc.ever_ready)
        new_api = proc.api_status
        if new == State.STARTING and old in (State.STOPPED, State.FAILED):
            self.publish("model_status", proc.name, {"status": "loading"})
        elif old_api != new_api:
            data: dict[str, object] = {"status": new_api}
            if new_api == "unloaded":
                # A stop we asked for is a clean exit, whatever signal ended the child.
                data["exit_code"] = proc.exit_code if proc.crashed and proc.exit_code is not None else 0
            if new == State.READY and proc.loaded_info:
                data["info"] = proc.loaded_info
            self.publish("status_change", proc.name, data)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[bytes | None]]:
        q: asyncio.Queue[bytes | None] = asyncio.Queue(self._queue_size)
        if self._closed:
            # Nothing would ever end it later: a stream opened after shutdown began (a
            # reconnect on a kept-alive connection) would hold the router for its grace.
            end_queue(q)
        else:
            self._subscribers.add(q)
        try:
            yield q
        finally:
            self._subscribers.discard(q)

    def close(self) -> None:
        self._closed = True
        for q in list(self._subscribers):
            end_queue(q)
        self._subscribers.clear()
