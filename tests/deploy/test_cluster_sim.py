"""bench/cluster_sim.py: the simulation docs/deploy-kubernetes.md quotes. Its tables are
the script's output for the commands shown there; the simulated routers serve every
request once, and the two policies differ only where a choice exists."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
from pathlib import Path

from bench import cluster_sim as sim
from tests.conftest import ROOT

DOC = ROOT / "docs" / "deploy-kubernetes.md"


def output(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert sim.main(list(args)) == 0
    return out.getvalue()


def test_docs_quote_the_script_output() -> None:
    text = DOC.read_text()
    commands = re.findall(r"^\$ python -m bench\.cluster_sim(.*)$", text, re.MULTILINE)
    assert len(commands) == 3
    for args in commands:
        table = output(*shlex.split(args)).strip()
        assert table in text, f"docs/deploy-kubernetes.md is out of date for{args}:\n{table}"


def test_one_router_leaves_nothing_to_choose() -> None:
    results = json.loads(output("--routers", "1", "--requests", "300", "--json"))["results"]
    random_run, picker_run = ({k: v for k, v in r.items() if k != "policy"} for r in results)
    assert random_run == picker_run


def test_affinity_keeps_models_where_they_are_loaded() -> None:
    # As many models as slots in the pool: once each has a home the picker stops loading.
    # Before that a request for a model still loading scores 0.6 there and 0.8 on a router
    # with room (the stock rule), so a model can be loaded twice while the pool fills.
    argv = ("--models", "3", "--routers", "3", "--models-max", "1", "--requests", "1500", "--json")
    random_run, picker_run = json.loads(output(*argv))["results"]
    assert 3 <= picker_run["loads"] <= 2 * 3
    assert random_run["loads"] > 10 * picker_run["loads"]
    # Affinity no heavier than queue and cache together: ties with a full router cost loads.
    _, tied = json.loads(output(*argv, "--weights", "3,2,1"))["results"]
    assert tied["loads"] > 5 * picker_run["loads"]


def test_trace_replay_round_trip(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    generated = json.loads(output("--requests", "200", "--write-trace", str(trace), "--json"))
    lines = trace.read_text().splitlines()
    assert len(lines) == 200 and {"t", "model", "service_s"} == set(json.loads(lines[0]))
    replayed = json.loads(output("--trace", str(trace), "--json"))
    assert replayed["results"] == generated["results"]
