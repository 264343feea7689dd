"""Building and running deploy/docker/Dockerfile.cpu without a Docker daemon: buildah
builds it (chroot isolation, as root) on a Debian base made here with debootstrap, since
Docker Hub's python:3.11-slim cannot be assumed reachable; the image's entrypoint then runs
with `buildah run` as the image's user.

The host's package-index configuration is what the build uses: pip's configuration files
and PIP_* variables, merged in pip's order of precedence into one file mounted at
/etc/pip.conf, with the local files and directories it names mounted read-only at the same
paths; pip's cache is mounted too, so the llama-server wheel built on the host is reused.
The base image and buildah's layers stay in buildah's storage between runs."""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile.cpu"

BASE_IMAGE = "localhost/llamarouter-test-base:bookworm"
IMAGE = "localhost/llamarouter:cpu-test"
BUILD_STAGE_IMAGE = "localhost/llamarouter:cpu-test-build"
SUITE = "bookworm"  # Debian 12: python3 is 3.11, as in python:3.11-slim
# What python:3.11-slim has and Debian's minimal base lacks: Python with venv, and the CA
# bundle (pip and apt over https).
BASE_PACKAGES = "python3,python3-venv,ca-certificates"
DEFAULT_MIRROR = "http://deb.debian.org/debian"

#: debootstrap of the base (about 90 s here); only when the base is not in storage yet.
BASE_TIMEOUT_S = 900
#: The image build: apt-get in both stages, pip install of the package, the llama-server
#: wheel from pip's cache (a cold cache builds llama.cpp: ten minutes on two cores).
BUILD_TIMEOUT_S = 1500
#: One buildah/chroot housekeeping command (from, rm, inspect, mount).
TOOL_TIMEOUT_S = 60


class ToolMissing(Exception):
    """A tool the tier needs is missing and cannot be installed here."""


def require_tools() -> None:
    missing = [t for t in ("buildah", "debootstrap") if shutil.which(t) is None]
    if missing:
        raise ToolMissing(
            f"{' and '.join(missing)} not installed: `make container-tools` installs them "
            "(apt-get, as root)"
        )
    if os.geteuid() != 0:
        raise ToolMissing("buildah's chroot isolation and debootstrap need root")


def run(argv: list[str], timeout: float, **kw: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(  # type: ignore[call-overload]
        argv, capture_output=True, text=True, timeout=timeout, **kw
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(argv[:4])} ... exited {result.returncode}:\n"
            f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        )
    return result  # type: ignore[no-any-return]


def image_exists(name: str) -> bool:
    return subprocess.run(
        ["buildah", "inspect", "--type", "image", name],
        capture_output=True, timeout=TOOL_TIMEOUT_S,
    ).returncode == 0


# ------------------------------------------------------------------ the host's configuration
def debian_mirror() -> str:
    """The host's Debian archive for SUITE (its apt sources), else deb.debian.org."""
    sources = Path("/etc/apt/sources.list.d")
    for path in sorted(sources.glob("*.sources")) if sources.is_dir() else []:
        for stanza in path.read_text(errors="replace").split("\n\n"):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                key, _, value = line.partition(":")
                if not line.startswith("#") and value.strip():
                    fields[key.strip()] = value.strip()
            if SUITE in fields.get("Suites", "").split() and "deb" in fields.get("Types", ""):
                return fields.get("URIs", DEFAULT_MIRROR).split()[0]
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        for line in legacy.read_text(errors="replace").splitlines():
            m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m and m.group(2) == SUITE:
                return m.group(1)
    return DEFAULT_MIRROR


def _pip(*args: str) -> str:
    return run([sys.executable, "-m", "pip", *args], TOOL_TIMEOUT_S).stdout


def pip_config_files() -> list[Path]:
    """The configuration files pip reads on the host, lowest precedence first."""
    files: list[Path] = []
    for line in _pip("config", "debug").splitlines():
        m = re.match(r"\s+(/\S+), exists: True", line)
        if m:
            files.append(Path(m.group(1)))
    return files


def merged_pip_config(environ: dict[str, str]) -> configparser.RawConfigParser:
    """Every file pip reads, then the PIP_* variables, in pip's precedence order."""
    merged = configparser.RawConfigParser()
    files = pip_config_files()
    extra = environ.get("PIP_CONFIG_FILE")
    if extra and Path(extra).is_file():
        files.append(Path(extra))
    for path in files:
        one = configparser.RawConfigParser()
        one.read(path)
        for section in one.sections():
            if not merged.has_section(section):
                merged.add_section(section)
            for key, value in one.items(section):
                merged.set(section, key, value)
    for name, value in environ.items():
        if name.startswith("PIP_") and name != "PIP_CONFIG_FILE":
            if not merged.has_section("global"):
                merged.add_section("global")
            merged.set("global", name[4:].lower().replace("_", "-"), value)
    return merged


def local_paths(config: configparser.RawConfigParser) -> list[Path]:
    """Files and directories on this machine that the configuration names (find-links
    directories, file:// indexes, certificates, constraints files)."""
    found: list[Path] = []
    for section in config.sections():
        for key, value in config.items(section):
            for token in value.split():
                path = unquote(urlparse(token).path) if token.startswith("file:") else token
                if not (path.startswith("/") and Path(path).exists()):
                    continue
                # A local index's pages link to its files relative to its root (the
                # directory above .../simple), so the whole root is needed.
                index = token.startswith("file:") and key in ("index-url", "extra-index-url")
                found.append(Path(path).parent if index else Path(path))
    return sorted(set(found))


