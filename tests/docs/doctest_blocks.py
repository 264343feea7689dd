"""Find the shell examples in README.md and docs/, and what each one expects.

A fenced block whose info string starts with ``sh``, ``console``, ``bash`` or ``shell`` is a
shell example. An HTML comment right above it (blank lines allowed in between) tells the
docs test how to treat it; readers of the rendered page never see it:

``<!-- doc-test: skip REASON -->``  not executed; the reason is required
``<!-- doc-test: serve -->``        the block is one ``llamarouter ...`` command line: it is
                                    started (with ``--port``) and serves the blocks after it
``<!-- doc-test: demo -->``         the block is ``make demo``: the router is started the way
                                    the Makefile's ``demo`` target starts it
``<!-- doc-test: router ARGS -->``  before running the block, start ``llamarouter ARGS``
``<!-- doc-test: expect-status NAME=VALUE[|VALUE] ... -->``  after the block, check each
                                    model's ``status.value`` in ``GET /models``

Several directives may share one comment, separated by ``;`` (``skip`` stands alone). Without a directive the block
is run, one command at a time, against the current router.

In ``sh`` blocks a comment that follows a command (on its line or the next) and starts with
an HTTP status and/or a JSON value is that command's expected answer: ``# 200
{"success":true}`` or ``# {"error":{"code":400,...}}``. The JSON is matched as a subset
(objects: listed keys only; ``...`` is not allowed). Other comments are prose. In
``console`` blocks, ``$ `` starts a command and the lines up to the next one are output
that must appear in what the command prints.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHELL_LANGS = frozenset({"sh", "console", "bash", "shell"})
_FENCE = re.compile(r"^(```+|~~~+)\s*([^\s`]*)(.*)$")
_DIRECTIVE = re.compile(r"<!--\s*doc-test:(.*?)-->", re.DOTALL)
_EXPECT = re.compile(r"^(?:(\d{3})\b\s*)?([\[{].*)?$")


@dataclass
class Command:
    text: str  # what bash runs (continuations joined)
    line: int
    status: int | None = None  # expected HTTP status of the command's (last) curl
    body: Any = None  # expected JSON subset of its output
    has_body: bool = False
    output: list[str] = field(default_factory=list)  # console: lines that must appear


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    directives: list[tuple[str, str]]  # (verb, argument)

    @property
    def where(self) -> str:
        return f"{self.path.name}:{self.line}"

    def directive(self, verb: str) -> str | None:
        for v, arg in self.directives:
            if v == verb:
                return arg
        return None


VERBS = frozenset({"skip", "serve", "demo", "router", "expect-status"})


def parse_directives(comment: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    stripped = " ".join(comment.split())
    first, _, rest = stripped.partition(" ")
    if first == "skip":  # the reason is free text and may hold a ";"
        return [("skip", rest)]
    for part in comment.split(";"):
        part = " ".join(part.split())
        if not part:
            continue
        verb, _, arg = part.partition(" ")
        if verb not in VERBS:
            raise ValueError(f"unknown doc-test directive {verb!r} (known: {sorted(VERBS)})")
        if verb in ("skip", "router", "expect-status") and not arg:
            raise ValueError(f"doc-test directive {verb!r} needs an argument")
        out.append((verb, arg))
    return out


def shell_blocks(path: Path) -> list[Block]:
    """Every shell block of a markdown file, with the directives right above it."""
    lines = path.read_text().splitlines()
    blocks: list[Block] = []
    pending: list[tuple[str, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        m = _FENCE.match(line)
        if m:
            fence, lang = m.group(1), m.group(2).lower()
            body: list[str] = []
            j = i + 1
            while j < len(lines) and not lines[j].startswith(fence):
                body.append(lines[j])
                j += 1
            if lang in SHELL_LANGS:
                blocks.append(Block(path, i + 1, lang, "\n".join(body), pending))
            pending = []
            i = j + 1
            continue
        if "<!--" in line and "doc-test:" in line:
            # A directive comment may span lines.
            text = line
            while "-->" not in text and i + 1 < len(lines):
                i += 1
                text += "\n" + lines[i]
            dm = _DIRECTIVE.search(text)
            if dm is None:
                raise ValueError(f"{path.name}:{i + 1}: unterminated doc-test comment")
            pending = parse_directives(dm.group(1))
        elif line.strip():
            pending = []  # a directive applies only to the block right below it
        i += 1
    return blocks


def unfenced_examples(path: Path) -> list[int]:
    """Line numbers of indented (4-space) code lines that look like shell examples: they
    would escape the docs test, so they must be fenced."""
    found = []
    in_fence = None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        m = _FENCE.match(line)
        if m:
            if in_fence is None:
                in_fence = m.group(1)
            elif line.startswith(in_fence):
                in_fence = None
            continue
        if in_fence is None and re.match(r"^( {4}|\t)(\$ )?(curl|llamarouter|make)\b", line):
            found.append(n)
    return found


def _split_comment(line: str) -> tuple[str, str | None]:
    """Split ``cmd  # comment`` at the first ``#`` that is outside quotes and follows a
    blank."""
    quote = None
    for k, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (k == 0 or line[k - 1] in " \t"):
            return line[:k].rstrip(), line[k + 1 :].strip()
    return line, None


def _apply_expectation(cmd: Command, comment: str) -> None:
    m = _EXPECT.match(comment.strip())
    if not m or not (m.group(1) or m.group(2)):
        return  # prose
    if m.group(2):
        try:
            cmd.body = json.loads(m.group(2))
        except ValueError:
            return  # prose that happens to start with a bracket
        cmd.has_body = True
    if m.group(1):
        cmd.status = int(m.group(1))
    elif cmd.has_body and isinstance(cmd.body, dict) and isinstance(cmd.body.get("error"), dict):
        cmd.status = int(cmd.body["error"]["code"])


def sh_commands(block: Block) -> list[Command]:
    cmds: list[Command] = []
    raw = block.text.splitlines()
    i = 0
    while i < len(raw):
        start = i
        line = raw[i]
        text, comment = _split_comment(line)
        while text.endswith("\\") and i + 1 < len(raw):
            i += 1
            nxt, comment = _split_comment(raw[i])
            text = text + "\n" + nxt  # bash joins the continuation
        i += 1
        if not text.strip():
            if comment is not None and cmds:
                _apply_expectation(cmds[-1], comment)  # an answer on the next line
            continue
        cmd = Command(text.strip(), block.line + 1 + start)
        if comment is not None:
            _apply_expectation(cmd, comment)
        cmds.append(cmd)
    return cmds


def console_commands(block: Block) -> list[Command]:
    cmds: list[Command] = []
    lines = block.text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ "):
            text = line[2:]
            start = i
            while text.endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text + "\n" + lines[i]
            cmds.append(Command(text.strip(), block.line + 1 + start))
        elif line.strip() and cmds:
            cmds[-1].output.append(line.strip())
        elif line.strip():
            raise ValueError(f"{block.where}: console output before any `$ ` command")
        i += 1
    return cmds


def commands(block: Block) -> list[Command]:
    return console_commands(block) if block.lang == "console" else sh_commands(block)


def is_subset(expected: Any, actual: Any) -> bool:
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and is_subset(v, actual[k]) for k, v in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(expected) <= len(actual)
            and all(is_subset(e, a) for e, a in zip(expected, actual, strict=False))
        )
    return bool(expected == actual)


def router_argv(command: str) -> list[str]:
    """``llamarouter ARGS`` -> ARGS (for serve blocks)."""
    argv = shlex.split(command.replace("\\\n", " "))
    if not argv or argv[0] != "llamarouter":
        raise ValueError(f"a serve block must be one `llamarouter ...` command, not {command!r}")
    return argv[1:]


def makefile_demo_argv(makefile: Path) -> list[str]:
    """The router arguments of the Makefile's ``demo`` recipe, with its variables set to
    their defaults (and without ``--port``, which the test picks)."""
    text = makefile.read_text()
    variables = dict(re.findall(r"^(\w+)\s*\?=\s*(.*?)\s*$", text, re.MULTILINE))
    m = re.search(r"^demo:[^\n]*\n((?:\t[^\n]*\n)+)", text, re.MULTILINE)
    if m is None:
        raise ValueError("no demo target in the Makefile")
    recipe = [ln.strip() for ln in m.group(1).splitlines() if "llamarouter" in ln]
    if len(recipe) != 1:
        raise ValueError(f"expected one llamarouter command in the demo recipe, got {recipe}")

    def expand(s: str) -> str:
        return re.sub(r"\$\((\w+)\)", lambda v: variables.get(v.group(1), ""), s)

    argv = shlex.split(expand(recipe[0]))
    argv = argv[1:]  # the venv's llamarouter script
    if "--port" in argv:
        k = argv.index("--port")
        del argv[k : k + 2]
    return argv
