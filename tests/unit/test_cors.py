"""CORS headers as llama-server sets them (server-http.cpp pre-routing handler), from the
settings build_config derives from its flags (common.h defaults, arg.cpp rules)."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamarouter.cli import build_config
from llamarouter.settings.config import CorsPolicy
from llamarouter.web.app import cors_headers

DEFAULT = CorsPolicy()


@pytest.mark.parametrize(
    ("policy", "origin", "allowed"),
    [
        # "*" with credentials (the default) echoes any Origin, and an empty one when absent.
        (DEFAULT, "http://app.example", "http://app.example"),
        (DEFAULT, None, ""),
        # "localhost": any port, the IPv4 and IPv6 loopback too; nothing for other hosts.
        (CorsPolicy(origins="localhost"), "http://localhost:5173", "http://localhost:5173"),
        (CorsPolicy(origins="localhost"), "https://127.0.0.1", "https://127.0.0.1"),
        (CorsPolicy(origins="localhost"), "http://[::1]:8000", "http://[::1]:8000"),
        (CorsPolicy(origins="localhost"), "http://localhost.evil.example", None),
        (CorsPolicy(origins="localhost"), "http://app.example", None),
        (CorsPolicy(origins="localhost"), None, None),
        (CorsPolicy(origins="localhost"), "not a url [", None),
        # Anything else is sent as it is, whatever the request says.
        (CorsPolicy(origins="http://a.example,http://b.example"), "http://c.example",
         "http://a.example,http://b.example"),
        (CorsPolicy(credentials=False), "http://app.example", "*"),
    ],
)
def test_allow_origin(policy: CorsPolicy, origin: str | None, allowed: str | None) -> None:
    for method in ("GET", "POST", "OPTIONS"):
        assert cors_headers(policy, method, origin).get("Access-Control-Allow-Origin") == allowed


def test_preflight_headers() -> None:
    assert cors_headers(DEFAULT, "OPTIONS", "http://x") == {
        "Access-Control-Allow-Origin": "http://x",
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
        "Access-Control-Allow-Headers": "*",
    }
    policy = CorsPolicy(methods="GET", headers="content-type", credentials=False)
    got = cors_headers(policy, "OPTIONS", None)
    assert got["Access-Control-Allow-Credentials"] == "false"
    assert (got["Access-Control-Allow-Methods"], got["Access-Control-Allow-Headers"]) == ("GET", "content-type")
    assert set(cors_headers(DEFAULT, "GET", "http://x")) == {"Access-Control-Allow-Origin"}


@pytest.fixture
def server_bin(tmp_path: Path) -> str:
    path = tmp_path / "llama-server"
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        ((), {}, DEFAULT),
        (("--cors-origins", "localhost"), {}, CorsPolicy(origins="localhost")),
        ((), {"LLAMA_ARG_CORS_ORIGINS": "http://a.example"}, CorsPolicy(origins="http://a.example")),
        (("--no-cors-credentials", "--cors-methods", "GET", "--cors-headers", "x-a"), {},
         CorsPolicy(methods="GET", headers="x-a", credentials=False)),
        # Tools, MCP servers or --agent limit the default to localhost...
        (("--tools", "all"), {}, CorsPolicy(origins="localhost")),
        (("--agent",), {}, CorsPolicy(origins="localhost")),
        (("--mcp-servers-json", "{}"), {}, CorsPolicy(origins="localhost")),
        ((), {"LLAMA_ARG_TOOLS": "read_file"}, CorsPolicy(origins="localhost")),
        # ...unless --cors-origins is given, even as "*".
        (("--tools", "all", "--cors-origins", "*"), {}, DEFAULT),
        (("--no-agent",), {}, DEFAULT),
    ],
)
def test_policy_from_flags(
    server_bin: str, tmp_path: Path, args: tuple[str, ...], env: dict[str, str], expected: CorsPolicy
) -> None:
    config, _, _ = build_config(
        ["--models-dir", str(tmp_path), "--server-bin", server_bin, *args], {"LLAMA_CACHE": str(tmp_path), **env})
    assert config.cors == expected
