"""Model downloads and removals from the Hugging Face cache (`POST /models`,
`DELETE /models`), as upstream's router does them.

A download runs in a llama-server child of its own, in upstream's download mode
(`LLAMA_SERVER_ROUTER_PORT` + `LLAMA_SERVER_CHILD_MODE=download` + `LLAMA_ARG_HF_REPO`):
every hub feature the binary has (refs, trees, resumes, ETags, `HF_TOKEN`,
`MODEL_ENDPOINT`) comes from the binary itself. The child reports on stdout with
`cmd_child_to_router:state:{json}` lines and takes `cmd_router_to_child:exit` on stdin;
its end of stdin tells it the router is gone. A download takes no `--models-max` slot and
no memory budget: it is not a model until its files are in the cache.

What we add to upstream: a download that fails (unknown repo or quant, hub unreachable
or gone mid-file, no progress for `download_stall` seconds, cancelled, router shutdown)
leaves the cache as it found it; a download the binary reports as finished but that put
no model in the cache (upstream's downloader "succeeds" with nothing for an unknown repo)
is a failure with the child's own reason; `POST /models` waits for the download to
start (or fail) for up to `download_start` seconds so that a bad name is answered with
an error instead of a 200.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import InvalidRequest, LlamaRouterError, ShuttingDown
from ..settings.config import RouterConfig
from ..settings.discovery import scan_cache

log = logging.getLogger("llamarouter.downloads")

CMD_STATE = "cmd_child_to_router:state:"
CMD_EXIT = b"cmd_router_to_child:exit\n"
_LOG_KEEP = 200  # lines of a download child's log kept for its error and the dashboard

# The downloader's own words for why nothing came down (common/hf-cache.cpp, download.cpp,
# arg.cpp): the first of these in the child's log is the reason we report.
_REASONS = (
    re.compile(r"(GET failed \(\d+\): .*)"),
    re.compile(r"(HTTPLIB failed: .*)"),
    re.compile(r"(no GGUF files found in repository .*)"),
    re.compile(r"(file '.*' not found in repository)"),
    re.compile(r"(invalid repository: .*)"),
    re.compile(r"(Download '.*' failed with status code: -?\d+)"),
    re.compile(r"(download failed after \d+ attempts)"),
    re.compile(r"(download failed: .*)"),
)
_SPLIT = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", re.IGNORECASE)
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)


class Spawner(Protocol):
    async def spawn_commanded(self, argv: Sequence[str], env: Mapping[str, str]) -> asyncio.subprocess.Process: ...

    def kill_group(self, pid: int) -> None: ...


Publish = Callable[[str, str, "dict[str, object] | None"], None]


def split_repo_tag(name: str) -> tuple[str, str]:
    """`owner/repo:TAG` -> (`owner/repo`, `TAG`); no tag -> (`owner/repo`, "")."""
    repo, _, tag = name.partition(":")
    return repo, tag


def valid_repo(repo: str) -> bool:
    """upstream's is_valid_repo_id: one `/`, [A-Za-z0-9_] around any [/.-]."""
    return bool(re.fullmatch(r"[A-Za-z0-9_]+(?:[/.-][A-Za-z0-9_]+)*", repo)) and repo.count("/") == 1


def repo_dir(cache_dir: Path, repo: str) -> Path:
    return cache_dir / ("models--" + repo.replace("/", "--"))


