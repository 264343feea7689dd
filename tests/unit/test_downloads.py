"""core/downloads.py without llama-server: the router-child protocol against a scripted
child, the cache clean-up after a failure, and upstream's removal rules."""

from __future__ import annotations

import asyncio
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from llamarouter.core.downloads import Downloads, _restore, _snapshot, remove_cached
from llamarouter.core.launcher import OsLauncher
from llamarouter.errors import InvalidRequest
from llamarouter.settings.config import RouterConfig, Timeouts

# A download child as llama-server runs one: reports on stdout, log on stderr, waits for
# the exit command on stdin. MODE picks what it does.
CHILD = textwrap.dedent("""
    import json, os, sys, time
    mode = os.environ["MODE"]
    repo = os.environ["LLAMA_ARG_HF_REPO"].split(":")[0]
    folder = os.path.join(os.environ["LLAMA_CACHE"], "models--" + repo.replace("/", "--"))
    def report(payload):
        sys.stdout.write("cmd_child_to_router:state:" + json.dumps({"state": "downloading", "payload": payload}) + "\\n")
        sys.stdout.flush()
    if mode == "norepo":
        sys.stderr.write("get_repo_commit: error: GET failed (404): Repository not found\\n")
        sys.stderr.flush()
        report({"result": "download_finished"})  # what llama.cpp reports for nothing
    elif mode == "crash":
        sys.stderr.write("segfault-ish\\n")
        sys.exit(3)
    else:
        os.makedirs(os.path.join(folder, "blobs"), exist_ok=True)
        open(os.path.join(folder, "blobs", "abc.downloadInProgress"), "wb").write(b"x" * 10)
        report({"url": "http://hub/x/resolve/c/m-F16.gguf", "downloaded": 10, "total": 100})
        if mode == "silent":
            time.sleep(60)
    line = sys.stdin.readline()
    if "cmd_router_to_child:exit" in line:
        report({"result": "download_failed"})
    sys.exit(0)
""")


class ScriptSpawner:
    def __init__(self, script: Path, mode: str) -> None:
        self.script = script
        self.mode = mode
        self.os = OsLauncher()

    async def spawn_commanded(self, argv: Sequence[str], env: Mapping[str, str]) -> asyncio.subprocess.Process:
        return await self.os.spawn_commanded([sys.executable, str(self.script)], {**env, "MODE": self.mode})

    def kill_group(self, pid: int) -> None:
        self.os.kill_group(pid)


def make(tmp_path: Path, mode: str, **timeouts: float) -> tuple[Downloads, list[tuple[str, str, object]]]:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    cache = tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    config = RouterConfig(
        cache_dir=cache, child_env=tuple(os.environ.items()),
        timeouts=Timeouts(stop=2.0, reap=2.0, drain=1.0, **timeouts),
    )
    events: list[tuple[str, str, object]] = []

    async def rescan() -> None:
        return None

    downloads = Downloads(
        config, ScriptSpawner(script, mode), lambda e, m, d: events.append((e, m, d)), rescan, lambda name: False,
    )
    return downloads, events


async def test_cancel_removes_the_partial_file_and_reports(tmp_path: Path) -> None:
    downloads, events = make(tmp_path, "progress")
    dl = await downloads.start("o/r:F16")
    assert events[0] == ("model_status", "o/r:F16", {"status": "downloading"})
    assert ("download_progress", "o/r:F16", {"progress": {"http://hub/x/resolve/c/m-F16.gguf": {"done": 10, "total": 100}}}) in events
    assert (tmp_path / "cache/models--o--r/blobs/abc.downloadInProgress").exists()
    assert await downloads.cancel("o/r:F16", "removed") is True
    assert dl.task is not None and dl.task.done()
    assert events[-1] == ("download_failed", "o/r:F16", {"error": "cancelled (removed)"})
    assert list((tmp_path / "cache").iterdir()) == []
    assert downloads.running == {}
    assert await downloads.cancel("o/r:F16", "again") is False


