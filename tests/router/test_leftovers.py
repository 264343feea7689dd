"""Leftovers of an earlier router (state dir): live processes of a recorded child's group
are killed and counted; zombies are dead already, so they are reaped when they are ours
and never counted as stopped leftovers."""

from __future__ import annotations

import subprocess
import sys

import psutil

from llamarouter.core.launcher import kill_leftover
from tests.fakes.helpers import wait_for


def _start(code: str) -> tuple[subprocess.Popen[bytes], float]:
    # A group leader of its own, like a child of the router.
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    return proc, psutil.Process(proc.pid).create_time()


async def test_a_zombie_is_reaped_and_not_counted() -> None:
    proc, created = _start("pass")

    def zombie() -> bool:
        return psutil.Process(proc.pid).status() == psutil.STATUS_ZOMBIE

    await wait_for(zombie, 10, message="the child to exit unreaped")
    assert kill_leftover(proc.pid, created) == 0
    # This process is its parent, as a router running as PID 1 is of adopted orphans.
    assert not psutil.pid_exists(proc.pid)
    assert proc.poll() is not None  # Popen learns it is gone (and does not warn later)


async def test_a_live_leftover_is_killed_and_counted() -> None:
    proc, created = _start("import time; time.sleep(60)")
    try:
        assert kill_leftover(proc.pid, created) == 1
        assert proc.wait(10) == -9
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
