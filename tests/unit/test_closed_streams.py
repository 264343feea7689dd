"""EventHub (/models/sse) and LogRing (/models/logs?follow=1) once closed by shutdown: a
subscriber that comes after the close gets the end marker at once. It used to get a queue
that nothing would ever end, and its stream held the router for the whole shutdown grace."""

from __future__ import annotations

import asyncio

from llamarouter.core.logring import LogRing
from llamarouter.core.events import EventHub


async def test_a_subscriber_before_the_close_is_ended() -> None:
    hub = EventHub(4)
    async with hub.subscribe() as q:
        hub.publish("status_change", "a", {"status": "loaded"})
        hub.close()
        assert (await asyncio.wait_for(q.get(), 5)) is not None
        assert (await asyncio.wait_for(q.get(), 5)) is None


async def test_a_subscriber_after_the_close_ends_at_once() -> None:
    hub = EventHub(4)
    hub.close()
    async with hub.subscribe() as q:
        assert q.get_nowait() is None
        hub.publish("status_change", "a", {"status": "loaded"})  # reaches no one
        assert q.empty()
    async with hub.subscribe() as again:  # and every later one (an EventSource retries)
        assert again.get_nowait() is None


async def test_a_subscriber_after_the_close_ends_at_once_with_an_unbounded_queue() -> None:
    hub = EventHub(0)  # asyncio's size 0: no bound
    hub.close()
    async with hub.subscribe() as q:
        assert q.get_nowait() is None


def test_a_follower_after_the_close_ends_at_once_and_the_tail_stays() -> None:
    ring = LogRing(10, 10)
    ring.append("before")
    ring.close()
    q = ring.follow()
    assert q.get_nowait() is None
    assert ring.followers == 0
    ring.append("after")  # a draining reader's last lines still reach the ring
    assert q.empty()
    assert ring.tail(5) == ["before", "after"]
    ring.unfollow(q)  # what the handler does when it ends: harmless for an ended queue


def test_a_follower_before_the_close_is_ended() -> None:
    ring = LogRing(10, 2)
    q = ring.follow()
    ring.append("x")
    ring.append("y")  # the queue is full: the end marker must still fit
    ring.close()
    items = []
    while not q.empty():
        items.append(q.get_nowait())
    assert items[-1] is None
    assert ring.followers == 0
