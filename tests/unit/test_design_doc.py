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


# --------------------------------------------------------------------------- the layout
PACKAGE = DESIGN.parents[1] / "llamarouter"
_DATA_TABLES = {
    # Tables of data, not logic: the size limits do not apply to them.
    ("settings/flagtable.py", None),
}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))


def _layout_text() -> str:
    text = DESIGN.read_text()
    return text[text.index("## Layout"):text.index("## States")]


def test_the_layout_table_names_every_module_and_only_modules_that_exist() -> None:
    layout = _layout_text()
    named = {n for n in re.findall(r"`((?:[a-z]+/)*[a-z_0-9]+\.py)`", layout) if not n.startswith("tests/")}
    known = {str(p.relative_to(PACKAGE)) for p in _modules()}
    # devtools/ and web/webui/ are described as folders.
    expected = {m for m in known if not m.startswith(("devtools/", "web/webui/"))}
    assert expected - named == set(), "modules missing from design.md's layout table"
    assert named - known == set(), "design.md's layout table names modules that do not exist"


def test_no_class_over_400_lines_and_no_function_over_80() -> None:
    import ast

    too_long = []
    for path in _modules():
        rel = str(path.relative_to(PACKAGE))
        if (rel, None) in _DATA_TABLES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            assert node.end_lineno is not None
            size = node.end_lineno - node.lineno + 1
            limit = 400 if isinstance(node, ast.ClassDef) else 80
            if size > limit:
                too_long.append(f"{rel}: {node.name} has {size} lines (limit {limit})")
    assert too_long == []


def test_no_module_in_web_constructs_a_core_object() -> None:
    """The core is built by core/runtime.py; the web layer receives it. Exceptions and
    enums from the core may be named in web/ (they are values, not parts)."""
    import ast
    import importlib
    import inspect

    core_classes: set[str] = set()
    for path in sorted((PACKAGE / "core").glob("*.py")):
        module = importlib.import_module(f"llamarouter.core.{path.stem}")
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj) and obj.__module__ == module.__name__
                and not issubclass(obj, BaseException) and not issubclass(obj, __import__("enum").Enum)
            ):
                core_classes.add(name)
    built = []
    for path in sorted((PACKAGE / "web").rglob("*.py")):
        tree = ast.parse(path.read_text())
        imported = {
            alias.asname or alias.name
            for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module and "core" in node.module
            for alias in node.names
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                name = node.func.id
                if name in imported and name in core_classes:
                    built.append(f"{path.relative_to(PACKAGE)}:{node.lineno} builds {name}")
    assert built == []


def test_the_running_states_and_the_stop_reasons_are_named_once() -> None:
    """The running states are `states.RUNNING_STATES`, stop reasons `StopReason`: no module
    spells the tuple out or passes a bare reason string to stop()."""
    spelled = re.compile(r"State\.STARTING, State\.READY, State\.BACKOFF")
    bare_stop = re.compile(r"\.stop\(\s*\"")
    for path in _modules():
        text = path.read_text()
        if path.name != "states.py":  # where they are named
            assert not spelled.search(text), f"{path.name} spells out the running states"
        assert not bare_stop.search(text), f"{path.name} stops a model with a bare string"
