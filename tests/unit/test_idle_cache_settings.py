"""Settings of keep-cache, tiered idle, default model, watching and canary; the pure parts
of sleep detection, canary scheduling, the keep-cache store and the file snapshot."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from llamarouter.cli import build_config
from llamarouter.core.kvcache import KvCache
from llamarouter.core.canary import canary_due
from llamarouter.core.childclient import ChildClient
from llamarouter.core.sleep import held_bytes, sleep_lines, sleeping_from_log
from llamarouter.core.watch import Watcher, snapshot
from llamarouter.errors import ConfigError
from llamarouter.settings.childargs import ChildArgs, keep_cache_dir
from llamarouter.settings.config import Limits, ModelSpec, RouterConfig, Timeouts
from tests.fakes.helpers import wait_for


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    exe = tmp_path / "bin" / "llama-server"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return {"PATH": str(exe.parent), "HOME": str(tmp_path)}


def config_of(argv: list[str], environ: dict[str, str]) -> RouterConfig:
    return build_config(argv, environ)[0]


# ----------------------------------------------------------------- flags and presets
def test_defaults(environ: dict[str, str]) -> None:
    c = config_of([], environ)
    assert c.limits.keep_cache is False and c.keep_cache_dir is None
    assert c.limits.sleep_idle is None and c.default_model is None
    assert c.watch is True and c.timeouts.canary_interval is None


def test_flags(environ: dict[str, str], tmp_path: Path) -> None:
    c = config_of([
        "--keep-cache", "--state-dir", str(tmp_path / "st"), "--keep-cache-budget", "2GiB",
        "--keep-cache-timeout", "5", "--sleep-idle", "300", "--default-model", "m",
        "--no-watch", "--watch-debounce", "0.5", "--canary-interval", "60", "--canary-timeout", "4",
    ], environ)
    assert c.limits.keep_cache is True and c.limits.keep_cache_budget == 2 * 1024**3
    assert c.keep_cache_dir == tmp_path / "st" / "kv-cache"  # under --state-dir by default
    assert c.timeouts.keep_cache == 5 and c.limits.sleep_idle == 300
    assert c.default_model == "m" and c.watch is False and c.timeouts.watch_debounce == 0.5
    assert c.timeouts.canary_interval == 60 and c.timeouts.canary_timeout == 4
    # None of them reaches a child's command line as such.
    assert not [a for a in c.child_extra if "keep" in a or "watch" in a or "canary" in a]


def test_flags_from_the_environment(environ: dict[str, str], tmp_path: Path) -> None:
    env = {**environ, "LLAMAROUTER_KEEP_CACHE": "1", "LLAMAROUTER_WATCH": "off",
           "LLAMAROUTER_KEEP_CACHE_DIR": str(tmp_path / "kv")}
    c = config_of([], env)
    assert c.limits.keep_cache is True and c.watch is False and c.keep_cache_dir == tmp_path / "kv"
    # The command line wins.
    assert config_of(["--no-keep-cache"], env).limits.keep_cache is False


def test_negative_values_are_refused(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="--sleep-idle must not be negative"):
        config_of(["--sleep-idle", "-1"], environ)


def test_preset_keys(environ: dict[str, str], tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "a.gguf").write_bytes(b"")
    (models / "b.gguf").write_bytes(b"")
    preset = tmp_path / "p.ini"
    preset.write_text(
        "[a]\nkeep-cache = true\nsleep-idle = 90\ncanary-interval = 30\ndefault-model = true\n"
        "[b]\nkeep-cache = false\n"
    )
    _, discovery, _ = build_config(["--models-dir", str(models), "--models-preset", str(preset)], environ)
    specs = discovery()
    a, b = specs["a"], specs["b"]
    assert (a.keep_cache, a.sleep_idle, a.canary_interval, a.default) == (True, 90, 30, True)
    assert (b.keep_cache, b.sleep_idle, b.canary_interval, b.default) == (False, None, None, False)


def test_bad_preset_value_names_the_key(environ: dict[str, str], tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "a.gguf").write_bytes(b"")
    preset = tmp_path / "p.ini"
    preset.write_text("[a]\nkeep-cache = maybe\n")
    _, discovery, _ = build_config(["--models-dir", str(models), "--models-preset", str(preset)], environ)
    with pytest.raises(ConfigError, match="keep-cache must be true/false"):
        discovery()


def test_child_argv(environ: dict[str, str], tmp_path: Path) -> None:
    config, _, table = build_config(
        ["--keep-cache-dir", str(tmp_path / "kv"), "--sleep-idle", "2.4"], environ
    )
    args = ChildArgs(config, table)
    plain = ModelSpec("owner/repo:Q4_K_M", "cache", options=(("-m", "/m.gguf"),))
    argv = args.argv(plain, 5000)
    assert argv[argv.index("--sleep-idle-seconds") + 1] == "2"  # whole seconds
    assert "--slot-save-path" not in argv  # keep-cache is off by default
    keeping = plain.with_changes(keep_cache=True, sleep_idle=7.0)
    argv = args.argv(keeping, 5000)
    path = Path(argv[argv.index("--slot-save-path") + 1])
    assert path == keep_cache_dir(config, plain.name) and path.parent == tmp_path / "kv"
    assert "/" not in path.name and ":" not in path.name
    assert argv[argv.index("--sleep-idle-seconds") + 1] == "7"
    # The model's own llama-server option wins over ours.
    own = keeping.with_changes(options=(("-m", "/m.gguf"), ("--sleep-idle-seconds", "50")))
    argv = args.argv(own, 5000)
    assert argv[argv.index("--sleep-idle-seconds") + 1] == "50"


def test_keep_cache_needs_a_directory(environ: dict[str, str]) -> None:
    config, _, table = build_config(["--keep-cache"], environ)  # no --state-dir, no dir
    argv = ChildArgs(config, table).argv(ModelSpec("a", "cli", options=(("-m", "/a.gguf"),)), 5000)
    assert "--slot-save-path" not in argv


def test_distinct_names_get_distinct_directories() -> None:
    config = RouterConfig(keep_cache_dir=Path("/kv"))
    assert keep_cache_dir(config, "a/b") != keep_cache_dir(config, "a_b")


# ----------------------------------------------------------------- sleep
def test_sleeping_from_log() -> None:
    spawn = "[llamarouter] starting: llama-server --port 1"
    enter = "srv  handle_sleeping_state: server is entering sleeping state"
    leave = "srv  handle_sleeping_state: server is exiting sleeping state"
    assert sleeping_from_log([spawn, "x", enter]) is True
    assert sleeping_from_log([spawn, enter, leave, "y"]) is False
    assert sleeping_from_log([enter, spawn, "z"]) is False  # an older child slept
    assert sleeping_from_log([]) is False
    assert sleep_lines([enter, "x", leave]) == [True, False]
    assert held_bytes(100, True) == 0 and held_bytes(100, False) == 100


# ----------------------------------------------------------------- canary
@pytest.mark.parametrize(
    ("busy", "sleeping", "now", "expect"),
    [(False, False, 100.0, True), (True, False, 100.0, False), (False, True, 100.0, False),
     (False, False, 50.0, False)],
)
def test_canary_due(busy: bool, sleeping: bool, now: float, expect: bool) -> None:
    config = RouterConfig(timeouts=Timeouts(canary_interval=30))
    spec = ModelSpec("a", "cli")
    assert canary_due(config, spec, now=now, last_canary=10, last_activity=40,
                      busy=busy, sleeping=sleeping) is expect


def test_canary_off_unless_asked() -> None:
    spec = ModelSpec("a", "cli")
    assert not canary_due(RouterConfig(), spec, now=1e9, last_canary=0, last_activity=0,
                          busy=False, sleeping=False)
    on = spec.with_changes(canary_interval=5.0)
    assert canary_due(RouterConfig(), on, now=10, last_canary=0, last_activity=0,
                      busy=False, sleeping=False)


# ----------------------------------------------------------------- keep-cache store
class FakeChild:
    """Just enough of llama-server's slot API: /props, /slots, save and restore."""

    def __init__(self, save_dir: Path) -> None:
        self.save_dir = save_dir
        self.restored: list[tuple[int, str]] = []
        self.sleeping = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/props", self.props)
        app.router.add_get("/slots", self.slots)
        app.router.add_post("/slots/{id}", self.action)
        return app

    async def props(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.sleeping})

    async def slots(self, request: web.Request) -> web.Response:
        return web.json_response([
            {"id": 0, "is_processing": False, "n_prompt_tokens": 100},
            {"id": 1, "is_processing": False, "n_prompt_tokens": 0},
            {"id": 2, "is_processing": True, "n_prompt_tokens": 50},
        ])

    async def action(self, request: web.Request) -> web.Response:
        slot = int(request.match_info["id"])
        body: dict[str, Any] = await request.json()
        if request.query["action"] == "save":
            (self.save_dir / body["filename"]).write_bytes(b"k" * 1000)
            return web.json_response({"n_saved": 100, "n_written": 1000})
        self.restored.append((slot, body["filename"]))
        return web.json_response({"n_restored": 100, "n_read": 1000})


