"""Ask the llama-server binary itself about our command line, once, at startup.

`llama-server ARGS --version` parses ARGS (and its LLAMA_ARG_* environment) exactly as a
real start would, in order, and exits at `--version` (a handler that prints the version and
exits 0) before it loads anything. So one quick run both validates every value with
llama-server's own messages and exit code, and tells the build we are running.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import CommandLineRejected, ConfigError

# "version: 0.6.0-dev (build 0, commit unknown)" (common/build-info, printed by --version)
_VERSION = re.compile(r"^version:\s*(?P<text>.*?\(build (?P<build>\d+), commit (?P<commit>[^)\s]+)\))\s*$", re.MULTILINE)


@dataclass(frozen=True)
class ServerBuild:
    version: str  # the text after "version:", e.g. "0.6.0-dev (build 0, commit unknown)"
    build_info: str  # upstream's llama_build_info(): "b<build>-<commit>"


def parse_version(output: str) -> ServerBuild | None:
    match = _VERSION.search(output)
    if match is None:
        return None
    return ServerBuild(match["text"], f"b{match['build']}-{match['commit']}")


def probe_server(
    binary: str, args: Sequence[str], environ: Mapping[str, str], timeout: float, *, complete: bool = True
) -> ServerBuild:
    """Run `binary ARGS --version`; raise CommandLineRejected with the binary's own output
    when it refuses ARGS, ConfigError when it cannot be run or does not answer in time.

    `complete=False` says the last option of ARGS lacks its value: `--version` would be
    taken as that value, so ARGS is run alone, which llama-server refuses while parsing
    ("expected value for argument"), before it starts anything."""
    try:
        done = subprocess.run(
            [binary, *args, *(("--version",) if complete else ())],
            stdin=subprocess.DEVNULL, capture_output=True, env=dict(environ), timeout=timeout, check=False,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(f"{binary} --version did not answer within {timeout:g}s") from None
    except OSError as exc:
        raise ConfigError(f"cannot run {binary}: {exc}") from None
    output = (done.stdout + done.stderr).decode("utf-8", "replace")
    if done.returncode != 0 or not complete:
        raise CommandLineRejected(output.rstrip("\n"), done.returncode if done.returncode > 0 else 1)
    build = parse_version(output)
    if build is None:
        raise ConfigError(f"{binary} --version printed no version line: {output.strip()[:200]!r}")
    return build


def list_devices(binary: str, environ: Mapping[str, str], timeout: float) -> tuple[str, ...] | None:
    """The devices the build computes on, as `llama-server --list-devices` names them
    ("CUDA0", "MTL0"...): () for a CPU-only build, None when it does not say."""
    try:
        done = subprocess.run(
            [binary, "--list-devices"],
            stdin=subprocess.DEVNULL, capture_output=True, env=dict(environ), timeout=timeout, check=False,
        )
    except (subprocess.TimeoutExpired, OSError):
        return None
    lines = (done.stdout + done.stderr).decode("utf-8", "replace").splitlines()
    if done.returncode != 0 or "Available devices:" not in [line.strip() for line in lines]:
        return None
    listed = lines[[line.strip() for line in lines].index("Available devices:") + 1:]
    names = []
    for line in listed:
        name, colon, _ = line.strip().partition(":")
        if line.startswith((" ", "\t")) and colon and name and " " not in name:
            names.append(name)
    return tuple(names)
