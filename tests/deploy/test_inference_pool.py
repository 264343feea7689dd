"""deploy/kubernetes/inference-pool: the core objects pass `kubernetes-validate --strict`,
the InferencePool passes the extension's own CRD schema (tests/deploy/fixtures, source
noted in the file) with unknown fields rejected and the CRD's CEL rules checked by hand,
and the objects refer to each other correctly (selector, ports, picker Service, RBAC,
configuration file)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from bench.cluster_sim import WEIGHTS
from tests.fakes.helpers import run, tool

POOL = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes" / "inference-pool"
CRD = Path(__file__).resolve().parent / "fixtures" / "inferencepools.inference.networking.k8s.io.yaml"


def docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((POOL / name).read_text()) if d]


def one(kind: str, name: str = "") -> dict[str, Any]:
    found = [d for f in sorted(POOL.glob("*.yaml")) if f.name != "kustomization.yaml"
             for d in docs(f.name) if d["kind"] == kind and (not name or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


# ------------------------------------------------------------------ the CRD's schema
def crd_schema() -> tuple[str, str, str, dict[str, Any]]:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["served"] and v["storage"]]
    return crd["spec"]["group"], version["name"], crd["spec"]["names"]["kind"], version["schema"]["openAPIV3Schema"]


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the schema does not declare (the API server prunes them silently; kubectl's
    strict validation rejects them)."""
    out: list[str] = []
    if isinstance(obj, dict) and "properties" in schema:
        for key, value in obj.items():
            if key not in schema["properties"]:
                out.append(f"{path}.{key}")
            else:
                out += unknown_fields(value, schema["properties"][key], f"{path}.{key}")
    elif isinstance(obj, list) and "items" in schema:
        for i, item in enumerate(obj):
            out += unknown_fields(item, schema["items"], f"{path}[{i}]")
    return out


def cel_violations(pool: dict[str, Any]) -> list[str]:
    """The CRD's x-kubernetes-validations on spec, written out (jsonschema cannot run CEL)."""
    spec = pool["spec"]
    out = []
    ref = spec.get("endpointPickerRef", {})
    if ref.get("kind", "Service") == "Service" and "port" not in ref:
        out.append("endpointPickerRef: port is required for a Service")
    numbers = [p["number"] for p in spec.get("targetPorts", [])]
    if len(numbers) != len(set(numbers)):
        out.append("targetPorts: port numbers must be unique")
    return out


def problems(pool: dict[str, Any]) -> list[str]:
    group, version, kind, schema = crd_schema()
    out = [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(pool)]
    if pool.get("apiVersion") != f"{group}/{version}" or pool.get("kind") != kind:
        out.append(f"not a {group}/{version} {kind}")
    return out + [f"unknown field {f}" for f in unknown_fields(pool, schema)] + cel_violations(pool)


def test_inferencepool_matches_the_crd() -> None:
    assert "gateway-api-inference-extension" in CRD.read_text().split("apiVersion:")[0]  # source noted
    pool = one("InferencePool")
    assert problems(pool) == []


@pytest.mark.parametrize(
    ("change", "expect"),
    [
        (lambda s: s.pop("targetPorts"), "'targetPorts' is a required property"),
        (lambda s: s.update(targetPorts=[{"number": 8080}, {"number": 8080}]), "unique"),
        (lambda s: s.update(targetPorts=[{"number": 70000}]), "70000 is greater than"),
        (lambda s: s["endpointPickerRef"].update(failureMode="Open"), "'Open' is not one of"),
        (lambda s: s["endpointPickerRef"].pop("port"), "port is required"),
        (lambda s: s["selector"].update(matchLabel={"a": "b"}), "unknown field .spec.selector.matchLabel"),
        (lambda s: s["selector"].update(matchLabels={}), "should be non-empty"),
    ],
)
def test_the_schema_check_rejects_broken_pools(change: Any, expect: str) -> None:
    pool = copy.deepcopy(one("InferencePool"))
    change(pool["spec"])
    assert any(expect in p for p in problems(pool)), problems(pool)


# ------------------------------------------------------------------ the core objects
def test_core_objects_validate_strictly() -> None:
    validate = tool("kubernetes-validate")
    kustomization = yaml.safe_load((POOL / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {p.name for p in POOL.glob("*.yaml")} - {"kustomization.yaml"}
    core = [str(POOL / n) for n in ("pvc.yaml", "deployment.yaml", "endpoint-picker.yaml")]
    result = run(validate, "--strict", *core)
    assert result.returncode == 0, result.stdout + result.stderr
    objects = sum(len(docs(Path(f).name)) for f in core)
    assert result.stdout.count("passed") == objects, result.stdout


def test_objects_refer_to_each_other() -> None:
    pool = one("InferencePool")["spec"]
    routers = one("Deployment", "llamarouter-pool")
    pod = routers["spec"]["template"]
    assert pool["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (router,) = pod["spec"]["containers"]
    assert [p["number"] for p in pool["targetPorts"]] == [p["containerPort"] for p in router["ports"]]
    env = {e["name"]: e.get("value") for e in router["env"]}
    # The picker scrapes /metrics without a key; the gauges need the children's --metrics.
    assert "LLAMAROUTER_API_KEY" not in env and env["LLAMAROUTER_ALLOW_NO_API_KEY"] == "1"
    assert "--metrics" in router["args"] and int(env["LLAMAROUTER_MODELS_MAX"]) >= 1
    (claim,) = [v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v]
    assert one("PersistentVolumeClaim", claim)["spec"]["accessModes"] == ["ReadWriteMany"]

    ref = pool["endpointPickerRef"]
    svc = one("Service", ref["name"])
    assert ref["port"]["number"] in [p["port"] for p in svc["spec"]["ports"]]
    epp = one("Deployment", svc["metadata"]["name"])
    assert svc["spec"]["selector"].items() <= epp["spec"]["template"]["metadata"]["labels"].items()
    (picker,) = epp["spec"]["template"]["spec"]["containers"]
    args = picker["args"]
    assert args[args.index("--pool-name") + 1] == one("InferencePool")["metadata"]["name"]
    config_path = Path(args[args.index("--config-file") + 1])
    (mount,) = picker["volumeMounts"]
    assert config_path.parent == Path(mount["mountPath"])
    (volume,) = epp["spec"]["template"]["spec"]["volumes"]
    cm = one("ConfigMap", volume["configMap"]["name"])
    assert config_path.name in cm["data"]

    sa = epp["spec"]["template"]["spec"]["serviceAccountName"]
    binding = one("RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa}]
    rules = one("Role", binding["roleRef"]["name"])["rules"]
    granted = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= granted


def picker_config() -> dict[str, Any]:
    cm = one("ConfigMap", "llamarouter-epp")
    (text,) = cm["data"].values()
    config: dict[str, Any] = yaml.safe_load(text)
    return config


def test_picker_config_scores_with_affinity() -> None:
    config = picker_config()
    assert config["kind"] == "EndpointPickerConfig"
    types = {p["type"] for p in config["plugins"]}
    (profile,) = config["schedulingProfiles"]
    refs = {p["pluginRef"]: p.get("weight") for p in profile["plugins"]}
    assert set(refs) <= types
    # The weights bench/cluster_sim.py simulates (docs/deploy-kubernetes.md's figures).
    assert (refs["lora-affinity-scorer"], refs["queue-scorer"], refs["kv-cache-utilization-scorer"]) == WEIGHTS
    assert "max-score-picker" in refs
    (source,) = config["dataLayer"]["sources"]
    assert source["pluginRef"] in types
    assert {e["pluginRef"] for e in source["extractors"]} <= types