@dataclass(eq=False)
class Download:
    name: str
    repo: str
    started_at: float  # wall clock, for the listing
    progress: dict[str, dict[str, int]] = field(default_factory=dict)
    lines: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=_LOG_KEEP))
    # Resolved once the download has begun (None) or ended first (its error, or None).
    begun: asyncio.Future[str | None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    cancelled: str | None = None  # why it was cancelled
    cancel_event: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    error: str | None = None

    def reason(self) -> str | None:
        for line in self.lines:
            for pattern in _REASONS:
                m = pattern.search(line)
                if m is not None:
                    return m.group(1).strip()
        return None

    def as_status(self) -> dict[str, Any]:
        done = sum(p.get("done", 0) for p in self.progress.values())
        total = sum(p.get("total", 0) for p in self.progress.values())
        return {"value": "downloading", "progress": {"done": done, "total": total, "files": dict(self.progress)}}


class Downloads:
    """The running downloads. `start` and `cancel` are the API's; the supervisor-facing
    callbacks are given at construction: `exists(name)` (a listed model of that name; after
    a finished download's rescan, whether it put that model in the cache), `rescan()` (the
    supervisor's reload) and `publish(event, model, data)` (`/models/sse`)."""

    def __init__(
        self,
        config: RouterConfig,
        spawner: Spawner,
        publish: Publish,
        rescan: Callable[[], Awaitable[None]],
        exists: Callable[[str], bool],
    ) -> None:
        self.config = config
        self._spawner = spawner
        self._publish = publish
        self._rescan = rescan
        self._exists = exists
        self.running: dict[str, Download] = {}
        self._closing = False

    @property
    def cache_dir(self) -> Path | None:
        return self.config.cache_dir

    # ----------------------------------------------------------------- API
    async def start(self, name: str) -> Download:
        """Begin downloading `name` (`owner/repo[:TAG]`); returns once the child reports
        its first file under way, or raises with its reason if it ends before that."""
        if self._closing:
            raise ShuttingDown("server is shutting down")
        repo, tag = split_repo_tag(name)
        if not valid_repo(repo) or (tag and not re.fullmatch(r"[A-Za-z0-9_.-]+", tag)):
            raise InvalidRequest(f"invalid model name '{name}': expected owner/repo or owner/repo:QUANT")
        if self.cache_dir is None:
            raise LlamaRouterError("downloading models needs a cache directory (LLAMA_CACHE or HOME)")
        if self._exists(name):
            raise InvalidRequest(f"model '{name}' already exists")
        if name in self.running:
            raise InvalidRequest(f"model '{name}' already exists")
        # One download per repo at a time: a failed one removes what it wrote under the
        # repo's folder, which must not be another download's files.
        if any(d.repo == repo for d in self.running.values()):
            raise InvalidRequest(f"a download from repository '{repo}' is already running")
        dl = Download(name, repo, time.time())
        self.running[name] = dl
        dl.task = asyncio.create_task(self._run(dl), name=f"download {name}")
        dl.task.add_done_callback(self._task_done)
        log.info("[download %s] starting", name)
        self._publish("model_status", name, {"status": "downloading"})
        try:
            error = await asyncio.wait_for(asyncio.shield(dl.begun), self.config.timeouts.download_start)
        except TimeoutError:
            return dl  # still fetching metadata; it goes on, its events tell the rest
        if error is not None:
            raise InvalidRequest(f"model validation failed, unable to download '{name}': {error}")
        return dl

    async def cancel(self, name: str, why: str) -> bool:
        """Cancel a running download and wait (bounded) until its child is gone and its
        partial files are removed. False if no download of that name runs."""
        dl = self.running.get(name)
        if dl is None:
            return False
        dl.cancelled = dl.cancelled or why
        dl.cancel_event.set()
        task = dl.task
        if task is not None:
            await asyncio.wait([task], timeout=self._end_bound())
        return True

    async def close(self) -> None:
        """Router exit: cancel every download, each bounded; nothing half-written stays."""
        self._closing = True
        tasks = []
        for dl in list(self.running.values()):
            dl.cancelled = dl.cancelled or "router shutdown"
            dl.cancel_event.set()
            if dl.task is not None:
                tasks.append(dl.task)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=self._end_bound())
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=self.config.timeouts.reap)

    def _end_bound(self) -> float:
        t = self.config.timeouts
        return t.download_exit + t.reap + t.drain

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("%s ended with an error: %r", task.get_name(), exc, exc_info=exc)

    # ----------------------------------------------------------------- one download
    def _argv_env(self, dl: Download) -> tuple[list[str], dict[str, str]]:
        env = dict(self.config.child_env)
        env["LLAMA_SERVER_ROUTER_PORT"] = str(self.config.port)
        env["LLAMA_SERVER_CHILD_MODE"] = "download"
        env["LLAMA_ARG_HF_REPO"] = dl.name
        if self.cache_dir is not None:
            # The cache the router lists is the one the child fills.
            env["LLAMA_CACHE"] = str(self.cache_dir)
        argv = [self.config.server_bin]
        for key, value in self.config.child_options:
            if key in ("--hf-token", "-hft"):
                argv += [key, value]
        return argv, env

    async def _run(self, dl: Download) -> None:
        assert self.cache_dir is not None
        folder = repo_dir(self.cache_dir, dl.repo)
        before = _snapshot(folder)
        ok = False
        try:
            ok = await self._child(dl)
            if ok and not dl.cancelled:
                await self._rescan()
                if not self._listed(dl):
                    ok = False
                    dl.error = dl.reason() or "the download put no model of that name in the cache"
        except Exception as exc:
            dl.error = f"{type(exc).__name__}: {exc}"
            log.exception("[download %s] failed", dl.name)
        finally:
            if not ok:
                removed = _restore(folder, before)
                if removed:
                    log.info("[download %s] removed %d partial file(s) from the cache", dl.name, removed)
            self.running.pop(dl.name, None)
            error = None if ok else (dl.cancelled and f"cancelled ({dl.cancelled})") or dl.error or "download failed"
            if not dl.begun.done():
                dl.begun.set_result(error)
            if ok:
                log.info("[download %s] finished", dl.name)
                self._publish("download_finished", dl.name, None)
            else:
                log.error("[download %s] failed: %s", dl.name, error)
                self._publish("download_failed", dl.name, {"error": error})

    def _listed(self, dl: Download) -> bool:
        if dl.name != dl.repo:
            return self._exists(dl.name)
        # No tag: the repo's default pick, listed under its own tag.
        return self._cached_tags(dl.repo) > 0

    def _cached_tags(self, repo: str) -> int:
        assert self.cache_dir is not None
        return sum(1 for m in scan_cache(self.cache_dir) if m.name.partition(":")[0] == repo)

    async def _child(self, dl: Download) -> bool:
        """Run the download child to its end. True if it reported success."""
        argv, env = self._argv_env(dl)
        t = self.config.timeouts
        proc = await asyncio.wait_for(self._spawner.spawn_commanded(argv, env), t.spawn)
        events: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue()
        readers = [
            asyncio.create_task(_pump(proc.stdout, "cmd", events), name=f"download {dl.name} reports"),
            asyncio.create_task(_pump(proc.stderr, "log", events), name=f"download {dl.name} log"),
        ]
        cancel_wait = asyncio.create_task(dl.cancel_event.wait())
        result: str | None = None
        ended = 0
        try:
            while ended < 2 and result is None:
                get = asyncio.create_task(events.get())
                done, _ = await asyncio.wait({get, cancel_wait}, timeout=t.download_stall,
                                             return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    if cancel_wait in done:
                        log.info("[download %s] cancelling (%s)", dl.name, dl.cancelled)
                        break
                    dl.error = f"no progress for {t.download_stall:g} s"
                    break
                item = get.result()
                if item is None:
                    ended += 1
                    continue
                kind, text = item
                if kind == "log":
                    dl.lines.append(text)
                    log.info("[download %s] %s", dl.name, text)
                    continue
                result = self._on_report(dl, text)
            # Done, failed, cancelled or stalled: ask it to exit (a download in flight is
            # cancelled by the same command and removes its temporary file), then make sure.
            await _ask_exit(proc)
            try:
                await asyncio.wait_for(proc.wait(), t.download_exit)
            except TimeoutError:
                # Typically blocked on a stalled transfer, where it cannot see the command.
                log.warning("[download %s] child did not exit within %.1fs; killing", dl.name, t.download_exit)
                self._spawner.kill_group(proc.pid)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), t.reap)
        finally:
            cancel_wait.cancel()
            if proc.returncode is None:
                self._spawner.kill_group(proc.pid)
                with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(proc.wait()), t.reap)
            await asyncio.wait(readers, timeout=t.drain)
            for task in readers:
                task.cancel()
            while not events.empty():  # the last lines, for the reason of a failure
                item = events.get_nowait()
                if item is not None and item[0] == "log":
                    dl.lines.append(item[1])
                    log.info("[download %s] %s", dl.name, item[1])
        if result is None and dl.error is None and not dl.cancelled:
            dl.error = dl.reason() or f"the download child ended without a result (exit code {proc.returncode})"
        if result == "download_failed" and dl.error is None:
            dl.error = dl.reason() or "download failed"
        return result == "download_finished" and not dl.cancelled

    def _on_report(self, dl: Download, text: str) -> str | None:
        """One `cmd_child_to_router:state:` line; the result word once it is the last."""
        try:
            data = json.loads(text)
            payload = data.get("payload") or {}
            state = data.get("state")
        except (ValueError, AttributeError):
            log.warning("[download %s] unreadable report: %r", dl.name, text[:200])
            return None
        if state != "downloading" or not isinstance(payload, dict):
            return None
        result = payload.get("result")
        if result in ("download_finished", "download_failed"):
            return str(result)
        url = payload.get("url")
        if isinstance(url, str) and url:
            done, total = payload.get("downloaded", 0), payload.get("total", 0)
            dl.progress[url] = {"done": int(done or 0), "total": int(total or 0)}
            if not dl.begun.done():
                dl.begun.set_result(None)
            self._publish("download_progress", dl.name, {"progress": dict(dl.progress)})
        return None


