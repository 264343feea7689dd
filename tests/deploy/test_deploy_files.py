"""The shipped deployment files pass their tools' own checks (systemd-analyze verify,
hadolint, kubernetes-validate), and the container entrypoint builds the right command.

The tools come from `make test` (venv extras + systemd via apt); outside CI a missing one
skips its test, in CI (CI=true) it fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.fakes.helpers import VENV_BIN, run, tool

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


# ------------------------------------------------------------------------- systemd
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    unit = (DEPLOY / "systemd" / "llamarouter.service").read_text()
    assert "ExecStart=/usr/local/bin/llamarouter " in unit
    # verify checks that ExecStart's binary exists: point it at the one this venv has.
    binary = VENV_BIN / "llamarouter"
    assert binary.exists()
    copy = tmp_path / "llamarouter.service"
    copy.write_text(unit.replace("/usr/local/bin/llamarouter", str(binary)))
    result = run(analyze, "verify", str(copy))
    # Unknown keys and bad values are only warnings (exit 0): any output is a failure.
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), (
        result.stdout + result.stderr
    )


def test_systemd_unit_settings() -> None:
    lines = {
        line.strip()
        for line in (DEPLOY / "systemd" / "llamarouter.service").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    for want in (
        "Type=notify", "KillMode=mixed", "WatchdogSec=30", "Restart=on-failure",
        "StateDirectory=llamarouter llamarouter/state llamarouter/models llamarouter/cache",
        "--state-dir /var/lib/llamarouter/state \\",
        "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=read-only",
        "PrivateTmp=yes", "Environment=LLAMAROUTER_LOG_LEVEL=INFO",
        "DeviceAllow=char-nvidia* rw", "SupplementaryGroups=video render",
        # The router above its children, the children at normal priority.
        "Nice=-5", "--child-nice 5",
        # Connections, pipes and the UI's open files, well past systemd's default 1024.
        "LimitNOFILE=65536",
    ):
        assert want in lines, want
    assert not any(line.startswith("PrivateDevices=yes") for line in lines)
    stop = next(int(line.split("=")[1]) for line in lines if line.startswith("TimeoutStopSec="))
    grace = next(line for line in lines if line.startswith("--shutdown-grace"))
    assert stop > int(grace.split()[1]) + 10  # grace + stop-timeout


def test_unit_flags_are_accepted() -> None:
    # The unit's ExecStart flags are ones the CLI really parses (no typos to find at boot).
    from llamarouter.cli import build_config

    config, _, _ = build_config(
        ["--models-dir", "/var/lib/llamarouter/models", "--state-dir", "/var/lib/llamarouter",
         "--host", "127.0.0.1", "--port", "8080", "--models-max", "2",
         "--shutdown-grace", "30", "--stop-timeout", "10", "--server-bin", sys.executable],
        {},
    )
    assert config.timeouts.shutdown_grace == 30 and config.timeouts.stop == 10


# ------------------------------------------------------------------------- docker
@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_dockerfiles_lint_clean(name: str) -> None:
    hadolint = tool("hadolint")
    result = run(hadolint, "--no-color", str(DEPLOY / "docker" / name))
    assert result.returncode == 0, result.stdout + result.stderr
    text = (DEPLOY / "docker" / name).read_text()
    assert "HEALTHCHECK" in text and "/readyz" in text and "USER 10001" in text
    assert "ENTRYPOINT" in text and "llamarouter-entrypoint" in text


def test_compose_reserves_nvidia_gpus() -> None:
    compose = yaml.safe_load((DEPLOY / "docker" / "compose.yaml").read_text())
    svc = compose["services"]["llamarouter"]
    devices = svc["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}]
    assert (DEPLOY / "docker" / svc["build"]["dockerfile"].split("/")[-1]).exists()


@pytest.fixture
def stub_path(tmp_path: Path) -> str:
    """PATH with a stub `llamarouter` that prints its pid and argv, one per line."""
    stub = tmp_path / "stubbin" / "llamarouter"
    stub.parent.mkdir()
    stub.write_text('#!/bin/sh\necho "$$"\nfor a in "$@"; do echo "$a"; done\n')
    stub.chmod(0o755)
    return f"{stub.parent}:{os.environ.get('PATH', '/usr/bin:/bin')}"


def entrypoint(path: str, env: dict[str, str], *args: str) -> tuple[int, list[str], str, int]:
    clean = {"PATH": path, **env}
    proc = subprocess.Popen(
        ["sh", str(DEPLOY / "docker" / "entrypoint.sh"), *args],
        env=clean, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    out, err = proc.communicate(timeout=30)
    lines = out.splitlines()
    return proc.returncode, lines[1:], err, int(lines[0]) if lines else proc.pid


def test_entrypoint_maps_env_and_execs(stub_path: str) -> None:
    assert os.access(DEPLOY / "docker" / "entrypoint.sh", os.X_OK)  # run directly by tini
    env = {"LLAMAROUTER_MODELS_DIR": "/data/models", "PORT": "9000",
           "LLAMAROUTER_API_KEY": "k1,k2", "LLAMAROUTER_MODELS_MAX": "3"}
    proc = subprocess.Popen(
        ["sh", str(DEPLOY / "docker" / "entrypoint.sh"), "-ngl", "99"],
        env={"PATH": stub_path, **env}, stdout=subprocess.PIPE, text=True,
    )
    out, _ = proc.communicate(timeout=30)
    lines = out.splitlines()
    assert proc.returncode == 0
    assert int(lines[0]) == proc.pid  # exec'd: the router gets the container's signals
    assert lines[1:] == [
        "--models-dir", "/data/models", "--host", "0.0.0.0", "--port", "9000",
        "-ngl", "99", "--models-max", "3", "--api-key", "k1,k2",
    ]


def test_entrypoint_defaults_and_key_file(stub_path: str, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("k\n")
    code, argv, _, _ = entrypoint(stub_path, {"LLAMAROUTER_API_KEY_FILE": str(keys)})
    assert code == 0
    assert argv == ["--models-dir", "/models", "--host", "0.0.0.0", "--port", "8080",
                    "--api-key-file", str(keys)]
    code, _, err, _ = entrypoint(stub_path, {"LLAMAROUTER_API_KEY_FILE": str(tmp_path / "none")})
    assert code == 64 and "not readable" in err


@pytest.mark.parametrize(
    ("env", "args", "ok"),
    [
        ({}, (), False),
        ({"LLAMAROUTER_ALLOW_NO_API_KEY": "1"}, (), True),
        ({"LLAMAROUTER_ALLOW_NO_API_KEY": "yes"}, (), False),
        ({"LLAMAROUTER_HOST": "127.0.0.1"}, (), True),
        ({}, ("--api-key", "k"), True),
        ({}, ("--api-key-file=/run/secrets/k",), True),
        ({"LLAMA_API_KEY": "k"}, (), True),
    ],
)
def test_entrypoint_requires_a_key_when_public(
    stub_path: str, env: dict[str, str], args: tuple[str, ...], ok: bool
) -> None:
    code, argv, err, _ = entrypoint(stub_path, env, *args)
    if ok:
        assert code == 0 and "--host" in argv, err
    else:
        assert code == 64 and "without an API key" in err and not argv


# ------------------------------------------------------------------------- kubernetes
K8S = DEPLOY / "kubernetes"


def test_kubernetes_core_objects_validate_strictly() -> None:
    validate = tool("kubernetes-validate")
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = [str(K8S / name) for name in kustomization["resources"]]
    assert {Path(f).name for f in files} == {"deployment.yaml", "service.yaml", "pvc.yaml"}
    # --strict also rejects unknown fields (a misspelt probe key would be silently ignored).
    result = run(validate, "--strict", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == len(files), result.stdout


def test_servicemonitor_crd_is_well_formed() -> None:
    # kubernetes-validate has no schemas for CRDs (it only warns): check it by hand against
    # the Service it must select.
    validate = tool("kubernetes-validate")
    path = K8S / "servicemonitor.yaml"
    result = run(validate, str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    mon = yaml.safe_load(path.read_text())
    svc = yaml.safe_load((K8S / "service.yaml").read_text())
    assert mon["apiVersion"] == "monitoring.coreos.com/v1" and mon["kind"] == "ServiceMonitor"
    selector = mon["spec"]["selector"]["matchLabels"]
    assert selector.items() <= svc["metadata"]["labels"].items()
    (endpoint,) = mon["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in svc["spec"]["ports"]}


def test_deployment_probes_and_shutdown_budget() -> None:
    dep = yaml.safe_load((K8S / "deployment.yaml").read_text())
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["startupProbe"]["httpGet"]["path"] == "/livez"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e.get("value") for e in c["env"]}
    pre_stop = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    budget = pre_stop + int(env["LLAMAROUTER_SHUTDOWN_GRACE"]) + int(env["LLAMAROUTER_STOP_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > budget
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
