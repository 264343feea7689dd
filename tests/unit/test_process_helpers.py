"""process._first / process._unless_stopped: the waits a child's life races against its
stop (health probe, canary, keep-cache restore, the memory wait before a spawn).

A life is cancelled at router teardown; whatever these helpers started for it must end
with it, and must not hold that cancellation up."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from llamarouter.core.child import _first, _unless_stopped
from tests.fakes.helpers import wait_for

BOUND = 2.0  # seconds; every wait here is expected to end at once
SETTLE = 0.05  # what a cancelled wait gets to end (Timeouts.settle_cancelled)


class Work:
    """A wrapped wait that records how it ended; `stubborn` ones ignore cancellation
    until released, then fail."""

    def __init__(self, *, stubborn: bool = False, slow_cleanup: bool = False) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.stubborn = stubborn
        self.slow_cleanup = slow_cleanup
        self.ended: list[str] = []

    async def run(self) -> int:
        self.started.set()
        try:
            while True:
                try:
                    await self.release.wait()
                    break
                except asyncio.CancelledError:
                    if not self.stubborn:
                        raise
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            if self.slow_cleanup:
                await self.release.wait()
            raise
        self.ended.append("finished")
        if self.stubborn:
            raise OSError("probe failed after all")
        return 200


async def _cancel_caller(caller: asyncio.Task[Any]) -> None:
    caller.cancel()
    await asyncio.wait({caller}, timeout=BOUND)
    assert caller.done(), "the caller's cancellation was held up by the work it wrapped"
    assert caller.cancelled(), "the caller's cancellation was swallowed"


async def test_first_returns_the_finished_work() -> None:
    work = Work()
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    work.release.set()
    done = await asyncio.wait_for(_first(work.run(), never, settle=SETTLE), BOUND)
    assert done is not None and done.result() == 200
    never.cancel()


async def test_first_cancels_the_work_when_a_stop_comes_first() -> None:
    work = Work()
    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    caller = asyncio.create_task(_first(work.run(), stop, settle=SETTLE))
    await asyncio.wait_for(work.started.wait(), BOUND)
    stop.set_result(None)
    assert await asyncio.wait_for(caller, BOUND) is None
    assert work.ended == ["cancelled"]


@pytest.mark.parametrize("helper", ["_first", "_unless_stopped"])
async def test_the_work_is_cancelled_when_the_caller_is(helper: str) -> None:
    work = Work()
    if helper == "_first":
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        caller = asyncio.create_task(_first(work.run(), never, settle=SETTLE))
    else:
        caller = asyncio.create_task(_unless_stopped(work.run(), asyncio.Event(), SETTLE))
    try:
        await asyncio.wait_for(work.started.wait(), BOUND)
        await _cancel_caller(caller)
        await wait_for(lambda: work.ended, BOUND, message="the wrapped work to be cancelled")
        assert work.ended == ["cancelled"]
    finally:
        work.release.set()
        if helper == "_first":
            never.cancel()
    # Nothing the helper started is left behind (_unless_stopped's stop.wait() task included).
    mine = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
    await wait_for(lambda: all(t.done() for t in mine), BOUND, message="no task left running")


async def test_work_ignoring_cancellation_is_left_behind_and_its_error_retrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="llamarouter.process")
    work = Work(stubborn=True)
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    caller = asyncio.create_task(_first(work.run(), never, settle=SETTLE))
    try:
        await asyncio.wait_for(work.started.wait(), BOUND)
        await _cancel_caller(caller)
    finally:
        work.release.set()
        never.cancel()
    await wait_for(
        lambda: "abandoned wait ended with OSError" in caplog.text,
        BOUND,
        message="the abandoned work's error to be retrieved",
    )
    assert work.ended == ["finished"]


async def test_a_stop_does_not_wait_for_good_on_work_ignoring_cancellation() -> None:
    work = Work(stubborn=True)
    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    caller = asyncio.create_task(_first(work.run(), stop, settle=SETTLE))
    try:
        await asyncio.wait_for(work.started.wait(), BOUND)
        stop.set_result(None)
        await asyncio.wait({caller}, timeout=BOUND)
        assert caller.done(), "the stop waited for work that ignores cancellation"
        assert caller.result() is None
    finally:
        work.release.set()
    await wait_for(lambda: work.ended, BOUND, message="the stubborn work to end")


async def test_a_caller_cancelled_while_stopped_work_settles_stays_cancelled() -> None:
    work = Work(slow_cleanup=True)
    stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    caller = asyncio.create_task(_first(work.run(), stop, settle=SETTLE))
    try:
        await asyncio.wait_for(work.started.wait(), BOUND)
        stop.set_result(None)
        await wait_for(lambda: work.ended, BOUND, message="the work to be cancelled")
        await _cancel_caller(caller)
    finally:
        work.release.set()
