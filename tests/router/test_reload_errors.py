"""A corrupt Hugging Face cache entry (a refs/main that is not UTF-8 text) is skipped like
an unreadable one, at startup and on every SIGHUP reload; it used to make discovery raise,
so the router could not start and a reload failed without a word. And a reload that fails
for any reason is logged, and the router keeps the models it had. Real router subprocess,
fake children, no sleeps."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import pytest

from llamarouter.server import reload_on_signal
from tests.conftest import StartRouter, make_models
from tests.fakes.helpers import wait_for, write_fake_model


async def test_a_corrupt_cache_ref_is_skipped_at_startup_and_on_reload(
    tmp_path: Path, start_router: StartRouter
) -> None:
    d = make_models(tmp_path, "a")
    # start_router points LLAMA_CACHE here; the router scans it at startup and on reloads.
    refs = tmp_path / "hf-cache" / "models--owner--repo" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_bytes(b"\xff\xfe not a commit \x80")
    r = await start_router("--models-dir", str(d))
    assert set(await r.models()) == {"a"}

    write_fake_model(d / "b.gguf")
    r.proc.send_signal(signal.SIGHUP)

    async def has_b() -> bool:
        return "b" in await r.models()

    await wait_for(has_b, 10, message="the SIGHUP to rescan the models dir")
    status, body = await r.chat("a")
    assert status == 200, body
    assert "reload failed" not in r.log()


class _Broken:
    async def reload(self) -> None:
        raise RuntimeError("a bug in discovery")


async def test_a_reload_that_fails_unexpectedly_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    # The SIGHUP task is awaited by nobody: whatever it raises must be said at once.
    with caplog.at_level(logging.ERROR, logger="llamarouter"):
        await reload_on_signal(_Broken())  # type: ignore[arg-type]  # only reload() is used
    assert "SIGHUP: reload failed, keeping the current models: RuntimeError: a bug in discovery" in caplog.text
