"""Watch --models-dir and the preset file; apply changes as a reload does.

What changed is decided by comparing snapshots (name, size, mtime, inode of the GGUF files and
directories discovery looks at, and of the preset file), so the same rules hold whatever
wakes us: inotify on Linux (the kernel queues events on a descriptor the event loop
watches, so nothing runs until a file changes), `watchfiles` elsewhere when it is
installed, else a poll every `Timeouts.watch_poll` seconds. A change is applied once the
sources have been quiet for `Timeouts.watch_debounce` seconds, so a model still being
copied in is picked up once, complete; while it is being written its events collect in
the kernel's queue instead of waking the router for each write. A reload that fails (a
preset with an error) is logged and the current models stay, as for SIGHUP.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Iterable
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


# inotify(7): what changes a snapshot (entries created, removed, renamed, written, touched)
# and the watched directory itself going away.
_IN_MODIFY, _IN_ATTRIB, _IN_CLOSE_WRITE = 0x2, 0x4, 0x8
_IN_MOVED_FROM, _IN_MOVED_TO, _IN_CREATE, _IN_DELETE = 0x40, 0x80, 0x100, 0x200
_IN_DELETE_SELF, _IN_MOVE_SELF, _IN_ONLYDIR = 0x400, 0x800, 0x1000000
_IN_MASK = (
    _IN_MODIFY | _IN_ATTRIB | _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE
    | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF | _IN_ONLYDIR
)


class Inotify:
    """Linux inotify through libc: one non-blocking descriptor, directories added to it,
    and `wait()` for the next event. Only the event loop's own reader on the descriptor
    wakes anything, and it is registered only while someone waits."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        self._add = libc.inotify_add_watch
        self._add.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        self.fd: int = fd
        self._watched: set[str] = set()

    @staticmethod
    def open() -> Inotify | None:
        """None where there is no inotify (not Linux) or none can be had (out of instances)."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            return Inotify()
        except (OSError, AttributeError) as exc:
            log.warning("inotify unavailable: %s", exc)
            return None

    def watch(self, dirs: Iterable[str]) -> None:
        """Add every directory not watched yet (a new subdirectory of the models dir)."""
        for path in dirs:
            if path in self._watched:
                continue
            if self._add(self.fd, os.fsencode(path), _IN_MASK) < 0:
                err = ctypes.get_errno()
                if err in (errno.ENOSPC, errno.ENOMEM):
                    raise OSError(err, "out of inotify watches (fs.inotify.max_user_watches)")
                continue  # gone or unreadable: the snapshot says what discovery sees
            self._watched.add(path)

    async def wait(self) -> None:
        """Until at least one event is queued (they are left queued: `drain` takes them)."""
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(self.fd, readable)
        try:
            await ready
        finally:
            loop.remove_reader(self.fd)

    def drain(self) -> bool:
        """Read every queued event; True when there were any. Which file changed does not
        matter (a snapshot decides), so the events are only counted."""
        got = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return got
            if not data:
                return got
            got = True
            # A watched directory that went away (removed, renamed) must be watched again
            # once it is back: forget them all; `watch` re-adds what exists.
            self._watched.clear()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)


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
        self.mode = "off"  # "inotify", "watchfiles" or "poll" once started
        self.reloads = 0
        # Set once the first snapshot is taken: changes from then on are seen.
        self.watching = asyncio.Event()

    def _paths(self) -> list[Path]:
        paths = [self._models_dir] if self._models_dir is not None else []
        if self._preset is not None:
            # The directory, not the file: editors replace a file by renaming over it.
            paths.append(self._preset.parent)
        return [p for p in paths if p.is_dir()]

    def _dirs(self) -> list[str]:
        """What to watch: the models dir and its subdirectories (one level, as discovery
        scans), and the preset file's directory."""
        out: list[str] = []
        for path in self._paths():
            out.append(str(path))
            if path == self._models_dir:
                out += [
                    e.path for e in _scandir(str(path))
                    if not e.name.startswith(".") and _is_dir(e)
                ]
        return out

    def start(self) -> None:
        if self._task is not None or (self._models_dir is None and self._preset is None):
            return
        self.mode = "poll"
        if self._use_inotify and self._paths():
            if sys.platform.startswith("linux"):
                self.mode = "inotify"
            elif _has_watchfiles():
                self.mode = "watchfiles"
        log.info(
            "watching for model changes in %s (%s)",
            ", ".join(str(p) for p in (self._models_dir, self._preset) if p is not None),
            self.mode if self.mode != "poll" else f"polling every {self._poll:g}s",
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
        inotify = Inotify.open() if self.mode == "inotify" else None
        if inotify is None and self.mode == "inotify":
            self.mode = "poll"
        notifier = self._start_watchfiles()
        try:
            if inotify is not None:
                try:
                    inotify.watch(self._dirs())
                except OSError as exc:
                    log.warning("file watching unavailable (%s); polling every %gs", exc, self._poll)
                    inotify.close()
                    inotify = None
                    self.mode = "poll"
            last = await asyncio.to_thread(snapshot, self._models_dir, self._preset)
            self.watching.set()
            while not self._stop.is_set():
                if inotify is not None:
                    now = await self._next_inotify(inotify)
                    if now != last:
                        last = now
                        await self._apply()
                    continue
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
            if inotify is not None:
                inotify.close()
            if notifier is not None:
                notifier.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await notifier

    async def _next_inotify(self, inotify: Inotify) -> Snapshot:
        """Sleep until a change, then until `debounce` seconds pass without one (the
        events of a long copy pile up in the kernel meanwhile); the sources as they are."""
        await inotify.wait()
        inotify.drain()
        while True:
            await asyncio.sleep(self._debounce)
            if not inotify.drain():
                break
        inotify.watch(self._dirs())  # a directory created, or one that came back
        return await asyncio.to_thread(snapshot, self._models_dir, self._preset)

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

    def _start_watchfiles(self) -> asyncio.Task[None] | None:
        """Not Linux: watchfiles wakes the poll loop early. Its own thread looks for events
        every 50 ms, which costs a little CPU at rest; on Linux inotify is used directly."""
        if self.mode != "watchfiles":
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


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _has_watchfiles() -> bool:
    try:
        import watchfiles  # noqa: F401  (only whether it is installed)
    except ImportError:
        return False
    return True


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("model file watcher stopped: %r", task.exception())
