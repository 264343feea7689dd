"""The command line's first import of aiohttp: what it leaves out, and what it leaves as it was.

Each case runs a fresh interpreter, since only the first import of aiohttp in a process
is affected (this one has imported it long ago)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llamarouter.web.mediatypes import UNKNOWN, media_type

_REPORT = """
import asyncio, json, mimetypes, os, sys
{imports}
import aiohttp, aiohttp.connector as c
import frozenlist
import asyncio.sslproto, http.client, urllib.request


async def https_error():
    async with aiohttp.ClientSession() as session:
        try:
            await session.get("https://127.0.0.1:9/")
        except Exception as exc:
            return str(exc)
    return ""


error = asyncio.run(https_error())
import uvloop
with open("/proc/self/maps") as maps:
    cxx = "libstdc++" in maps.read()
print(json.dumps({{
    "tls_contexts": [ctx is not None for ctx in (c._SSL_CONTEXT_VERIFIED, c._SSL_CONTEXT_UNVERIFIED)],
    "https_error": error,
    "stdlib_tls": [hasattr(http.client, "HTTPSConnection"), hasattr(urllib.request, "HTTPSHandler"),
                   asyncio.sslproto.ssl is not None, type(sys.modules["ssl"]).__name__],
    "frozenlist_switch": os.environ.get("FROZENLIST_NO_EXTENSIONS", "<unset>"),
    "mime_files": list(mimetypes.knownfiles),
    "compiled_frozenlist": frozenlist.FrozenList is not frozenlist.PyFrozenList,
    "cxx_runtime": cxx,
}}))
"""


def _report(imports: str, env: dict[str, str]) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", _REPORT.format(imports=imports)],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )
    return dict(json.loads(out.stdout))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FROZENLIST_NO_EXTENSIONS"}
    env.update(extra)
    return env


def test_aiohttp_through_the_command_line_builds_no_tls_context_nor_reads_mime_files() -> None:
    plain = _report("", _env())
    lean = _report("import llamarouter.cli", _env())
    assert lean["tls_contexts"] == [False, False]
    assert lean["https_error"] == "SSL is not supported."
    assert lean["mime_files"] == []
    assert plain["tls_contexts"] == [True, True]
    assert plain["mime_files"] != []


def test_the_standard_library_keeps_tls() -> None:
    assert _report("import llamarouter.cli", _env())["stdlib_tls"] == [True, True, True, "module"]


def test_aiohttp_through_the_command_line_leaves_the_cxx_runtime_unloaded() -> None:
    plain = _report("", _env())
    lean = _report("import llamarouter.cli", _env())
    assert lean["compiled_frozenlist"] is False
    assert lean["cxx_runtime"] is False
    if not plain["compiled_frozenlist"]:
        pytest.skip("this host's frozenlist has no compiled module: nothing to compare with")
    assert plain["cxx_runtime"] is True


@pytest.mark.parametrize("given", [None, "", "1"])
def test_the_environment_is_left_as_it_was(given: str | None) -> None:
    env = _env() if given is None else _env(FROZENLIST_NO_EXTENSIONS=given)
    report = _report("import llamarouter.cli", env)
    assert report["frozenlist_switch"] == ("<unset>" if given is None else given)


def test_a_process_that_imported_aiohttp_first_is_left_alone() -> None:
    report = _report("import aiohttp\nimport llamarouter.cli", _env())
    plain = _report("", _env())
    assert report["tls_contexts"] == plain["tls_contexts"] == [True, True]
    assert report["mime_files"] == plain["mime_files"]
    assert report["compiled_frozenlist"] == plain["compiled_frozenlist"]


def test_a_python_without_ssl_stays_without_it() -> None:
    code = (
        "import sys; sys.modules['ssl'] = None\n"
        "import llamarouter.lean, aiohttp.connector\n"
        "print(sys.modules['ssl'] is None, aiohttp.connector.ssl is None)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.split() == ["True", "True"]


def test_an_aiohttp_that_needs_ssl_is_imported_with_it(tmp_path: Path) -> None:
    fake = tmp_path / "aiohttp"
    fake.mkdir()
    (fake / "__init__.py").write_text("import ssl\nSSL = ssl\n")
    (fake / "web.py").write_text("from . import SSL\n")
    code = (
        "import sys, llamarouter.lean, aiohttp.web\n"
        "print(aiohttp.SSL is sys.modules['ssl'] and aiohttp.web.SSL is aiohttp.SSL)\n"
    )
    env = _env(PYTHONPATH=os.pathsep.join([str(tmp_path), *sys.path]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "True"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("index.html", "text/html"),
        ("sub/app.js", "text/javascript"),
        ("a.mjs", "text/javascript"),
        ("archive.tar.gz", "application/gzip"),
        ("x.wasm", "application/wasm"),
        ("font.woff2", "font/woff2"),
        ("PAGE.HTML", UNKNOWN),  # as llama-server: the extension's case counts
        ("model.gguf", UNKNOWN),
        ("noext", UNKNOWN),
        ("dir.d/noext", UNKNOWN),
        ("trailing.", UNKNOWN),
    ],
)
def test_media_type(name: str, expected: str) -> None:
    assert media_type(name) == expected
