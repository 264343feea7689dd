"""systemd's notify protocol (sd_notify(3)) without libsystemd: one datagram per message
to the unix socket named by NOTIFY_SOCKET.

Everything is a no-op when NOTIFY_SOCKET is unset (not under systemd, or Type= is not
notify), so callers never check. Sending never raises: a broken notify socket must not
take the router down; systemd will notice the missing READY/WATCHDOG itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger("llamarouter.sdnotify")


class Notifier:
    def __init__(self, environ: Mapping[str, str], pid: int | None = None) -> None:
        self._address = _address(environ.get("NOTIFY_SOCKET", ""))
        self._sock: socket.socket | None = None
        self.watchdog_interval = _watchdog_interval(environ, os.getpid() if pid is None else pid)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *lines: str) -> bool:
        """Send `KEY=VALUE` lines as one message; False when not sent."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(lines).encode(), self._address)
            return True
        except OSError as exc:
            log.debug("sd_notify %r failed: %s", lines, exc)
            return False

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *((f"STATUS={status}",) if status else ()))

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *((f"STATUS={status}",) if status else ()))

    async def watchdog(self) -> None:
        """Ping WATCHDOG=1 forever at half the systemd deadline. Runs as a task on the event
        loop on purpose: a wedged loop stops the pings and systemd restarts us."""
        interval = self.watchdog_interval
        if interval is None or not self.enabled:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()  # Linux abstract namespace
    if value.startswith("/"):
        return value
    return None  # sd_notify accepts only these two forms (vsock aside)


def _watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between pings: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises."""
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner:
        try:
            if int(owner) != pid:
                return None  # meant for another process (e.g. a wrapper that exec'd us later)
        except ValueError:
            return None
    return usec / 2 / 1_000_000
