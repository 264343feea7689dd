"""Each setting is declared once (llamarouter/settings/declared.py): the dataclasses that
hold the values, the command-line and preset tables, --help and the docs agree with it,
so a setting added in one place and missed in another fails here."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest

from llamarouter import cli
from llamarouter.settings import declared
from llamarouter.settings.build import flag_tables
from llamarouter.settings.childargs import ChildArgs, running_options
from llamarouter.settings.config import Limits, ModelSpec, RouterConfig, Timeouts
from llamarouter.settings.declared import (
    DECLARED,
    PER_MODEL,
    PRESET_KINDS,
    SETTINGS,
    Group,
    Kind,
    Setting,
    Table,
    doc_rows,
    effective,
)
from llamarouter.settings.discovery import Discovery, Sources
from tests.conftest import ROOT

_HOLDERS: dict[Group, type] = {Group.ROUTER: RouterConfig, Group.LIMITS: Limits, Group.TIMEOUTS: Timeouts}
# The type each kind reads into; a field may also allow None where the kind's reader
# never gives it (a value that is not set keeps the field's default).
_TYPES: dict[Kind, tuple[object, ...]] = {
    Kind.STR: (str, str | None),
    Kind.PATH: (Path | None,),
    Kind.CSV: (tuple[str, ...],),
    Kind.INT: (int,),
    Kind.FLOAT: (float,),
    Kind.OPTINT: (int | None,),
    Kind.OPTFLOAT: (float | None,),
    Kind.SIZE: (int,),
    Kind.BOOL: (bool,),
}
# ModelSpec fields that come from a model's sources, not from a preset key of ours.
_FROM_SOURCES = {"name", "source", "options", "aliases", "tags", "hidden", "model_path", "input_modalities"}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _id(s: Setting[Any]) -> str:
    return s.flag or s.preset


@pytest.mark.parametrize("setting", [s for s in DECLARED if s.group is not Group.MODEL], ids=_id)
def test_every_setting_has_its_field_with_its_kinds_type(setting: Setting[Any]) -> None:
    hints = _hints(_HOLDERS[setting.group])
    assert setting.name in hints, f"{setting.flag}: {setting.target} is not a field (add it to config.py)"
    assert hints[setting.name] in _TYPES[setting.kind], (setting.flag, hints[setting.name], setting.kind)


@pytest.mark.parametrize("setting", PER_MODEL, ids=_id)
def test_every_preset_key_has_its_model_field(setting: Setting[Any]) -> None:
    hints = _hints(ModelSpec)
    field = setting.model_field
    assert field in hints, f"preset key {setting.preset}: ModelSpec.{field} is missing (add it to config.py)"
    assert setting.kind in PRESET_KINDS, (setting.preset, setting.kind)
    if setting.group is Group.MODEL:
        # A model's own key: a switch, or a count (replicas), or text its reader checks (devices).
        assert (hints[field], setting.kind) in ((bool, Kind.BOOL), (int, Kind.INT), (str | None, Kind.STR))
    else:
        # None: the model does not set it, so the router's flag applies (effective()).
        router_type = _hints(_HOLDERS[setting.group])[setting.name]
        assert hints[field] == router_type | None, (setting.preset, hints[field], router_type)
        assert _field_default(ModelSpec, field) is None


def test_every_model_field_of_ours_is_a_declared_preset_key() -> None:
    ours = {s.model_field for s in PER_MODEL}
    fields = {f.name for f in dataclasses.fields(ModelSpec)}
    assert fields - _FROM_SOURCES == ours, "a ModelSpec field without a preset key in declared.py, or the reverse"
    assert len(ours) == len(PER_MODEL), "two preset keys write one ModelSpec field"


def test_named_settings_are_declared_with_their_fields_type() -> None:
    """TTL: Setting[float | None] is what effective() returns: the field must hold it."""
    hints = typing.get_type_hints(declared)
    named = {name: value for name, value in vars(declared).items() if isinstance(value, Setting)}
    assert named, "no named settings"
    for name, setting in named.items():
        assert setting in DECLARED, f"{name} is not in DECLARED"
        (value_type,) = typing.get_args(hints[name])
        assert _hints(_HOLDERS[setting.group])[setting.name] == value_type, name
    assert {s.preset for s in named.values()} == {s.preset for s in PER_MODEL if s.group is not Group.MODEL}


def test_names_flags_and_keys_are_unique() -> None:
    for attr in ("target", "flag", "env", "preset", "model_field"):
        values = [getattr(s, attr) for s in DECLARED if s.preset or attr not in ("preset", "model_field")]
        values = [v for v in values if v and not v.startswith("model.")]
        assert len(values) == len(set(values)), attr


def _field_default(cls: type, name: str) -> object:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


# --------------------------------------------------------------------------- derived tables
def test_the_command_line_table_reads_every_flag_and_its_variable() -> None:
    cli_table, presets = flag_tables()
    for s in SETTINGS:
        opt = cli_table.by_key(s.flag)
        assert opt is not None and opt.env == s.env, s.flag
        assert opt.nargs == (0 if s.kind is Kind.BOOL else 1)
        if s.negation:
            assert cli_table.is_negation(s.negation)
        assert presets.by_key(s.flag) is None, f"{s.flag} is a router flag, not a model option"


def test_the_preset_table_knows_every_preset_key() -> None:
    _, presets = flag_tables()
    for s in PER_MODEL:
        assert presets.by_preset_key(s.preset) is not None, s.preset


def test_a_preset_sets_every_per_model_field(tmp_path: Path) -> None:
    values = {Kind.BOOL: ("true", True), Kind.FLOAT: ("7", 7.0), Kind.OPTFLOAT: ("7", 7.0), Kind.INT: ("3", 3),
              Kind.STR: ("0,1", "0,1")}
    lines = [f"{s.preset} = {values[s.kind][0]}" for s in PER_MODEL]
    preset = tmp_path / "p.ini"
    preset.write_text("[m]\nmodel = /m.gguf\n" + "\n".join(lines) + "\n")
    _, table = flag_tables()
    spec = Discovery(Sources(None, preset, None), table)()["m"]
    for s in PER_MODEL:
        assert getattr(spec, s.model_field) == values[s.kind][1], s.preset


@pytest.mark.parametrize("setting", [s for s in PER_MODEL if s.group is not Group.MODEL], ids=_id)
def test_effective_is_the_preset_key_over_the_flag(setting: Setting[Any]) -> None:
    flag_value, preset_value = (True, False) if setting.kind is Kind.BOOL else (3.0, 5.0)
    holder = _HOLDERS[setting.group]
    group_field = {Group.LIMITS: "limits", Group.TIMEOUTS: "timeouts"}[setting.group]
    config = RouterConfig(**{group_field: holder(**{setting.name: flag_value})})
    plain = ModelSpec(name="m", source="preset")
    assert effective(plain, config, setting) == flag_value
    assert effective(plain.with_changes(**{setting.model_field: preset_value}), config, setting) == preset_value
    assert effective(plain, RouterConfig(), setting) == setting.default()


def test_help_lists_every_flag_with_its_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    for s in SETTINGS:
        assert re.search(rf"^  {re.escape(s.flag)} +{re.escape(s.help)} \(env {s.env}\)$", out, re.M), s.flag


# --------------------------------------------------------------------------- docs
def _table_after(doc: str, heading: str) -> list[str]:
    lines = (ROOT / "docs" / doc).read_text().splitlines()
    at = lines.index(heading)
    header = next(i for i in range(at, len(lines)) if lines[i].startswith("|---"))
    end = next(i for i in range(header + 1, len(lines)) if not lines[i].startswith("|"))
    return lines[header + 1 : end]


@pytest.mark.parametrize("table", list(Table))
def test_command_line_doc_tables_are_the_declared_rows(table: Table) -> None:
    assert _table_after("command-line.md", f"## {table.value}") == doc_rows(table), (
        "docs/command-line.md is out of step with declared.py: run bin/gen-settings-docs")


def test_every_setting_is_in_one_doc_table() -> None:
    rows = [row for table in Table for row in doc_rows(table)]
    assert len(rows) == len(SETTINGS)


def test_the_docs_generator_has_nothing_to_change() -> None:
    run = subprocess.run([sys.executable, str(ROOT / "bin" / "gen-settings-docs"), "--check"], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_presets_doc_lists_every_preset_key_with_its_default() -> None:
    rows: dict[str, str] = {}
    for heading in ("### Preset-only keys", "## Keep-cache, tiered idle, canary and default model keys (llamarouter)"):
        for line in _table_after("presets.md", heading):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0].split()[0].strip("`")] = cells[1]
    for s in PER_MODEL:
        assert s.preset in rows, f"docs/presets.md does not list the preset key {s.preset}"
        if s.group is Group.MODEL:
            default = _field_default(ModelSpec, s.model_field)
            shown = "false" if s.kind is Kind.BOOL else "auto" if default is None else str(default)
            assert rows[s.preset] == shown, s.preset
        else:
            assert rows[s.preset].startswith(f"`{s.flag}` ("), (s.preset, rows[s.preset])


# --------------------------------------------------------------------------- the build
def test_the_build_is_typed_small_steps() -> None:
    pkg = ROOT / "llamarouter"
    for path in (pkg / "settings" / "build.py", pkg / "settings" / "declared.py", pkg / "cli.py"):
        source = path.read_text()
        assert "type: ignore" not in source, path
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                assert node.end_lineno is not None and node.end_lineno - node.lineno < 80, (path, node.name)
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None and node.end_lineno - node.lineno < 400, (path, node.name)


def test_a_childs_options_read_back_from_its_command_line_are_the_merged_ones() -> None:
    _, table = flag_tables()
    config = RouterConfig(child_options=(("-np", "3"), ("-c", "4096")), child_env=(("LLAMA_ARG_THREADS_HTTP", "9"),))
    spec = ModelSpec(name="m", source="preset", options=(("-m", "/m.gguf"), ("-np", "2")))
    args = ChildArgs(config, table)
    back = running_options(args.argv(spec, 1234), dict(config.child_env), table)
    merged = args.merged(spec)
    assert back["-np"] == merged["-np"] == "3" and back["-c"] == merged["-c"] == "4096"
    assert back["--threads-http"] == "9"  # from the environment: not on the command line