def build_volumes(workdir: Path, environ: dict[str, str]) -> list[str]:
    """buildah --volume arguments that give the build the host's pip setup and cache."""
    config = merged_pip_config(environ)
    cache = Path(_pip("cache", "dir").strip())
    if not config.has_section("global"):
        config.add_section("global")
    config.remove_option("global", "no-cache-dir")
    config.set("global", "cache-dir", str(cache))
    pip_conf = workdir / "pip.conf"
    with pip_conf.open("w") as f:
        config.write(f)
    cache.mkdir(parents=True, exist_ok=True)
    volumes = [f"{pip_conf}:/etc/pip.conf:ro", f"{cache}:{cache}"]
    volumes += [f"{p}:{p}:ro" for p in local_paths(config) if p != cache]
    return volumes


# ------------------------------------------------------------------ base and image
def build_base(workdir: Path, timings: dict[str, float]) -> None:
    """A python:3.11-slim stand-in: Debian's minimal base with Python 3.11, in storage."""
    if image_exists(BASE_IMAGE):
        timings["base (cached)"] = 0.0
        return
    start = time.monotonic()
    rootfs = workdir / "rootfs"
    run(["debootstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", SUITE,
         str(rootfs), debian_mirror()], BASE_TIMEOUT_S)
    for deb in (rootfs / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    ctr = run(["buildah", "from", "scratch"], TOOL_TIMEOUT_S).stdout.strip()
    try:
        mnt = run(["buildah", "mount", ctr], TOOL_TIMEOUT_S).stdout.strip()
        # cp -a keeps owners, modes, links and device nodes as debootstrap made them.
        run(["cp", "-a", f"{rootfs}/.", mnt], BASE_TIMEOUT_S)
        run(["buildah", "umount", ctr], TOOL_TIMEOUT_S)
        run(["buildah", "config", "--env",
             "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "--cmd", "/bin/bash", ctr], TOOL_TIMEOUT_S)
        run(["buildah", "commit", "--quiet", ctr, BASE_IMAGE], BASE_TIMEOUT_S)
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True, timeout=TOOL_TIMEOUT_S)
    shutil.rmtree(rootfs, ignore_errors=True)
    timings["base"] = time.monotonic() - start


def build_image(workdir: Path, timings: dict[str, float]) -> None:
    start = time.monotonic()
    argv = [
        "buildah", "bud", "--isolation", "chroot", "--layers", "--format", "docker",
        "-f", str(DOCKERFILE),
        "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
        # Built for this CPU, so the wheel in pip's cache (built on the host) is taken.
        "--build-arg", "LLAMA_CMAKE_ARGS=",
    ]
    for volume in build_volumes(workdir, dict(os.environ)):
        argv += ["--volume", volume]
    # The build stage tagged too: its layers (the compilers' apt-get) are then no dangling
    # images, and `buildah rmi --prune` keeps them for the next run.
    run([*argv, "--target", "build", "-t", BUILD_STAGE_IMAGE, str(ROOT)], BUILD_TIMEOUT_S)
    run([*argv, "-t", IMAGE, str(ROOT)], BUILD_TIMEOUT_S)
    timings["image"] = time.monotonic() - start


def built_image(timings: dict[str, float]) -> Iterator[str]:
    require_tools()
    with tempfile.TemporaryDirectory(prefix="llamarouter-image-") as tmp:
        build_base(Path(tmp), timings)
        build_image(Path(tmp), timings)
    yield IMAGE


def image_config(name: str) -> dict[str, Any]:
    """The image's Docker-format configuration (User, Entrypoint, Env, Healthcheck, ...)."""
    out = run(["buildah", "inspect", "--type", "image", name], TOOL_TIMEOUT_S).stdout
    config: dict[str, Any] = json.loads(out)["Docker"]["config"]
    return config


CUDA_DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
CUDA_DEPS_IMAGE = "localhost/llamarouter:cuda-deps-test"


def built_cuda_deps(timings: dict[str, float]) -> Iterator[str]:
    """The CUDA Dockerfile up to its CUDA compile (`--target deps`) on the Debian base:
    toolchain, venv and the package, the stage every later step starts from."""
    require_tools()
    with tempfile.TemporaryDirectory(prefix="llamarouter-image-") as tmp:
        build_base(Path(tmp), timings)
        start = time.monotonic()
        argv = [
            "buildah", "bud", "--isolation", "chroot", "--layers", "--format", "docker",
            "-f", str(CUDA_DOCKERFILE), "--target", "deps",
            "--build-arg", f"BUILD_BASE_IMAGE={BASE_IMAGE}",
            "--build-arg", f"RUNTIME_BASE_IMAGE={BASE_IMAGE}",
        ]
        for volume in build_volumes(Path(tmp), dict(os.environ)):
            argv += ["--volume", volume]
        run([*argv, "-t", CUDA_DEPS_IMAGE, str(ROOT)], BUILD_TIMEOUT_S)
        timings["cuda deps"] = time.monotonic() - start
    yield CUDA_DEPS_IMAGE
