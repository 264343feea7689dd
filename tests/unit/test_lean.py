"""The command line's first import of aiohttp: what it leaves out, and what it leaves as it was.

Each case runs a fresh interpreter, since only the first import of aiohttp in a process
is affected (this one has imported it long ago)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from llamarouter.web.mediatypes import UNKNOWN, media_type

_REPORT = """
import json, mimetypes, os, sys
{imports}
import aiohttp.connector as c
print(json.dumps({{
    "cas": [c._SSL_CONTEXT_VERIFIED.cert_store_stats()["x509"],
            c._SSL_CONTEXT_UNVERIFIED.cert_store_stats()["x509"]],
    "cert_file": os.environ.get("SSL_CERT_FILE", "<unset>"),
    "mime_files": list(mimetypes.knownfiles),
}}))
"""


def _report(imports: str, env: dict[str, str]) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", _REPORT.format(imports=imports)],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )
    return dict(json.loads(out.stdout))


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SSL_CERT_FILE"}
    env.update(extra)
    return env


def test_aiohttp_through_the_command_line_holds_no_ca_bundle_nor_mime_files() -> None:
    plain = _report("", _env())
    lean = _report("import llamarouter.cli", _env())
    assert lean["cas"] == [0, 0]
    assert lean["mime_files"] == []
    if plain["cas"] == [0, 0]:
        pytest.skip("this host has no CA bundle for aiohttp to load: nothing to compare with")
    assert plain["mime_files"] != []


@pytest.mark.parametrize("given", [None, "/somewhere/ca.pem"])
def test_the_environment_is_left_as_it_was(given: str | None) -> None:
    env = _env() if given is None else _env(SSL_CERT_FILE=given)
    assert _report("import llamarouter.cli", env)["cert_file"] == (given or "<unset>")


def test_a_process_that_imported_aiohttp_first_is_left_alone() -> None:
    report = _report("import aiohttp\nimport llamarouter.cli", _env())
    plain = _report("", _env())
    assert report["cas"] == plain["cas"]
    assert report["mime_files"] == plain["mime_files"]


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
