"""Tables in the docs whose source is the code: checked against it, so a changed default,
a new option or a new state breaks a test instead of misleading a reader."""

from __future__ import annotations

import re

from llamarouter.cli import SETTINGS
from llamarouter.core.states import State
from llamarouter.settings.config import RouterConfig
from tests.conftest import ROOT

DOCS = ROOT / "docs"


def _rows(doc: str) -> list[list[str]]:
    return [
        [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]  # `\|` is text
        for line in (DOCS / doc).read_text().splitlines()
        if line.startswith("|") and not line.startswith("|---")
    ]


def _default(target: str) -> object:
    cfg = RouterConfig()
    section, _, name = target.partition(".")
    # A few settings are turned into another field (a key list, say); they have no default.
    return getattr(cfg if section == "router" else getattr(cfg, section), name, None)


def test_own_options_table_lists_every_setting_with_its_default() -> None:
    rows = {r[1].strip("`"): r for r in _rows("command-line.md") if r[1].startswith("`LLAMAROUTER_")}
    documented = {env: row[0].strip("`").split()[0].strip("`") for env, row in rows.items()}
    in_code = {s.env: s.flag for s in SETTINGS}
    assert documented == in_code, "command-line.md's llamarouter options table is out of step"
    for s in SETTINGS:
        cell = rows[s.env][2]
        default = _default(s.target)
        number = re.match(r"`(-?\d+(?:\.\d+)?)`", cell)
        if number:
            assert isinstance(default, (int, float)) and float(number.group(1)) == float(default), (
                f"{s.flag}: the docs say {cell}, the code says {default!r}")
        elif s.kind == "size":
            continue  # written as a size (`1GiB`); parsed by the size parser
        elif s.kind == "bool":
            assert cell.split()[0] in ("on", "off"), (s.flag, cell)
            assert (cell.split()[0] == "on") == bool(default), (
                f"{s.flag}: the docs say {cell!r}, the code's default is {default!r}")
        else:
            assert not default or s.flag == "--server-bin" or cell == f"`{default}`", (
                f"{s.flag}: the docs say {cell!r}, the code's default is {default!r}")


def _fixed(label: str) -> str:
    for row in _rows("command-line.md"):
        if row[0].startswith(label):
            return row[1]
    raise AssertionError(f"no {label!r} row in command-line.md's fixed values")


def test_fixed_values_table_matches_the_config() -> None:
    t, limits = RouterConfig().timeouts, RouterConfig().limits
    poll = _fixed("`/health` poll while loading")
    # The per-probe limit while loading is derived from the poll interval (process.py).
    for value in (t.ready_poll, t.ready_poll * 20 + 1.0, t.hint_window, t.hint_poll):
        assert f"{value:g} s" in poll, (value, poll)
    backoff = _fixed("restart backoff")
    assert f"{t.backoff_initial:g} s" in backoff and f"{t.backoff_max:g} s" in backoff, backoff
    assert _fixed("housekeeping tick").startswith(f"{t.tick:g} s")
    assert _fixed("`/models/sse` queue").startswith(f"{limits.sse_queue} ")


def _states_in(doc: str, first_cell: str) -> set[str]:
    for row in _rows(doc):
        if row[0] == first_cell:
            return set(re.findall(r"`([a-z]+)`", row[-1])) & {"stopped", "starting", "ready",
                       "stopping", "backoff", "failed", "shutdown", "loading", "sleeping"}
    raise AssertionError(f"no {first_cell} row in {doc}")


def test_state_lists_match_the_state_machine() -> None:
    states = {s.value for s in State}
    assert _states_in("api.md", "`status.state`") == states
    assert _states_in("metrics.md", "`llamarouter_model_state`") == states
