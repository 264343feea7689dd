"""The docs speak to readers: no paths of the machine they were written on, no internal
issue numbers, and every relative link lands on a file of the repository."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

FILES = [
    ROOT / "README.md",
    ROOT / "Makefile",
    ROOT / "config.ini.example",
    *sorted((ROOT / "docs").glob("*.md")),
]

# Home directories, scratch and build trees, a Python environment's install path: nothing
# a reader has. Deployment paths (/opt, /etc, /var/lib, /srv) are advice, not leaks.
MACHINE_PATH = re.compile(
    r"(?<![\w.])/(?:work|home|root|Users|tmp|mnt|scratch)/|site-packages|dist-packages"
)
# "issue 6", "Issue #9": internal tracker numbers. References to upstream's tracker name
# the project ("llama.cpp #18189") and stay.
ISSUE_NUMBER = re.compile(r"\bissues?\s*#?\d+", re.IGNORECASE)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _param(path: Path) -> object:
    rel = str(path.relative_to(ROOT))
    return pytest.param(path, id=rel)


@pytest.mark.parametrize("path", [_param(p) for p in FILES])
def test_no_machine_paths_or_issue_numbers(path: Path) -> None:
    bad = [
        f"{path.name}:{n}: {line.strip()}"
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if MACHINE_PATH.search(line) or ISSUE_NUMBER.search(line)
    ]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", [p for p in FILES if p.suffix == ".md"],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_stay_in_the_repository(path: Path) -> None:
    bad = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or an anchor on the same page
        file = (path.parent / target.split("#", 1)[0]).resolve()
        if not file.is_relative_to(ROOT) or not file.exists():
            bad.append(target)
    assert not bad, f"{path.name}: links that lead nowhere in the repository: {bad}"


def test_the_patterns_catch_what_they_are_for() -> None:
    assert MACHINE_PATH.search("- llama-server: `/work/main/.venv/lib/python3.11/site-packages/x`")
    assert MACHINE_PATH.search("see /home/alice/notes.md")
    assert not MACHINE_PATH.search("ExecStart=/opt/llamarouter/bin/llamarouter --models-dir /srv/models")
    assert ISSUE_NUMBER.search("| target (issue 6) |") and ISSUE_NUMBER.search("Issue #9")
    assert not ISSUE_NUMBER.search("Upstream has no idle TTL (llama.cpp #18189)")
