"""The instance lock and the record of running children, so that a router that died
without cleaning up (SIGKILL, OOM killer, power cut of the service manager) can have its
children stopped by the next start. On Linux the parent-death signal already takes them
down; the record covers other systems and grandchildren that escaped the process group.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError
from .launcher import kill_leftover, process_create_time

if TYPE_CHECKING:
    import filelock

    from .process import ModelProcess

log = logging.getLogger("llamarouter.core.statedir")


class StateDir:
    def __init__(self, path: Path) -> None:
        self.path = path
        import filelock  # only with --state-dir: it costs the router about 2 MiB of memory

        self._lock: filelock.BaseFileLock = filelock.FileLock(str(path / "llamarouter.lock"), timeout=0)
        self._children = path / "children.json"
        self._last: list[dict[str, object]] | None = None

    def acquire(self) -> None:
        """Take the instance lock, then stop what a previous instance left behind."""
        self.path.mkdir(parents=True, exist_ok=True)
        import filelock

        try:
            self._lock.acquire()
        except filelock.Timeout:
            owner = self._read_owner()
            raise ConfigError(
                f"another llamarouter instance{owner} is using the state dir {self.path}; "
                "stop it or pass a different --state-dir"
            ) from None
        (self.path / "llamarouter.pid").write_text(f"{os.getpid()}\n")
        self.reap_leftovers()

    def _read_owner(self) -> str:
        try:
            return f" (pid {int((self.path / 'llamarouter.pid').read_text().strip())})"
        except (OSError, ValueError):
            return ""

    def reap_leftovers(self) -> int:
        try:
            rows = json.loads(self._children.read_text())
        except (OSError, ValueError):
            return 0
        killed = 0
        for row in rows if isinstance(rows, list) else []:
            try:
                pid, created = int(row["pid"]), float(row["create_time"])
            except (KeyError, TypeError, ValueError):
                continue
            n = kill_leftover(pid, created)
            if n:
                killed += n
                log.warning(
                    "stopped %d leftover process(es) of child pid %d (%s) of a previous instance",
                    n, pid, row.get("model"),
                )
        self.record((), ())
        return killed

    def record(self, *groups: Iterable[ModelProcess]) -> None:
        rows: list[dict[str, object]] = []
        for group in groups:
            for proc in group:
                child = proc.child
                if child is None or child.returncode is not None:
                    continue
                created = process_create_time(child.pid)
                if created is not None:
                    rows.append({"pid": child.pid, "create_time": created, "model": proc.name})
        if rows == self._last:
            return
        self._last = rows
        tmp = self._children.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows))
        os.replace(tmp, self._children)

    def release(self) -> None:
        self.record(())
        self._lock.release()