async def _pump(stream: asyncio.StreamReader | None, kind: str, out: asyncio.Queue[tuple[str, str] | None]) -> None:
    try:
        if stream is None:
            return
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line over the limit: skip it
                continue
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\r\n")
            if kind == "cmd":
                if not line.startswith(CMD_STATE):
                    continue
                line = line[len(CMD_STATE):]
            out.put_nowait((kind, line))
    finally:
        out.put_nowait(None)


async def _ask_exit(proc: asyncio.subprocess.Process) -> None:
    stdin = proc.stdin
    if stdin is None or stdin.is_closing():
        return
    with contextlib.suppress(ConnectionError, OSError):
        stdin.write(CMD_EXIT)
        await asyncio.wait_for(stdin.drain(), 1.0)


def _snapshot(folder: Path) -> set[str] | None:
    """Every path under the repo's cache folder (None: there is no folder)."""
    if not folder.exists():
        return None
    out = set()
    for root, dirs, files in os.walk(folder):
        for n in dirs + files:
            out.add(os.path.join(root, n))
    return out


def _restore(folder: Path, before: set[str] | None) -> int:
    """Remove what a failed download added under the repo's folder (all of it, if the
    folder was new). Returns how many files went."""
    if before is None:
        if not folder.exists():
            return 0
        count = sum(len(files) for _, _, files in os.walk(folder))
        shutil.rmtree(folder, ignore_errors=True)
        return count
    removed = 0
    for root, dirs, files in os.walk(folder, topdown=False):
        for n in files:
            p = os.path.join(root, n)
            if p not in before:
                with contextlib.suppress(OSError):
                    os.unlink(p)
                    removed += 1
        for n in dirs:
            p = os.path.join(root, n)
            if p not in before:
                with contextlib.suppress(OSError):
                    os.rmdir(p)
    return removed


