"""sd_notify: message format, socket address forms, watchdog interval rules."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamarouter.sdnotify import Notifier
from tests.fakes.helpers import wait_for


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.setblocking(False)
    try:
        yield sock, path
    finally:
        sock.close()


def received(sock: socket.socket) -> list[str]:
    out = []
    while True:
        try:
            out.append(sock.recv(4096).decode())
        except BlockingIOError:
            return out


def test_disabled_without_socket() -> None:
    n = Notifier({})
    assert not n.enabled and n.ready() is False and n.watchdog_interval is None
    assert not Notifier({"NOTIFY_SOCKET": "relative/path"}).enabled


def test_ready_and_stopping_messages(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path})
    assert n.ready("listening on x:1") and n.stopping() and n.notify("WATCHDOG=1")
    assert received(sock) == ["READY=1\nSTATUS=listening on x:1", "STOPPING=1", "WATCHDOG=1"]
    n.close()


def test_abstract_socket() -> None:
    name = f"llamarouter-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert sock.recv(4096) == b"READY=1"
        n.close()


def test_send_failure_is_not_raised(tmp_path: Path) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    assert n.enabled and n.ready() is False
    n.close()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"WATCHDOG_USEC": "200000"}, 0.1),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1234"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "999"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "junk"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert Notifier({"NOTIFY_SOCKET": "/x", **env}, pid=1234).watchdog_interval == expected


async def test_watchdog_pings_from_the_loop(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"})
    task = asyncio.create_task(n.watchdog())
    pings: list[str] = []

    def three() -> bool:
        pings.extend(received(sock))
        return len(pings) >= 3

    await wait_for(three, 5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert set(pings) == {"WATCHDOG=1"}
    n.close()
