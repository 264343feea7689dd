"""The pod-level gauges a Gateway API Inference Extension endpoint picker reads off GET
/metrics: queued, running, KV-cache use, and the loaded models as the protocol's adapter
labels, read back here the way the stock picker's extractor reads them (newest series of
the info family, comma-separated lists with blanks trimmed, max as an integer)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from llamarouter.core.states import State
from llamarouter.web.metrics import ADAPTERS_INFO, adapter_lists
from tests.conftest import ROOT, Router, StartRouter, make_models, open_stream
from tests.fakes.helpers import wait_for


class PodMetrics:
    """What the picker keeps per pod."""

    def __init__(self, text: str) -> None:
        families = {f.name: f for f in text_string_to_metric_families(text)}

        def scalar(name: str) -> float:
            (sample,) = families[name].samples
            assert not sample.labels
            return sample.value

        self.queued = scalar("llamarouter_total_queued_requests")
        self.running = scalar("llamarouter_total_running_requests")
        self.kv = scalar("llamarouter_kv_cache_usage_ratio")
        info = families[ADAPTERS_INFO]
        assert info.type == "gauge"
        newest = max(info.samples, key=lambda s: s.value)
        self.stamp = newest.value

        def names(label: str) -> set[str]:
            return {n.strip() for n in newest.labels[label].split(",") if n.strip()}

        self.active = names("running_lora_adapters")
        self.waiting = names("waiting_lora_adapters")
        self.max = int(newest.labels["max_lora"])

    def affinity(self, model: str) -> float:
        """The stock LoRA-affinity score of this pod for a request naming model."""
        if model in self.active:
            return 1.0
        if len(self.active) + len(self.waiting) < self.max:
            return 0.8
        return 0.6 if model in self.waiting else 0.0


async def pod(r: Router) -> PodMetrics:
    status, text = await r.get("/metrics")
    assert status == 200
    return PodMetrics(text)


def test_adapter_lists_states_queue_and_capacity() -> None:
    queued = {"q": 2}
    procs: list[Any] = [
        SimpleNamespace(name=name, state=state)
        for name, state in [
            ("b", State.READY), ("a", State.READY), ("s", State.STARTING), ("q", State.STOPPED),
            ("idle", State.STOPPED), ("gone", State.STOPPING), ("x,y", State.READY),
            ("f", State.FAILED),
        ]
    ]
    sup: Any = SimpleNamespace(
        queued_for=lambda p: queued.get(p.name, 0),
        config=SimpleNamespace(limits=SimpleNamespace(models_max=3)),
    )
    assert adapter_lists(sup, procs) == (["a", "b"], ["q", "s"], 3)
    sup.config.limits.models_max = 0  # unlimited: every known model fits
    assert adapter_lists(sup, procs)[2] == len(procs)


async def test_loaded_models_as_adapters(tmp_path: Path, start_router: StartRouter) -> None:
    d = make_models(tmp_path, "a b c")
    r = await start_router("--models-dir", str(d), "--models-max", "2")
    empty = await pod(r)
    assert (empty.active, empty.waiting, empty.max) == (set(), set(), 2)
    assert (empty.queued, empty.running, empty.kv) == (0, 0, 0)
    assert empty.affinity("a") == 0.8
    assert (await r.chat("a", max_tokens=1))[0] == 200
    assert (await r.chat("b", max_tokens=1))[0] == 200
    full = await pod(r)
    assert full.active == {"a", "b"} and full.waiting == set()
    assert full.stamp >= empty.stamp
    # Full: the pod is the place for a and b, and the last choice for c.
    assert (full.affinity("a"), full.affinity("c")) == (1.0, 0.0)
    assert (await r.chat("c", max_tokens=1))[0] == 200  # evicts the least recently used, a
    after = await pod(r)
    assert after.active == {"b", "c"}


async def test_queued_for_a_slot_is_waiting(tmp_path: Path, start_router: StartRouter) -> None:
    # One slot held by a stream: a request for b waits in the router for the slot.
    d = make_models(tmp_path, "a b", tokens=400, tps=40)
    r = await start_router("--models-dir", str(d), "--models-max", "1")
    async with open_stream(r, "a"):
        second = asyncio.create_task(r.chat("b", max_tokens=1))

        async def queued() -> PodMetrics | None:
            m = await pod(r)
            return m if m.waiting else None

        m = await wait_for(queued, 10, interval=0.05, message="b to queue for a slot")
        assert (m.active, m.waiting) == ({"a"}, {"b"})
        assert m.queued == 1 and m.running == 1
        assert m.affinity("b") == 0.6  # queued here, no room for more
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)


async def test_child_deferred_and_kv_from_children(tmp_path: Path, start_router: StartRouter) -> None:
    # The fake child has one slot: a second request to a busy model is deferred by the
    # child, which only a child run with --metrics reports.
    d = make_models(tmp_path, "a", tokens=400, tps=40)
    r = await start_router("--models-dir", str(d), "--metrics")
    async with open_stream(r, "a"):
        second = asyncio.create_task(r.chat("a", max_tokens=1))

        async def deferred() -> PodMetrics | None:
            m = await pod(r)
            return m if m.queued == 1 else None

        m = await wait_for(deferred, 10, interval=0.05, message="the child to defer a request")
        assert m.running == 1  # two in flight, one of them deferred by the child
        assert 0 < m.kv <= 1
        assert m.active == {"a"}
        second.cancel()
        await asyncio.gather(second, return_exceptions=True)


async def test_shipped_picker_config_names_exported_series(tmp_path: Path, start_router: StartRouter) -> None:
    # deploy/kubernetes/inference-pool's picker configuration reads these names: each one
    # is a family a running router exports, the LoRA one with the protocol's labels.
    config_text = (ROOT / "deploy/kubernetes/inference-pool/endpoint-picker.yaml").read_text()
    (cm,) = [d for d in yaml.safe_load_all(config_text) if d and d["kind"] == "ConfigMap"]
    (picker,) = [yaml.safe_load(text) for text in cm["data"].values()]
    (extractor,) = [p for p in picker["plugins"] if p["type"] == "core-metrics-extractor"]
    params = extractor["parameters"]
    (engine,) = [e for e in params["engineConfigs"] if e["name"] == params["defaultEngine"]]
    specs = {k: v for k, v in engine.items() if k.endswith("Spec") and v}
    assert set(specs) == {"queuedRequestsSpec", "runningRequestsSpec", "kvUsageSpec", "loraSpec"}

    r = await start_router("--models-dir", str(make_models(tmp_path, "a")))
    status, text = await r.get("/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for spec in specs.values():
        assert spec in families and families[spec].type == "gauge", spec
    (info,) = families[specs["loraSpec"]].samples
    assert set(info.labels) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
