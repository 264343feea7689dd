"""deploy/docker/Dockerfile.cpu built for real (buildah, no Docker daemon) and its image
run: the entrypoint under tini as the image's user, /livez and /readyz, a chat with a
generated model mounted at /models through the real llama-server in the image, the
HEALTHCHECK command, and SIGTERM ending the router and its children in time.

Cost: the first run on a machine makes the Debian base (about 90 s) and builds every
layer; later runs reuse both from buildah's storage (docs/deploy-docker.md has the
figures). Outside CI a machine without buildah/debootstrap or root skips, saying why; in
CI (CI set) that is a failure: `make test` installs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from llamarouter.devtools.tinymodel import write_model
from tests.container import image as img
from tests.fakes.helpers import free_port

#: Building the image (first test) plus the run below.
pytestmark = [pytest.mark.container, pytest.mark.timeout(img.BASE_TIMEOUT_S + img.BUILD_TIMEOUT_S + 300)]

#: Python start + router start inside the container (no model loads at startup).
STARTUP_S = 60.0
#: The tiny model's load and a 4-token answer on a CPU.
CHAT_S = 120.0
#: What the router is given for shutdown (--shutdown-grace and --stop-timeout) ...
GRACE_S = 5
#: ... and how long the test waits for the whole container to end after SIGTERM.
STOP_WAIT_S = 3 * GRACE_S + 15
API_KEY = "container-test-key"
UID = 10001


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    timings: dict[str, float] = {}
    try:
        yield from img.built_image(timings)
    except img.ToolMissing as exc:
        if os.environ.get("CI"):
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@dataclass
class Container:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def process(self, basename: str) -> psutil.Process:
        """The first process below `buildah run` whose executable is named basename."""
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if Path(child.exe()).name == basename:
                    return child
            except psutil.Error:
                continue
        raise AssertionError(f"no {basename} under buildah run:\n{self.output()[-3000:]}")

    def request(self, path: str, body: object = None, key: str | None = API_KEY,
                timeout: float = 10) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        req = urllib.request.Request(self.url + path, data=data, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")


def wait_until(predicate: Callable[[], object], timeout: float, what: str, c: Container) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if c.proc.poll() is not None:
            raise AssertionError(f"the container exited ({c.proc.returncode}) while waiting for {what}:\n"
                                 f"{c.output()[-4000:]}")
        try:
            result = predicate()
        except OSError as exc:  # not listening yet (URLError is an OSError)
            last = exc
        else:
            if result:
                return result
            last = result
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r}):\n"
                         f"{c.output()[-4000:]}")


def uid_of(proc: psutil.Process) -> int:
    return int(proc.uids().real)


@pytest.fixture(scope="module")
def container(image: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    config = img.image_config(image)
    models = tmp_path_factory.mktemp("container-models") / "models"
    write_model(models / "tiny.gguf", seed=1)
    models.chmod(0o755)
    log = tmp_path_factory.mktemp("container-log") / "container.log"
    name = f"llamarouter-test-{os.getpid()}"
    img.run(["buildah", "from", "--name", name, "--pull-never", image], img.TOOL_TIMEOUT_S)
    # buildah run mounts an image VOLUME's own (empty) copy over a --volume given for the
    # same path, unlike docker run: drop the declaration from this working container.
    assert "/models" in config["Volumes"]
    img.run(["buildah", "config", "--volume", "/models-", name], img.TOOL_TIMEOUT_S)
    port = free_port()
    entrypoint = config["Entrypoint"]
    assert isinstance(entrypoint, list)
    argv = [
        "buildah", "run", "--isolation", "chroot", "--user", str(config["User"]),
        "--volume", f"{models}:/models:ro",
        # Chroot isolation shares the host's network: loopback only, and a key anyway.
        "--env", "LLAMAROUTER_HOST=127.0.0.1", "--env", f"PORT={port}",
        "--env", f"LLAMAROUTER_API_KEY={API_KEY}",
        "--env", f"LLAMAROUTER_SHUTDOWN_GRACE={GRACE_S}",
        "--env", f"LLAMAROUTER_STOP_TIMEOUT={GRACE_S}",
        # No PID namespace under chroot isolation, so tini is not PID 1 as under Docker:
        # registered as a subreaper it reaps orphans all the same.
        "--env", "TINI_SUBREAPER=1",
        name, "--", *entrypoint, "-c", "256",
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    c = Container(name, proc, port, log)
    try:
        wait_until(lambda: c.request("/livez", key=None)[0] == 200, STARTUP_S, "/livez", c)
        yield c
    finally:
        if proc.poll() is None:
            for p in psutil.Process(proc.pid).children(recursive=True):
                p.kill()
            proc.kill()
            proc.wait(timeout=img.TOOL_TIMEOUT_S)
        subprocess.run(["buildah", "rm", name], capture_output=True, timeout=img.TOOL_TIMEOUT_S)


def test_image_config(image: str) -> None:
    config = img.image_config(image)
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["/usr/bin/tini", "--", "/usr/local/bin/llamarouter-entrypoint"]
    health = config["Healthcheck"]
    assert isinstance(health, dict) and "/readyz" in " ".join(health["Test"])
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["LLAMAROUTER_MODELS_DIR"] == "/models"


def test_probes_as_the_image_user(container: Container) -> None:
    assert container.request("/livez", key=None)[0] == 200
    assert container.request("/readyz", key=None)[0] == 200
    assert container.request("/models", key=None)[0] == 401  # the key from the environment
    tini = container.process("tini")
    (router,) = tini.children()
    assert "llamarouter" in " ".join(router.cmdline())
    assert uid_of(tini) == UID and uid_of(router) == UID
    # The entrypoint exec'd: no shell between tini and the router.
    assert Path(router.exe()).name.startswith("python")


def test_chat_with_a_mounted_model(container: Container) -> None:
    status, body = container.request("/models")
    assert status == 200
    assert [m["id"] for m in body["data"]] == ["tiny"]
    status, body = container.request(
        "/v1/chat/completions",
        {"model": "tiny", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        timeout=CHAT_S,
    )
    assert status == 200, body
    assert body["choices"][0]["message"]["role"] == "assistant"
    server = container.process("llama-server")
    assert uid_of(server) == UID


def test_healthcheck_command_passes(container: Container, image: str) -> None:
    health = img.image_config(image)["Healthcheck"]
    test = health["Test"]
    assert test[0] == "CMD"
    result = subprocess.run(
        ["buildah", "run", "--isolation", "chroot", "--user", f"{UID}:{UID}",
         "--env", f"PORT={container.port}", container.name, "--", *test[1:]],
        capture_output=True, text=True, timeout=img.TOOL_TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr


def test_sigterm_stops_router_and_children(container: Container) -> None:
    # Runs last in this module: it ends the container the tests above used.
    tini = container.process("tini")
    router = tini.children()[0]
    children = router.children(recursive=True)
    assert any(Path(p.exe()).name == "llama-server" for p in children)
    tini.send_signal(signal.SIGTERM)  # what `docker stop` sends to PID 1
    code = container.proc.wait(timeout=STOP_WAIT_S)
    assert code == 0, container.output()[-4000:]
    _, alive = psutil.wait_procs([tini, router, *children], timeout=1)
    assert not alive, alive
    log = container.output()
    assert "shutting down: finishing in-flight requests" in log, log[-4000:]
    assert "[tiny] stopping -> shutdown" in log, log[-4000:]
