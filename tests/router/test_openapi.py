"""docs/openapi.yaml is true to the code: same routes, live answers match its schemas."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from openapi_spec_validator import validate as validate_spec

from llamarouter.web.api import PROXIED_GET, PROXIED_POST
from llamarouter.core.runtime import Runtime
from llamarouter.web.app import build_app
from llamarouter.settings.childargs import ChildArgs
from llamarouter.cli import build_config
from tests import openapi_check
from tests.conftest import StartRouter
from tests.fakes.helpers import write_fake_model


def test_spec_is_valid_openapi_31_and_shipped_with_the_package() -> None:
    spec = openapi_check.spec()
    assert spec["openapi"].startswith("3.1")
    validate_spec(spec)
    packaged = Path(__file__).resolve().parents[2] / "llamarouter" / "web" / "openapi.yaml"
    assert yaml.safe_load(packaged.read_text()) == spec


def test_spec_paths_and_methods_match_registered_routes(tmp_path: Path, fake_bin: Path) -> None:
    config, discovery, table = build_config(
        ["--models-dir", str(tmp_path), "--server-bin", str(fake_bin)], {"PATH": "/usr/bin"}
    )
    app = build_app(config, Runtime(config, discovery, ChildArgs(config, table)))
    routes = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = set(openapi_check.operations())
    assert documented - routes == set(), "documented but not registered"
    proxied = {("POST", p) for p in PROXIED_POST} | {("GET", p) for p in PROXIED_GET}
    undocumented = routes - documented
    # Only proxied routes may be left out (they behave like /v1/chat/completions).
    assert undocumented <= proxied, sorted(undocumented - proxied)
    # Every router-owned route is documented.
    assert routes - proxied <= documented


async def test_live_answers_validate_against_the_spec(tmp_path: Path, start_router: StartRouter) -> None:
    d = tmp_path / "models"
    write_fake_model(d / "alpha.gguf")
    r = await start_router("--models-dir", str(d), "--max-body-bytes", "2048")
    calls: list[tuple[str, str, dict]] = [
        ("GET", "/health", {}),
        ("GET", "/v1/health", {}),
        ("GET", "/livez", {}),
        ("GET", "/readyz", {}),
        ("GET", "/readyz?model=alpha", {}),
        ("GET", "/readyz?model=nope", {}),
        ("GET", "/models", {}),
        ("GET", "/v1/models?reload=1", {}),
        ("GET", "/props", {}),
        ("GET", "/memory", {}),
        ("GET", "/openapi.json", {}),
        ("GET", "/metrics", {}),
        ("GET", "/slots", {}),
        ("POST", "/models", {"json": {}}),
        ("DELETE", "/models", {}),
        ("DELETE", "/models?model=alpha", {}),  # not from the cache: 500
        ("POST", "/models", {"json": {"model": "not-a-repo"}}),
        ("POST", "/models/load", {"json": {"model": "nope"}}),
        ("POST", "/models/load", {"data": b"x" * 4096}),
        ("POST", "/models/unload", {"json": {"model": "alpha"}}),
        ("POST", "/v1/chat/completions", {"json": {"model": "nope"}}),
        ("POST", "/v1/chat/completions", {"data": b"{bad"}),
        ("POST", "/v1/chat/completions", {"json": {"model": "alpha", "messages": [{"role": "user", "content": "x"}]}}),
        ("POST", "/models/load", {"json": {"model": "alpha"}}),
        ("GET", "/models", {}),
        ("GET", "/models/logs?model=alpha&lines=3", {}),
        ("GET", "/models/logs?model=alpha&lines=x", {}),
        ("POST", "/tokenize", {"json": {"model": "alpha", "content": "hi"}}),
        ("GET", "/", {}),
    ]
    statuses = set()
    for method, url, kw in calls:
        async with r.session.request(method, r.url + url, **kw) as resp:
            raw = await resp.read()
            ctype = resp.headers.get("Content-Type", "")
            body = json.loads(raw) if ctype.startswith("application/json") else raw.decode(errors="replace")
            path = url.split("?")[0]
            try:
                openapi_check.validate(method, path, resp.status, ctype, body)
            except Exception as exc:
                raise AssertionError(f"{method} {url} -> {resp.status} {body!r:.300}: {exc}") from exc
            statuses.add(resp.status)
    assert {200, 400, 404, 413, 500} <= statuses
    # The served document is the YAML file.
    status, served = await r.get("/openapi.json")
    assert status == 200 and served == openapi_check.spec()
