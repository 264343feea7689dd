"""A child's address is built in one place: core/childclient.py (child_host, child_url).
Everything else that speaks to a child goes through ChildClient, except the request
relay (web/relay.py, web/pool.py, web/proxy.py), which writes raw HTTP but takes the
address from there too. A module that formats `127.0.0.1:<port>` or an
`http://127.0.0.1` URL itself has grown its own way to talk to a child."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "llamarouter"

ALLOWED = {
    "core/childclient.py": "builds the address",
    "web/relay.py": "the relay",
    "web/pool.py": "the relay's raw sockets",
    "web/proxy.py": "the relay's raw HTTP",
}

# An f-string, %-format, .format or concatenation that puts a port after the loopback
# address, or a loopback URL.
_PATTERN = re.compile(r"""http://127\.0\.0\.1|127\.0\.0\.1:(?:\{|%|["']\s*(?:\+|%|\.format))""")


def test_only_the_child_client_builds_a_child_address() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel in ALLOWED:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if _PATTERN.search(line):
                offenders.append(f"llamarouter/{rel}:{number}: {line.strip()}")
    assert not offenders, "use core.childclient (ChildClient, child_url, child_host):\n" + "\n".join(offenders)


def test_the_pattern_finds_what_it_is_meant_to() -> None:
    hits = [
        'f"http://127.0.0.1:{port}/health"',
        'f"127.0.0.1:{self.port}"',
        '"127.0.0.1:%d" % port',
        '"127.0.0.1:" + str(port)',
        '"127.0.0.1:{}".format(port)',
        "'http://127.0.0.1'",
    ]
    misses = ['free_port("127.0.0.1")', "(default 127.0.0.1:8080)", '("127.0.0.1", port)']
    assert all(_PATTERN.search(h) for h in hits)
    assert not any(_PATTERN.search(m) for m in misses)
