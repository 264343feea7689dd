"""The docs test's reading of markdown: directives, commands and expected answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.docs import doctest_blocks as db


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "doc.md"
    path.write_text(text)
    return path


def test_directives_apply_to_the_block_right_below_only(tmp_path: Path) -> None:
    doc = _write(tmp_path, (
        "<!-- doc-test: skip needs Docker; really -->\n\n```console\n$ docker ps\n```\n\n"
        "<!-- doc-test: router --api-key K -->\nprose in between\n```sh\ncurl -s x\n```\n"
        "```json\n{}\n```\n"
    ))
    first, second = db.shell_blocks(doc)  # the json block is not a shell example
    assert first.directive("skip") == "needs Docker; really"
    assert second.directives == []


def test_unknown_directive_and_skip_without_reason(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown doc-test directive"):
        db.shell_blocks(_write(tmp_path, "<!-- doc-test: skp x -->\n```sh\ncurl x\n```\n"))
    (block,) = db.shell_blocks(_write(tmp_path, "<!-- doc-test: skip -->\n```sh\ncurl x\n```\n"))
    assert block.directive("skip") == ""  # the test reports a skip without its reason


def test_expected_answers_continuations_and_prose_comments(tmp_path: Path) -> None:
    doc = _write(tmp_path, (
        "```sh\n"
        "curl -s -X POST h/models/load -d '{\"model\":\"a\"}'   # {\"success\":true}\n"
        "curl -s h/models \\\n  -H 'X: #1'\n"
        "# 401 {\"error\":{\"code\":401}}\n"
        "curl -s 'h/logs?model=a'   # last 200 lines\n"
        "curl -s h/x\n# {\"error\":{\"code\":400,\"message\":\"no\"}}\n"
        "```\n"
    ))
    load, listing, logs, err = db.commands(db.shell_blocks(doc)[0])
    assert load.has_body and load.body == {"success": True} and load.status is None
    assert listing.text == "curl -s h/models \\\n  -H 'X: #1'" and listing.status == 401
    assert not logs.has_body and logs.status is None
    assert err.status == 400  # taken from the error object


def test_console_output_lines_belong_to_their_command(tmp_path: Path) -> None:
    doc = _write(tmp_path, "```console\n$ a --x\nerror: one\n$ b\n```\n")
    a, b = db.commands(db.shell_blocks(doc)[0])
    assert (a.text, a.output, b.output) == ("a --x", ["error: one"], [])


def test_subset_matching() -> None:
    assert db.is_subset({"error": {"code": 400}}, {"error": {"code": 400, "message": "m"}, "x": 1})
    assert not db.is_subset({"error": {"code": 400}}, {"error": {"code": 404}})
    assert not db.is_subset({"a": 1}, [1])


def test_unfenced_shell_examples_are_found(tmp_path: Path) -> None:
    doc = _write(tmp_path, "text\n\n    curl -s x\n\n```sh\n    curl -s y\n```\n")
    assert db.unfenced_examples(doc) == [3]