# --------------------------------------------------------------------------- removal
def _split_tag(rel: str) -> str:
    """The quant tag of a cached GGUF path, as upstream's get_gguf_split_info reads it."""
    prefix = rel.removesuffix(".gguf")
    if prefix == rel:
        return ""
    m = _SPLIT.match(prefix)
    if m is not None:
        prefix = m.group(1)
    t = _TAG.search(prefix)
    return t.group(1).upper() if t is not None else ""


def remove_cached(cache_dir: Path, name: str) -> bool:
    """Remove a cached model as upstream's common_download_remove does: `owner/repo` the
    whole repo folder; `owner/repo:TAG` the snapshot files of that tag and the blobs no
    other snapshot file still points to. False when nothing was there to remove."""
    repo, tag = split_repo_tag(name)
    folder = repo_dir(cache_dir, repo)
    if not folder.is_dir():
        return False
    if not tag:
        shutil.rmtree(folder, ignore_errors=True)
        return True
    snapshots = folder / "snapshots"
    commits = [d for d in snapshots.iterdir() if d.is_dir()] if snapshots.is_dir() else []
    doomed = [
        p for commit in commits for p in commit.rglob("*.gguf")
        if _split_tag(p.relative_to(commit).as_posix()) == tag.upper()
    ]
    if not doomed:
        return False
    blobs = {os.path.realpath(p) for p in doomed if p.is_symlink()}
    for p in doomed:
        with contextlib.suppress(OSError):
            p.unlink()
    kept = {os.path.realpath(p) for p in snapshots.rglob("*") if p.is_symlink()}
    for blob in blobs - kept:
        with contextlib.suppress(OSError):
            os.unlink(blob)
    return True


