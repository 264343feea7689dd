"""deploy/docker/Dockerfile (CUDA) built as far as it goes without the CUDA toolkit: its
`deps` stage (apt toolchain, venv, the package) on the Debian base, with the base-image
arguments a mirror would use. The stages after it compile llama.cpp with nvcc and start
from nvidia/cuda images: they are not built here (no toolkit, no Docker Hub)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.container import image as img

pytestmark = [pytest.mark.container, pytest.mark.timeout(img.BASE_TIMEOUT_S + img.BUILD_TIMEOUT_S)]


@pytest.fixture(scope="module")
def deps_image() -> Iterator[str]:
    timings: dict[str, float] = {}
    try:
        yield from img.built_cuda_deps(timings)
    except img.ToolMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


def run_in(image: str, *argv: str) -> subprocess.CompletedProcess[str]:
    ctr = img.run(["buildah", "from", "--pull-never", image], img.TOOL_TIMEOUT_S).stdout.strip()
    try:
        return subprocess.run(
            ["buildah", "run", "--isolation", "chroot", ctr, "--", *argv],
            capture_output=True, text=True, timeout=img.TOOL_TIMEOUT_S,
        )
    finally:
        subprocess.run(["buildah", "rm", ctr], capture_output=True, timeout=img.TOOL_TIMEOUT_S)


def test_deps_stage_has_the_package_and_the_build_tools(deps_image: str) -> None:
    result = run_in(deps_image, "/opt/llamarouter/bin/llamarouter", "--help")
    assert result.returncode == 0 and "--models-dir" in result.stdout, result.stderr
    tools = run_in(deps_image, "sh", "-c", "command -v cmake gcc g++ git && test -x bin/install-llama-server")
    assert tools.returncode == 0, tools.stdout + tools.stderr
    # What the next stage needs and only nvidia/cuda:*-devel has.
    assert run_in(deps_image, "sh", "-c", "command -v nvcc").returncode != 0
