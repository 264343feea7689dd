"""Shutdown of the supervision core against scripted children: streams opened after
shutdown began end at once, and a scheduling loop that died does not cut shutdown short."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

import pytest

from llamarouter.core.process import ModelProcess
from llamarouter.core.supervisor import Supervisor
from tests.fakes.helpers import wait_for
from tests.process.fakes import FakeLauncher, FakeProbe, fast_config, spec


class RecordingStateDir:
    """Keeps what the supervisor records instead of writing children.json."""

    def __init__(self) -> None:
        self.records: list[list[str]] = []

    def record(self, *groups: Iterable[ModelProcess]) -> None:
        self.records.append([p.name for group in groups for p in group])


def _supervisor(launcher: FakeLauncher, state_dir: RecordingStateDir | None = None) -> Supervisor:
    specs = {"a": spec("a")}
    return Supervisor(
        fast_config(1), lambda: dict(specs), launcher, FakeProbe(launcher),
        lambda s, port: [s.name, str(port)], state_dir=state_dir,  # type: ignore[arg-type]
    )


async def test_streams_opened_after_begin_shutdown_end_at_once() -> None:
    launcher = FakeLauncher()
    sup = _supervisor(launcher)
    await sup.start()
    try:
        (await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)).release()
        sup.begin_shutdown()
        # What the /models/sse and /models/logs?follow=1 handlers do on a kept-alive
        # connection while the router waits out its grace.
        async with sup.events.subscribe() as events:
            assert (await asyncio.wait_for(events.get(), 5)) is None
        follow = sup.models["a"].logs.follow()
        try:
            assert (await asyncio.wait_for(follow.get(), 5)) is None
        finally:
            sup.models["a"].logs.unfollow(follow)
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)
    assert launcher.alive() == []


async def test_shutdown_runs_to_the_end_after_the_scheduling_loop_died(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    launcher = FakeLauncher()
    state_dir = RecordingStateDir()
    sup = _supervisor(launcher, state_dir)
    await sup.start()
    shut = False
    try:
        (await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)).release()
        assert ["a"] in state_dir.records  # the running child was recorded

        class Broken(asyncio.Event):
            async def wait(self) -> bool:
                raise RuntimeError("a bug between two passes")

        # Between passes, outside the pass's guard: the loop dies of this.
        monkeypatch.setattr(sup.arbiter, "kick", Broken())
        loop_task = sup.arbiter.task
        assert loop_task is not None
        with caplog.at_level(logging.CRITICAL, logger="llamarouter.supervisor"):
            await wait_for(loop_task.done, 5, message="the scheduling loop to die")
            await wait_for(lambda: "scheduling loop died" in caplog.text, 5)
        async with sup.events.subscribe() as events:
            shut = True
            await asyncio.wait_for(sup.shutdown(), 5)  # must not re-raise the loop's error
            assert (await asyncio.wait_for(events.get(), 5)) is None
    finally:
        if not shut:  # a failure before the shutdown under test: still stop the children
            await asyncio.wait_for(sup.shutdown(), 5)
    assert launcher.alive() == []
    assert state_dir.records[-1] == []  # the record was cleared: nothing left to reap


async def test_a_pass_that_fails_anywhere_leaves_the_loop_running(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Taking the snapshot used to sit outside the pass's guard: a bug there killed the
    # loop, and every later request waited for a grant that never came.
    launcher = FakeLauncher()
    sup = _supervisor(launcher)
    await sup.start()
    try:
        real = sup.arbiter.snapshot
        failures: list[float] = []

        def broken(now: float) -> object:
            failures.append(now)
            raise RuntimeError("bug while taking the snapshot")

        with caplog.at_level(logging.ERROR, logger="llamarouter.supervisor"):
            monkeypatch.setattr(sup.arbiter, "snapshot", broken)
            sup.kick()
            await wait_for(lambda: failures, 5, message="a pass to fail")
            monkeypatch.setattr(sup.arbiter, "snapshot", real)
        assert "scheduling pass failed" in caplog.text
        assert sup.arbiter.task is not None and not sup.arbiter.task.done()
        (await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)).release()  # granted
    finally:
        await asyncio.wait_for(sup.shutdown(), 5)
    assert launcher.alive() == []