async def test_finished_with_nothing_cached_is_a_failure_with_the_reason(tmp_path: Path) -> None:
    downloads, events = make(tmp_path, "norepo")
    with pytest.raises(InvalidRequest, match=r"GET failed \(404\): Repository not found"):
        await downloads.start("o/r:F16")
    assert events[-1] == ("download_failed", "o/r:F16", {"error": "GET failed (404): Repository not found"})


async def test_a_child_that_dies_without_a_result_fails(tmp_path: Path) -> None:
    downloads, events = make(tmp_path, "crash")
    with pytest.raises(InvalidRequest, match="ended without a result"):
        await downloads.start("o/r:F16")
    assert events[-1][0] == "download_failed"


async def test_a_silent_child_is_cancelled_after_the_stall_bound(tmp_path: Path) -> None:
    downloads, events = make(tmp_path, "silent", download_stall=0.5)
    dl = await downloads.start("o/r:F16")
    assert dl.task is not None
    await asyncio.wait_for(dl.task, 10)
    assert events[-1] == ("download_failed", "o/r:F16", {"error": "no progress for 0.5 s"})
    assert list((tmp_path / "cache").iterdir()) == []


async def test_close_cancels_every_download(tmp_path: Path) -> None:
    downloads, events = make(tmp_path, "progress")
    await downloads.start("o/r:F16")
    await downloads.close()
    assert downloads.running == {}
    assert events[-1] == ("download_failed", "o/r:F16", {"error": "cancelled (router shutdown)"})
    with pytest.raises(Exception, match="shutting down"):
        await downloads.start("o/other:F16")


@pytest.mark.parametrize("name", ["", "noslash", "a/b/c", "o/r:F 16", "../x:F16"])
async def test_bad_names_are_refused_before_a_child(tmp_path: Path, name: str) -> None:
    downloads, events = make(tmp_path, "progress")
    with pytest.raises(InvalidRequest):
        await downloads.start(name)
    assert events == [] and downloads.running == {}


def _cache_with(tmp_path: Path) -> Path:
    cache = tmp_path / "hub"
    folder = cache / "models--o--r"
    snap = folder / "snapshots" / ("c" * 40)
    (folder / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("c" * 40)
    for fname, blob in (("m-F16.gguf", "b1"), ("m-Q8_0.gguf", "b2"), ("mmproj-F16.gguf", "b3")):
        (folder / "blobs" / blob).write_bytes(b"GGUF")
        (snap / fname).symlink_to(Path("../../blobs") / blob)
    return cache


def test_remove_one_tag_keeps_the_others(tmp_path: Path) -> None:
    cache = _cache_with(tmp_path)
    folder = cache / "models--o--r"
    assert remove_cached(cache, "o/r:F16") is True
    # Upstream's rule: every file whose tag is F16 (the mmproj too) and its blob.
    assert sorted(p.name for p in (folder / "snapshots").rglob("*.gguf")) == ["m-Q8_0.gguf"]
    assert sorted(p.name for p in (folder / "blobs").iterdir()) == ["b2"]
    assert remove_cached(cache, "o/r:F16") is False
    assert remove_cached(cache, "o/r") is True
    assert not folder.exists()
    assert remove_cached(cache, "o/nothing:F16") is False


def test_restore_removes_only_what_was_added(tmp_path: Path) -> None:
    cache = _cache_with(tmp_path)
    folder = cache / "models--o--r"
    before = _snapshot(folder)
    (folder / "blobs" / "new.downloadInProgress").write_bytes(b"part")
    (folder / "snapshots" / ("d" * 40)).mkdir()
    assert _restore(folder, before) == 1
    assert _snapshot(folder) == before
    fresh = cache / "models--o--fresh"
    assert _snapshot(fresh) is None
    (fresh / "blobs").mkdir(parents=True)
    (fresh / "blobs" / "x.downloadInProgress").write_bytes(b"p")
    assert _restore(fresh, None) == 1
    assert not fresh.exists()
