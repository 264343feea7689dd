"""A child's recent output: a bounded ring of lines plus live followers (/models/logs)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Iterator
from typing import TypeVar

T = TypeVar("T")


class LogRing:
    """The last `size` lines. Followers get every new line through a bounded queue; a
    follower that falls behind is dropped and gets the end marker (None) at once, so its
    reader wakes up and ends instead of waiting for lines that will never come. Once
    closed, a new follower gets the end marker at once too."""

    def __init__(self, size: int, follow_queue: int) -> None:
        self._lines: collections.deque[str] = collections.deque(maxlen=max(1, size))
        self._follow_queue = max(2, follow_queue)
        self._followers: set[asyncio.Queue[str | None]] = set()
        self._closed = False

    def append(self, line: str) -> None:
        self._lines.append(line)
        for q in list(self._followers):
            try:
                q.put_nowait(line)
            except asyncio.QueueFull:
                self._end(q)

    def __iter__(self) -> Iterator[str]:
        return iter(self._lines)

    def __reversed__(self) -> Iterator[str]:
        return reversed(self._lines)

    def __len__(self) -> int:
        return len(self._lines)

    def tail(self, n: int) -> list[str]:
        if n <= 0:
            return []
        lines = list(self._lines)
        return lines[-n:]

    def follow(self) -> asyncio.Queue[str | None]:
        q: asyncio.Queue[str | None] = asyncio.Queue(self._follow_queue)
        if self._closed:
            # Nothing would ever end it later: a follow that arrives after shutdown began
            # (on a kept-alive connection) would hold the router for its whole grace.
            end_queue(q)
        else:
            self._followers.add(q)
        return q

    def unfollow(self, q: asyncio.Queue[str | None]) -> None:
        self._followers.discard(q)

    @property
    def followers(self) -> int:
        return len(self._followers)

    def close(self) -> None:
        """End every follower, and every later one at once (router shutdown)."""
        self._closed = True
        for q in list(self._followers):
            self._end(q)

    def _end(self, q: asyncio.Queue[str | None]) -> None:
        self._followers.discard(q)
        end_queue(q)


def end_queue(q: asyncio.Queue[T | None]) -> None:
    """Put the end marker (None) into a bounded subscriber queue, making room for it:
    losing an item matters less than a reader that waits for one that never comes."""
    with contextlib.suppress(asyncio.QueueEmpty):
        while q.full():
            q.get_nowait()
    q.put_nowait(None)
