"""docs/design.md's transition table is the code's table, row for row."""

from __future__ import annotations

import re
from pathlib import Path

from llamarouter.core.states import TRANSITIONS, State

DESIGN = Path(__file__).resolve().parents[2] / "docs" / "design.md"


def _rows() -> set[tuple[str, str]]:
    text = DESIGN.read_text()
    section = text[text.index("### Transitions"):text.index("## One owner per model")]
    rows = set()
    for line in section.splitlines():
        m = re.match(r"\|\s*`([a-z]+)`\s*\|\s*`([a-z]+)`\s*\|", line)
        if m:
            rows.add((m.group(1), m.group(2)))
    return rows


def test_design_transitions_are_the_code_transitions() -> None:
    code = {(a.value, b.value) for a, targets in TRANSITIONS.items() for b in targets}
    assert _rows() == code


def test_design_lists_every_state() -> None:
    text = DESIGN.read_text()
    section = text[text.index("## States"):text.index("### Transitions")]
    listed = set(re.findall(r"^\|\s*`([a-z]+)`", section, re.MULTILINE))
    assert listed == {s.value for s in State}
