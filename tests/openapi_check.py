"""Validate live answers against docs/openapi.yaml (shared by the spec and fuzz tests)."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
SPEC_PATH = ROOT / "docs" / "openapi.yaml"


@functools.cache
def spec() -> dict[str, Any]:
    return yaml.safe_load(SPEC_PATH.read_text())


def resolve(node: Any) -> Any:
    """Follow a local `$ref` (possibly chained) to the object it names."""
    while isinstance(node, dict) and "$ref" in node:
        target: Any = spec()
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = target
    return node


def operations() -> dict[tuple[str, str], dict[str, Any]]:
    """(METHOD, path) -> operation object."""
    out = {}
    for path, item in spec()["paths"].items():
        for method, op in resolve(item).items():
            if method in ("get", "post", "put", "delete", "patch", "options", "head"):
                out[(method.upper(), path)] = op
    return out


def match_operation(method: str, path: str) -> tuple[str, dict[str, Any]] | None:
    for (m, template), op in operations().items():
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if m == method and re.match(pattern, path):
            return template, op
    return None


def validate(method: str, path: str, status: int, content_type: str, body: Any) -> None:
    """Raise AssertionError unless (status, body) is what the spec documents."""
    found = match_operation(method, path)
    assert found is not None, f"{method} {path} is not in the spec"
    _, op = found
    responses = op["responses"]
    response = responses.get(str(status)) or responses.get("default")
    assert response is not None, f"{method} {path}: status {status} is not documented"
    response = resolve(response)
    media = (content_type or "").split(";")[0].strip()
    content = response.get("content", {})
    if not content:
        return
    schema_holder = content.get(media) or content.get("*/*")
    assert schema_holder is not None, f"{method} {path} {status}: content type {media!r} not documented"
    schema = schema_holder.get("schema", {})
    if media == "application/json":
        jsonschema.validate(
            body,
            {"$schema": "https://json-schema.org/draft/2020-12/schema",
             "components": spec()["components"], "allOf": [schema]},
        )
