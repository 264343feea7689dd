"""Nothing runs at rest: with no request waiting and no child loading, stopping or backing
off, neither the scheduling loop nor the file watcher keeps a timer (bench/idle.py
measures what that saves in CPU)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from llamarouter.core.watch import Watcher
from tests.fakes.helpers import wait_for
from tests.process.fakes import FakeLauncher, fast_config, make_supervisor, spec


def timers() -> list[asyncio.TimerHandle]:
    loop = asyncio.get_running_loop()
    assert isinstance(loop, asyncio.BaseEventLoop)  # the test runs on asyncio's own loop
    return [h for h in loop._scheduled if not h.cancelled()]


async def at_rest(checks: int = 20) -> None:
    """Until no timer is armed at `checks` looks in a row, 10 ms apart (a periodic timer
    is only absent for the moment between firing and being armed again); at most 5 s."""
    in_a_row = 0

    def quiet() -> bool:
        nonlocal in_a_row
        in_a_row = in_a_row + 1 if not timers() else 0
        return in_a_row >= checks

    await wait_for(quiet, 5, interval=0.01, message=f"no timer at {checks} looks in a row")


async def test_no_timer_is_left_at_rest(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    sup = make_supervisor({"a": spec("a")}, fast_config(), FakeLauncher())
    await sup.start()
    watcher = Watcher(models, None, sup.reload, debounce=0.05, poll=0.05)
    watcher.start()
    try:
        await asyncio.wait_for(watcher.watching.wait(), 5)
        assert watcher.mode == "inotify"
        await at_rest()
        # A file change still wakes the watcher, and the reload it makes runs a pass.
        passes = sup.counters.passes
        (models / "b.gguf").write_bytes(b"x")
        await wait_for(lambda: watcher.reloads == 1 and sup.counters.passes > passes, 5)
        await at_rest()
    finally:
        await watcher.stop(5)
        await sup.shutdown()
