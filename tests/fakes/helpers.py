"""Helpers for tests that run the fake llama-server (no pytest fixtures here).

* ``fake_server_command()``      argv prefix to start the fake directly
* ``write_fake_server_bin(dir)`` shell wrapper usable as the router's ``--server-bin``
* ``write_fake_model(path, **knobs)`` placeholder GGUF + ``<path>.fake.json`` sidecar
* ``wait_for(predicate, timeout)`` the only sanctioned way for tests to wait
* ``free_port()``                 a currently free TCP port on 127.0.0.1
* ``tool(name)``, ``run(*argv)``   a deploy check's tool (skipped when missing) and its run
* ``report(line)``                a reliability test's summary line
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from .fake_llama_server import KNOBS, SIDECAR_SUFFIX

FAKE_SERVER_SCRIPT: Path = Path(__file__).resolve().with_name("fake_llama_server.py")


def fake_server_command() -> list[str]:
    """``[python, /abs/path/fake_llama_server.py]``; append llama-server args."""
    return [sys.executable, str(FAKE_SERVER_SCRIPT)]


def write_fake_server_bin(dir: Path) -> Path:  # noqa: A002 - name fixed by the spec
    """Write an executable ``dir/fake-llama-server`` that execs the fake.

    ``exec`` keeps the PID: signals sent to the wrapper reach the fake itself.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    path = dir / "fake-llama-server"
    path.write_text(
        "#!/bin/sh\n"
        f'exec "{sys.executable}" "{FAKE_SERVER_SCRIPT}" "$@"\n'
    )
    path.chmod(0o755)
    return path


def _gguf_string(s: str) -> bytes:
    raw = s.encode()
    return struct.pack("<Q", len(raw)) + raw


def _gguf_bytes(name: str, context_length: int = 2048) -> bytes:
    """A tiny but valid GGUF v3 file: three metadata keys, no tensors."""
    GGUF_TYPE_UINT32, GGUF_TYPE_STRING = 4, 8
    kvs = [
        (b"general.architecture", GGUF_TYPE_STRING, _gguf_string("llama")),
        (b"general.name", GGUF_TYPE_STRING, _gguf_string(name)),
        (b"llama.context_length", GGUF_TYPE_UINT32, struct.pack("<I", context_length)),
    ]
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)))
    for key, typ, value in kvs:
        out += struct.pack("<Q", len(key)) + key + struct.pack("<I", typ) + value
    out += b"\0" * (-len(out) % 32)  # pad to general.alignment (32)
    return bytes(out)


def write_fake_model(path: Path, **knobs: Any) -> Path:
    """Create a placeholder model at ``path`` and its ``<path>.fake.json`` sidecar.

    The model is a minimal valid GGUF (header + ``general.architecture``,
    ``general.name``, ``llama.context_length``; no tensors) so code that
    peeks at GGUF metadata works; the fake itself never reads it.  The
    sidecar always gets (re)written with ``knobs`` (``{}`` when none), so
    calling again replaces earlier knobs.  Unknown knob names raise
    ``ValueError``.  Returns ``path``.
    """
    unknown = sorted(set(knobs) - set(KNOBS))
    if unknown:
        raise ValueError(f"unknown fake knob(s) {unknown}; known: {sorted(KNOBS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_gguf_bytes(path.stem))
    sidecar_path(path).write_text(json.dumps(knobs, indent=1, sort_keys=True) + "\n")
    return path


def sidecar_path(model: Path) -> Path:
    """The ``<model>.fake.json`` path the fake reads its knobs from."""
    model = Path(model)
    return model.with_name(model.name + SIDECAR_SUFFIX)


async def wait_for(
    predicate: Callable[[], Any] | Callable[[], Awaitable[Any]],
    timeout: float,
    interval: float = 0.01,
    *,
    message: str | None = None,
    ignore: tuple[type[BaseException], ...] = (),
) -> Any:
    """Poll ``predicate`` (sync, or async) until it returns something truthy.

    Returns that value.  Raises ``TimeoutError`` once ``timeout`` seconds have
    passed, naming the predicate (or ``message``) and its last result; a
    single slow async call is cut off at the deadline too.  Exceptions from
    the predicate propagate, except those listed in ``ignore`` which count as
    "not yet" (e.g. ``ignore=(aiohttp.ClientConnectionError,)`` while a
    server is starting).
    """
    what = message or getattr(predicate, "__qualname__", None) or repr(predicate)
    deadline = time.monotonic() + timeout
    last: Any = None
    last_exc: BaseException | None = None
    while True:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                remaining = max(deadline - time.monotonic(), 0.001)
                try:
                    result = await asyncio.wait_for(result, remaining)
                except TimeoutError:
                    if time.monotonic() >= deadline:
                        break  # our deadline cut the call off
                    raise
        except ignore as e:
            last_exc = e
        else:
            if result:
                return result
            last, last_exc = result, None
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(min(interval, max(deadline - time.monotonic(), 0)))
    detail = f"last result {last!r}"
    if last_exc is not None:
        detail = f"last error {type(last_exc).__name__}: {last_exc}"
    raise TimeoutError(f"timed out after {timeout:g}s waiting for {what} ({detail})")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]



# Tools the deploy tests run (systemd-analyze, kubectl, ...) from this venv or PATH.
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = VENV_BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} is not installed (make test installs it)"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, **kw)  # type: ignore[call-overload,no-any-return]


def report(line: str) -> None:
    """A reliability test's summary line: shown, and kept in $LLAMAROUTER_RELIABILITY_REPORT."""
    print("\n" + line)
    path = os.environ.get("LLAMAROUTER_RELIABILITY_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


__all__ = [
    "FAKE_SERVER_SCRIPT",
    "VENV_BIN",
    "fake_server_command",
    "free_port",
    "report",
    "run",
    "sidecar_path",
    "tool",
    "wait_for",
    "write_fake_model",
    "write_fake_server_bin",
]