async def serve(child: FakeChild) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(child.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # aiohttp keeps the bound socket here
    return runner, port


async def test_store_saves_only_idle_slots_with_a_prompt_and_survives_a_restart(tmp_path: Path) -> None:
    config = RouterConfig(keep_cache_dir=tmp_path / "kv", limits=Limits(keep_cache=True))
    directory = keep_cache_dir(config, "m")
    assert directory is not None
    directory.mkdir(parents=True)
    child = FakeChild(directory)
    runner, port = await serve(child)
    fingerprint = {"m": "f1"}
    try:
        async with aiohttp.ClientSession() as session:
            kv = KvCache(config, ChildClient(session), lambda n: True, fingerprint.get)
            saved = await kv.save_before_stop("m", port)
            assert [(s.slot, s.tokens, s.bytes) for s in saved] == [(0, 100, 1000)]
            record = json.loads((directory / "slot-0.json").read_text())
            assert record["fingerprint"] == "f1"

            # A new router (new store) finds the saved cache and restores it.
            kv2 = KvCache(config, ChildClient(session), lambda n: True, fingerprint.get)
            assert [(s.model, s.slot) for s in kv2.saved()] == [("m", 0)]
            assert await kv2.restore_after_ready("m", port) == 1
            assert child.restored == [(0, "slot-0.slot")]

            # The model is now started differently: the cache is dropped, not restored.
            fingerprint["m"] = "f2"
            assert await kv2.restore_after_ready("m", port) == 0
            assert kv2.saved() == [] and not (directory / "slot-0.slot").exists()
    finally:
        await runner.cleanup()


async def test_store_leaves_a_sleeping_child_alone(tmp_path: Path) -> None:
    config = RouterConfig(keep_cache_dir=tmp_path / "kv", limits=Limits(keep_cache=True))
    child = FakeChild(tmp_path)
    child.sleeping = True
    runner, port = await serve(child)
    try:
        async with aiohttp.ClientSession() as session:
            kv = KvCache(config, ChildClient(session), lambda n: True, lambda n: "f")
            assert await kv.save_before_stop("m", port) == []
    finally:
        await runner.cleanup()


async def test_store_never_raises_when_the_child_is_gone(tmp_path: Path) -> None:
    from tests.fakes.helpers import free_port

    config = RouterConfig(keep_cache_dir=tmp_path / "kv", limits=Limits(keep_cache=True),
                          timeouts=Timeouts(keep_cache=1.0))
    async with aiohttp.ClientSession() as session:
        kv = KvCache(config, ChildClient(session), lambda n: True, lambda n: "f")
        assert await kv.save_before_stop("m", free_port()) == []
        assert kv.failures == 1


# ----------------------------------------------------------------- watch
def test_snapshot_sees_models_subdirs_and_the_preset(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    preset = tmp_path / "p.ini"
    preset.write_text("")
    before = snapshot(models, preset)
    (models / "sub" / "x.gguf").write_bytes(b"1")
    after = snapshot(models, preset)
    assert before != after
    (models / ".hidden.gguf").write_bytes(b"1")
    assert snapshot(models, preset) == after  # discovery skips hidden files too
    preset.write_text("[a]\n")
    assert snapshot(models, preset) != after


@pytest.mark.parametrize("inotify", [True, False])
async def test_watcher_debounces_and_stops(tmp_path: Path, inotify: bool) -> None:
    models = tmp_path / "models"
    models.mkdir()
    calls: list[int] = []

    async def on_change() -> None:
        calls.append(len(list(models.iterdir())))

    watcher = Watcher(models, None, on_change, debounce=0.3, poll=0.05, use_inotify=inotify)
    watcher.start()
    assert watcher.mode == ("inotify" if inotify else "poll")
    try:
        await asyncio.wait_for(watcher.watching.wait(), 5)
        # Three files written one after the other: one reload, with all three there.
        for i in range(3):
            (models / f"m{i}.gguf").write_bytes(b"x")
        await wait_for(lambda: bool(calls), 10, interval=0.02)
        assert calls[0] == 3
    finally:
        await watcher.stop(5)
    assert watcher._task is not None and watcher._task.done()
    assert watcher.reloads == 1
