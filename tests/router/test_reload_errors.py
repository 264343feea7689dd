"""A SIGHUP reload that fails with something other than a configuration error (here a
corrupt Hugging Face cache entry: discovery reads refs/main as text and gets bytes that
are not UTF-8) is logged with its reason, and the router goes on serving the models it
had. Real router subprocess, fake children, no sleeps."""

from __future__ import annotations

import signal
from pathlib import Path

from tests.conftest import StartRouter
from tests.fakes.helpers import wait_for, write_fake_model
from tests.router.test_scheduling import make_models


async def test_sighup_reload_error_is_logged_and_the_router_keeps_its_models(
    tmp_path: Path, start_router: StartRouter
) -> None:
    d = make_models(tmp_path, "a")
    r = await start_router("--models-dir", str(d))
    assert set(await r.models()) == {"a"}

    # start_router points LLAMA_CACHE here; the router scans it on every reload.
    refs = tmp_path / "hf-cache" / "models--owner--repo" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_bytes(b"\xff\xfe not a commit \x80")
    write_fake_model(d / "b.gguf")  # would appear had the reload succeeded
    r.proc.send_signal(signal.SIGHUP)

    await wait_for(
        lambda: "SIGHUP: reload failed" in r.log(), 10, message="the failed reload to be logged"
    )
    line = next(x for x in r.log().splitlines() if "SIGHUP: reload failed" in x)
    assert "UnicodeDecodeError" in line, line
    assert r.proc.returncode is None
    assert set(await r.models()) == {"a"}
    status, body = await r.chat("a")
    assert status == 200, body

    # Once the cache is mended the next SIGHUP applies as usual.
    (refs / "main").unlink()
    r.proc.send_signal(signal.SIGHUP)

    async def has_b() -> bool:
        return "b" in await r.models()

    await wait_for(has_b, 10, message="the next SIGHUP to rescan the models dir")
    assert "Task exception was never retrieved" not in r.log()
