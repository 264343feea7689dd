"""Health from live traffic inside the core: the failure that crosses the limit takes the
child out of routing at once (before its exit is known), and the exit that follows is a
crash with the usual backoff; reports about an older child are ignored."""

from __future__ import annotations

import asyncio

from llamarouter.core.states import State
from tests.fakes.helpers import wait_for
from tests.process.fakes import FakeLauncher, fast_config, make_supervisor, spec


async def test_the_limit_takes_the_child_out_at_once_and_replaces_it() -> None:
    launcher = FakeLauncher()
    sup = make_supervisor({"a": spec("a")}, fast_config(request_failures=3), launcher)
    await sup.start()
    try:
        lease = await asyncio.wait_for(sup.acquire(sup.models["a"], True), 5)
        lease.release()
        proc = sup.models["a"]
        old_port = proc.port
        proc.note_request(old_port, "HTTP 500")
        proc.note_request(old_port, None)  # an answer in between: the count starts again
        proc.note_request(old_port, "HTTP 500")
        proc.note_request(old_port, "HTTP 500")
        assert proc.expected_state == State.READY
        proc.note_request(old_port, "reset")  # the third in a row
        # Same step: still READY (the kill is on its way), but nothing new is routed to it.
        assert proc.state == State.READY and proc.expected_state == State.BACKOFF
        waiting = asyncio.ensure_future(sup.acquire(proc, True))
        await asyncio.sleep(0)
        assert not waiting.done()
        lease = await asyncio.wait_for(waiting, 5)
        assert lease.proc is proc and proc.port != old_port and proc.restarts == 1
        assert proc.sick_exit and proc.failure is not None and "3 requests in a row" in proc.failure
        assert len(proc.crash_times) == 1  # one failure toward --restart-max
        # A late report about the old child changes nothing.
        for _ in range(5):
            proc.note_request(old_port, "HTTP 500")
        assert proc.expected_state == State.READY
        lease.release()
    finally:
        await sup.shutdown()
    await wait_for(lambda: not launcher.alive(), 5)
