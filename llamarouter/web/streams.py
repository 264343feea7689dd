"""Resumable streams in router mode, as upstream's router offers them
(server-models.cpp, router_stream_*): a POST that carries `X-Conversation-Id` is
remembered as served by its model; `GET /v1/stream`, `POST /v1/streams/lookup` and
`DELETE /v1/stream` then go to that model's child, which keeps the stream's buffer (the
child's own server-stream.cpp). The router keeps only the conversation -> model map."""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
from typing import Any

from ..core.childclient import ChildClient, ChildError
from ..core.process import ModelProcess
from ..core.states import State

log = logging.getLogger("llamarouter.streams")

HEADER = "X-Conversation-Id"


class Conversations:
    """conversation id -> (model name, ticket), the most recent `limit` kept. A newer
    request for the id, or a stop (DELETE /v1/stream), replaces or erases the entry; a
    request whose ticket is gone when its model is ready was cancelled by that stop."""

    def __init__(self, limit: int) -> None:
        self._limit = max(1, limit)
        self._map: collections.OrderedDict[str, tuple[str, int]] = collections.OrderedDict()
        self._tickets = itertools.count(1)

    def remember(self, conv_id: str, model: str) -> int:
        if not conv_id or not model:
            return 0
        ticket = next(self._tickets)
        self._map[conv_id] = (model, ticket)
        self._map.move_to_end(conv_id)
        while len(self._map) > self._limit:
            self._map.popitem(last=False)
        return ticket

    def alive(self, conv_id: str, ticket: int) -> bool:
        entry = self._map.get(conv_id)
        return entry is not None and entry[1] == ticket

    def lookup(self, conv_id: str) -> str | None:
        entry = self._map.get(conv_id) if conv_id else None
        return entry[0] if entry is not None else None

    def forget(self, conv_id: str) -> None:
        self._map.pop(conv_id, None)

    def __len__(self) -> int:
        return len(self._map)


def requested_ids(raw: bytes) -> list[str] | None:
    """`{"conversation_ids": [...]}`: its non-empty strings; None for a body that is not
    JSON (upstream's router then answers `[]`)."""
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    ids = body.get("conversation_ids") if isinstance(body, dict) else None
    if not isinstance(ids, list):
        return []
    return [v for v in ids if isinstance(v, str) and v]


def loading(proc: ModelProcess | None) -> bool:
    """The owner is on its way up: a resume is worth retrying (upstream's 503)."""
    return proc is not None and proc.expected_state in (State.STARTING, State.BACKOFF)


async def lookup_children(children: ChildClient, owners: dict[int, list[str]], timeout: float) -> list[Any]:
    """Ask each child (by port) about the ids it owns, in parallel, each bounded by
    `timeout`; a child that does not answer in time or in shape adds nothing."""
    results = await asyncio.gather(
        *(children.lookup_streams(port, ids, timeout) for port, ids in owners.items())
    )
    return [entry for part in results for entry in part]


async def delete_on_child(children: ChildClient, port: int, conv_id: str, timeout: float) -> None:
    """Forward the stop to the owning child (idempotent there), bounded by `timeout`."""
    try:
        await children.stop_stream(port, conv_id, timeout)
    except ChildError as exc:
        log.warning("stream stop for conv_id=%s: the child on port %d did not answer: %s", conv_id, port, exc)
