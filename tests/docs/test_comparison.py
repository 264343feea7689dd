"""docs/comparison.md stays in step with the code: every flag, route and metric named in
its llamarouter column exists, and what it says of downloads is what the API describes."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from tests.conftest import ROOT

DOC = ROOT / "docs" / "comparison.md"
PACKAGE = ROOT / "llamarouter"
SPEC = PACKAGE / "web" / "openapi.yaml"
PRESET_KEYS = frozenset({"ttl", "pin", "sleep-idle", "devices", "replicas", "replica-ttl"})
HEADERS = frozenset({"Retry-After"})
PROSE = frozenset({"llama-server", "model"})  # names, not claims about our code


def _llamarouter_cells() -> list[tuple[str, str]]:
    """(feature, llamarouter cell) for each row of the feature table."""
    rows = [ln for ln in DOC.read_text().splitlines() if ln.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    col = header.index("llamarouter")
    cells = []
    for row in rows[2:]:  # after the header and its |---| line
        parts = [c.strip() for c in row.strip("|").split("|")]
        assert len(parts) == len(header), f"ragged row: {row}"
        cells.append((parts[0], parts[col]))
    return cells


def _source() -> str:
    return "\n".join(p.read_text() for p in sorted(PACKAGE.rglob("*.py")))


def test_every_flag_route_and_metric_named_for_llamarouter_exists() -> None:
    source = _source()
    spec_paths = yaml.safe_load(SPEC.read_text())["paths"]
    checked = 0
    problems = []
    for feature, cell in _llamarouter_cells():
        for token in re.findall(r"`([^`]+)`", cell):
            route = re.fullmatch(r"(GET|POST|DELETE) (/[^\s?]*)(\?.*)?", token)
            if route:
                method, path = route.group(1).lower(), route.group(2)
                if method not in spec_paths.get(path, {}):
                    problems.append(f"{feature}: {token} is not in the OpenAPI description")
            elif re.fullmatch(r"--[a-z][a-z0-9-]*", token):
                if f'"{token}"' not in source:
                    problems.append(f"{feature}: no {token} flag in the code")
            elif token.startswith("llamarouter_"):
                if f'"{token}"' not in source:
                    problems.append(f"{feature}: no {token} metric in the code")
            elif re.fullmatch(r"/[\w/.-]*", token):
                if not spec_paths.get(token):
                    problems.append(f"{feature}: {token} is not in the OpenAPI description")
            elif re.fullmatch(r"SIG[A-Z]+", token):
                if f"signal.{token}" not in source:
                    problems.append(f"{feature}: no {token} handler in the code")
            elif token in PRESET_KEYS or token in HEADERS:
                if f'"{token}"' not in source:
                    problems.append(f"{feature}: {token} is not in the code")
            elif token == "Type=notify":
                if '"READY=1"' not in source:
                    problems.append(f"{feature}: the code sends no READY=1 notification")
            elif token.startswith("?") or token in PROSE:
                continue  # a query string (part of the route before it), or a plain name
            else:
                problems.append(f"{feature}: `{token}` is not a flag, route or metric; "
                                "extend this test to check it")
                continue
            checked += 1
    assert not problems, "\n".join(problems)
    assert checked >= 20, f"only {checked} claims checked: has the table lost its column?"


def test_download_claims_match_the_api_description() -> None:
    spec_paths = yaml.safe_load(SPEC.read_text())["paths"]
    cells = dict(_llamarouter_cells())
    assert "`POST /models` downloads" in cells["Downloading models"]
    for method in ("post", "delete"):
        op = spec_paths["/models"][method]
        assert "not supported" not in op["summary"].lower()
        assert "200" in op["responses"]


def test_preset_keys_named_for_llamarouter_are_read() -> None:
    cells = dict(_llamarouter_cells())
    settings = "\n".join(p.read_text() for p in sorted((PACKAGE / "settings").glob("*.py")))
    for feature, key in (("Keep a model loaded", "pin"), ("Idle unload", "ttl")):
        assert f"preset `{key}`" in cells[feature] or f"`{key}` in the preset" in cells[feature]
        assert f'"{key}"' in settings, f"no preset key {key!r} in the settings code"


def test_doc_file_exists_and_is_linked() -> None:
    assert isinstance(DOC, Path) and DOC.is_file()
    assert "comparison.md" in (ROOT / "docs" / "README.md").read_text()
