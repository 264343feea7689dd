"""Fuzz the router with schemathesis against docs/openapi.yaml (fake children).

Checks per generated request: no 5xx except those the spec documents for that operation
(always OpenAI-shaped), documented answers match their schemas (router-owned endpoints),
and afterwards the router process is alive and /health answers. Bounded:
LLAMAROUTER_FUZZ_EXAMPLES examples per operation (default 25; make reliability: 100),
10 s per request, one overall deadline.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections import Counter
from pathlib import Path

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.generation import GenerationMode

from tests import openapi_check
from tests.conftest import StartRouter
from tests.fakes.helpers import report, write_fake_model

pytestmark = pytest.mark.reliability

# Never-ending streams by design; covered by tests/router (sse, logs?follow=1).
SKIP = {("GET", "/models/sse")}
PROXIED_TAG = "proxied"


def _header(headers: object, name: str) -> str:
    for key, value in dict(headers).items():  # type: ignore[call-overload]
        if key.lower() == name:
            return value[0] if isinstance(value, list) else str(value)
    return ""


def _fuzz(base_url: str, examples: int, deadline: float) -> tuple[Counter[int], list[str], int]:
    schema = schemathesis.openapi.from_dict(openapi_check.spec())
    statuses: Counter[int] = Counter()
    problems: list[str] = []
    ops = 0
    http = requests.Session()
    for result in schema.get_all_operations():
        op = result.ok()
        method, path = op.method.upper(), op.path
        if (method, path) in SKIP or time.monotonic() > deadline:
            continue
        ops += 1
        documented = {int(code) for code in op.definition.raw["responses"] if code.isdigit()}
        proxied = PROXIED_TAG in op.definition.raw.get("tags", [])

        def check(case: schemathesis.Case) -> None:
            if time.monotonic() > deadline:
                return
            kwargs = {"timeout": 10}
            if (method, path) == ("GET", "/models/logs"):
                case.query = {**(case.query or {}), "follow": "0"}
            try:
                resp = case.call(base_url=base_url, session=http, **kwargs)
            except requests.RequestException as exc:
                problems.append(f"{method} {path}: {type(exc).__name__}: {exc}")
                return
            statuses[resp.status_code] += 1
            ctype = _header(resp.headers, "content-type")
            label = f"{method} {path} {case.query!r:.100} {str(case.body)!r:.100} -> {resp.status_code} {resp.text[:200]!r}"
            if resp.status_code >= 500:
                if resp.status_code not in documented:
                    problems.append("undocumented 5xx: " + label)
                elif not ctype.startswith("application/json") or "error" not in resp.json():
                    problems.append("5xx not OpenAI-shaped: " + label)
                return
            # The child's own answers (proxied 2xx, or a child's 4xx) are the child's
            # business; everything else must match the spec.
            if proxied and resp.status_code < 400:
                return
            if resp.status_code in documented:
                try:
                    body = resp.json() if ctype.startswith("application/json") else resp.text
                    openapi_check.validate(method, op.path, resp.status_code, ctype, body)
                except Exception as exc:  # noqa: BLE001
                    problems.append(f"schema mismatch ({exc}): " + label)
            elif not proxied:
                problems.append("undocumented status: " + label)

        strategy = op.as_strategy(generation_mode=GenerationMode.POSITIVE) | op.as_strategy(
            generation_mode=GenerationMode.NEGATIVE
        )
        run = settings(
            max_examples=examples, deadline=None, database=None, derandomize=True,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )(given(case=strategy)(check))
        try:
            run()
        except hypothesis.errors.Unsatisfiable:
            pass
    return statuses, problems, ops


async def test_fuzz_router_with_schemathesis(tmp_path: Path, start_router: StartRouter) -> None:
    examples = int(os.environ.get("LLAMAROUTER_FUZZ_EXAMPLES", "25"))
    d = tmp_path / "models"
    for name in ("alpha", "beta"):
        write_fake_model(d / f"{name}.gguf", tokens=3)
    r = await start_router("--models-dir", str(d), "--models-max", "1", "--max-body-bytes", "65536")
    started = time.monotonic()
    statuses, problems, ops = await asyncio.wait_for(
        asyncio.to_thread(_fuzz, r.url, examples, started + 100), 150
    )
    elapsed = time.monotonic() - started
    alive = r.proc.returncode is None
    health = (await r.get("/health"))[0] if alive else None
    report(
        f"fuzz: operations={ops} examples_per_op={examples} requests={sum(statuses.values())} "
        f"statuses={dict(sorted(statuses.items()))} problems={len(problems)} "
        f"router_alive={alive} health={health} elapsed={elapsed:.1f}s"
    )
    assert alive and health == 200, r.log()[-3000:]
    assert "unhandled error" not in r.log(), r.log()[-3000:]
    assert not problems, "\n".join(problems[:20])
    assert sum(statuses.values()) >= ops * 2