# --------------------------------------------------------------------------- remote presets
def preset_path(cache_dir: Path, repo: str) -> Path | None:
    """The cached `preset.ini` of a repo at its current ref, if it is there."""
    folder = repo_dir(cache_dir, repo)
    try:
        commit = (folder / "refs" / "main").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    path = folder / "snapshots" / commit / "preset.ini"
    return path if re.fullmatch(r"[0-9a-fA-F]{40}", commit) and path.is_file() else None


class _PresetProbe(Downloads):
    """A download of `-hf REPO` that stops as soon as it is clearly a model repo (its
    first file is not `preset.ini`): llama-server downloads only the preset of a preset
    repo (download.cpp, common_download_get_hf_plan), so the binary decides, as it does
    when it is started with `-hf`."""

    is_preset: bool | None = None

    def _on_report(self, dl: Download, text: str) -> str | None:
        result = super()._on_report(dl, text)
        for url in dl.progress:
            if url.endswith("/preset.ini"):
                self.is_preset = True
            elif self.is_preset is None:
                self.is_preset = False
                dl.cancelled = "not a preset repo"
                dl.cancel_event.set()
        return result

    def _listed(self, dl: Download) -> bool:
        return self.cache_dir is not None and preset_path(self.cache_dir, dl.repo) is not None


async def fetch_remote_preset(config: RouterConfig, spawner: Spawner, repo: str) -> Path | None:
    """`-hf REPO` at startup: the repo's `preset.ini`, fetched into the cache by a
    llama-server download child, if the repo is a preset repo; None for a model repo (its
    files are left to the model's own child) or when the hub cannot say (the model's
    child then reports the error itself, as before)."""
    if config.cache_dir is None or not valid_repo(split_repo_tag(repo)[0]):
        return None

    async def nothing() -> None:
        return None

    probe = _PresetProbe(config, spawner, lambda e, m, d: None, nothing, lambda name: False)
    try:
        dl = await probe.start(repo)
    except LlamaRouterError as exc:
        log.info("-hf %s: not a preset repo (%s)", repo, exc.message)
        return None
    if dl.task is not None:
        await asyncio.wait([dl.task], timeout=config.timeouts.download_stall)
    if not dl.task or not dl.task.done():
        await probe.close()
        return None
    # Not seen downloading (already cached, same ETag): the cache says.
    path = preset_path(config.cache_dir, split_repo_tag(repo)[0]) if probe.is_preset is not False else None
    if path is not None:
        log.info("-hf %s holds a preset: router mode with %s", repo, path)
    return path
