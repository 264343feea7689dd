"""The router under a fake systemd: READY=1 once listening, WATCHDOG=1 pings from the
event loop, STOPPING=1 on SIGTERM; children do not inherit the notify socket."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.conftest import StartRouter, child_of, make_models
from tests.fakes.helpers import wait_for


async def test_ready_watchdog_stopping(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a")
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.setblocking(False)
        messages: list[str] = []

        def drain() -> list[str]:
            while True:
                try:
                    messages.append(sock.recv(4096).decode())
                except BlockingIOError:
                    return messages

        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"}
        r = await start_router("--models-dir", str(d), env=env)
        await wait_for(lambda: any(m.startswith("READY=1") for m in drain()), 10, message="READY=1")
        await wait_for(lambda: drain().count("WATCHDOG=1") >= 3, 10, message="three watchdog pings")

        assert (await r.chat("a", max_tokens=1))[0] == 200
        child = child_of(r, "a")
        assert child is not None
        assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC"} & set(child.environ())

        assert await r.stop() == 0
        drain()
        assert any(m.startswith("STOPPING=1") for m in messages)
        ready_at = next(i for i, m in enumerate(messages) if m.startswith("READY=1"))
        stopping_at = next(i for i, m in enumerate(messages) if m.startswith("STOPPING=1"))
        assert ready_at < stopping_at
