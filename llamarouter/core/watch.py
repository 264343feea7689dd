"""Watch --models-dir and the preset file; apply changes as a reload does.

What changed is decided by comparing snapshots (name, size, mtime, inode of the GGUF files and
directories discovery looks at, and of the preset file), so the same rules hold whatever
wakes us: inotify through `watchfiles` when it is installed, else a poll every
`Timeouts.watch_poll` seconds. A change is applied once the sources have been quiet for
`Timeouts.watch_debounce` seconds, so a model still being copied in is picked up once,
complete. A reload that fails (a preset with an error) is logged and the current models
stay, as for SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..errors import LlamaRouterError

log = logging.getLogger("llamarouter.core.watch")

Snapshot = frozenset[tuple[str, int, int, int]]
FileIdentity = tuple[int, int, int]


def file_identity(path: str | None) -> FileIdentity | None:
    """Size, mtime and inode of `path` (following links), None when it cannot be read: a
    file replaced or rewritten in place shows up as a different identity."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def snapshot(models_dir: Path | None, preset: Path | None) -> Snapshot:
    """What discovery would see: entries of the models dir and of its subdirectories (one
    level, as discovery scans), and the preset file."""
    out: set[tuple[str, int, int, int]] = set()

    def add(path: str) -> None:
        found = file_identity(path)
        if found is not None:
            out.add((path, *found))

    if models_dir is not None:
        for entry in _scandir(str(models_dir)):
            if entry.name.startswith("."):
                continue
            add(entry.path)
            with contextlib.suppress(OSError):
                if entry.is_dir():
                    for sub in _scandir(entry.path):
                        if not sub.name.startswith(".") and sub.name.endswith(".gguf"):
                            add(sub.path)
    if preset is not None:
        add(str(preset))
    return frozenset(out)


def _scandir(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError:
        return []


class Watcher:
    """One task; `start()` with the app, `await stop()` on shutdown (bounded)."""

    def __init__(
        self,
        models_dir: Path | None,
        preset: Path | None,
        on_change: Callable[[], Awaitable[None]],
        debounce: float,
        poll: float,
        use_inotify: bool = True,
    ) -> None:
        self._models_dir = models_dir
        self._preset = preset
        self._on_change = on_change
        self._debounce = debounce
        self._poll = poll
        self._use_inotify = use_inotify
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self.mode = "off"  # "inotify" or "poll" once started
        self.reloads = 0
        # Set once the first snapshot is taken: changes from then on are seen.
        self.watching = asyncio.Event()

    def _paths(self) -> list[Path]:
        paths = [self._models_dir] if self._models_dir is not None else []
        if self._preset is not None:
            # The directory, not the file: editors replace a file by renaming over it.
            paths.append(self._preset.parent)
        return [p for p in paths if p.is_dir()]

    def start(self) -> None:
        if self._task is not None or (self._models_dir is None and self._preset is None):
            return
        self.mode = "inotify" if self._use_inotify and _has_watchfiles() and self._paths() else "poll"
        log.info(
            "watching for model changes in %s (%s)",
            ", ".join(str(p) for p in (self._models_dir, self._preset) if p is not None),
            "inotify" if self.mode == "inotify" else f"polling every {self._poll:g}s",
        )
        self._task = asyncio.create_task(self._run(), name="watch-models")
        self._task.add_done_callback(_report_crash)

    async def stop(self, timeout: float) -> None:
        task = self._task
        if task is None:
            return
        self._stop.set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, timeout)

    async def _run(self) -> None:
        notifier = self._start_inotify()
        try:
            last = await asyncio.to_thread(snapshot, self._models_dir, self._preset)
            self.watching.set()
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self._poll)
                self._wake.clear()
                now = await asyncio.to_thread(snapshot, self._models_dir, self._preset)
                if now == last:
                    continue
                # Debounce: apply once the sources stop changing.
                while True:
                    await asyncio.sleep(self._debounce)
                    later = await asyncio.to_thread(snapshot, self._models_dir, self._preset)
                    if later == now:
                        break
                    now = later
                last = now
                await self._apply()
        finally:
            if notifier is not None:
                notifier.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await notifier

    async def _apply(self) -> None:
        self.reloads += 1
        log.info("models dir or preset file changed: reloading")
        try:
            await self._on_change()
        except (LlamaRouterError, OSError) as exc:  # a bad preset must not end the watch
            log.error(
                "reload after a file change failed, keeping the current models: %s",
                getattr(exc, "message", exc),
            )

    def _start_inotify(self) -> asyncio.Task[None] | None:
        if self.mode != "inotify":
            return None
        import watchfiles  # optional: polling without it (checked by start())

        paths = self._paths()

        async def listen() -> None:
            try:
                async for _ in watchfiles.awatch(
                    *paths, stop_event=self._stop, debounce=50, recursive=True,
                    ignore_permission_denied=True,
                ):
                    self._wake.set()
            except (OSError, RuntimeError) as exc:  # e.g. out of inotify watches: keep polling
                log.warning("file watching unavailable (%s); polling every %gs", exc, self._poll)
                self.mode = "poll"

        return asyncio.create_task(listen(), name="watch-inotify")


def _has_watchfiles() -> bool:
    try:
        import watchfiles  # noqa: F401  (only whether it is installed)
    except ImportError:
        return False
    return True


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("model file watcher stopped: %r", task.exception())
