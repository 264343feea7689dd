"""Placement on several GPUs: best fit, split, eviction on the device that needs the room,
manual placement, refusal with the reason, and what the child is told."""

from __future__ import annotations

import dataclasses

import pytest

from llamarouter.core.placement import (
    DeviceState,
    ModelToPlace,
    PlacedModel,
    Placement,
    child_launch,
    manual_from_options,
    parse_devices,
    place,
)

G = 1024**3
MIB = 1024**2


def put(devices: list[DeviceState], placement: Placement, name: str, last_used: float, **kw: bool) -> list[DeviceState]:
    """The devices once `name` runs where `placement` says."""
    share = dict(zip(placement.devices, placement.bytes_on, strict=True))
    idle = kw.pop("idle", True)
    return [
        dataclasses.replace(d, models=(*d.models, PlacedModel(name, share[d.id], idle, last_used, **kw)))
        if d.id in share else d
        for d in devices
    ]


def two_gpus() -> list[DeviceState]:
    return [DeviceState(0, 24 * G), DeviceState(1, 12 * G)]


@pytest.fixture
def three_placed() -> list[DeviceState]:
    """a (8 GiB) fits cuda:1 most tightly, then b (8) and c (6) go to cuda:0: two and one."""
    devices = two_gpus()
    for t, (name, size) in enumerate([("a", 8), ("b", 8), ("c", 6)], start=1):
        decision = place(devices, ModelToPlace(name, size * G))
        assert decision.action == "place" and decision.placement is not None
        devices = put(devices, decision.placement, name, last_used=t)
    return devices


def test_best_fit_places_three_models_two_and_one(three_placed: list[DeviceState]) -> None:
    assert [m.name for m in three_placed[0].models] == ["b", "c"]
    assert [m.name for m in three_placed[1].models] == ["a"]
    assert (three_placed[0].free, three_placed[1].free) == (10 * G, 4 * G)


def test_the_reason_explains_the_choice() -> None:
    decision = place(two_gpus(), ModelToPlace("a", 8 * G))
    assert decision.placement is not None and decision.placement.devices == (1,)
    assert "tightest fit" in decision.reason and "cuda:0 24576 MiB free" in decision.reason


def test_a_fourth_model_evicts_on_the_device_it_will_use(three_placed: list[DeviceState]) -> None:
    # 16 GiB: only cuda:0 can hold it. a is the least recently used model of all, but it
    # is on cuda:1: stopping it would free nothing where d goes. b is cuda:0's LRU.
    decision = place(three_placed, ModelToPlace("d", 16 * G))
    assert decision.action == "evict"
    assert decision.placement is not None and decision.placement.devices == (0,)
    assert decision.evict == ("b",)
    assert "after stopping b" in decision.reason


def test_eviction_prefers_the_device_whose_victims_are_least_recently_used() -> None:
    devices = [DeviceState(0, 10 * G), DeviceState(1, 10 * G)]
    devices = put(devices, Placement((0,), None, (8 * G,)), "old", last_used=1)
    devices = put(devices, Placement((1,), None, (8 * G,)), "new", last_used=5)
    decision = place(devices, ModelToPlace("x", 6 * G))
    assert decision.action == "evict" and decision.evict == ("old",)
    assert decision.placement is not None and decision.placement.devices == (0,)


def test_lru_order_on_one_device_stops_only_as_many_as_needed() -> None:
    devices = [DeviceState(0, 12 * G)]
    for t, name in enumerate(["x", "y", "z"], start=1):
        devices = put(devices, Placement((0,), None, (4 * G,)), name, last_used=10 - t)  # z oldest
    decision = place(devices, ModelToPlace("n", 7 * G))
    assert decision.evict == ("z", "y")


def test_a_model_too_large_for_any_device_is_split_in_proportion_to_free_room() -> None:
    decision = place(two_gpus(), ModelToPlace("big", 30 * G))
    assert decision.action == "split" and not decision.evict
    p = decision.placement
    assert p is not None and p.devices == (0, 1)
    assert p.split == pytest.approx((2 / 3, 1 / 3), abs=1e-4)
    assert p.bytes_on == (20 * G, 10 * G)
    env, args = child_launch(p)
    assert env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert args == ["--main-gpu", "0", "--tensor-split", "0.6667,0.3333"]


def test_a_split_uses_the_fewest_devices_with_most_room() -> None:
    devices = [DeviceState(0, 8 * G), DeviceState(1, 16 * G), DeviceState(2, 4 * G), DeviceState(3, 12 * G)]
    decision = place(devices, ModelToPlace("big", 20 * G))
    p = decision.placement
    assert decision.action == "split" and p is not None
    assert p.devices == (1, 3)  # 16 + 12 GiB; ids ascending: the child's 0 is GPU 1
    assert p.split == pytest.approx((16 / 28, 12 / 28), abs=1e-4)
    assert child_launch(p)[0]["CUDA_VISIBLE_DEVICES"] == "1,3"


def test_each_extra_device_of_a_split_counts_its_own_context() -> None:
    decision = place(two_gpus(), ModelToPlace("big", 30 * G, per_extra_device=512 * MIB))
    p = decision.placement
    assert p is not None and p.bytes_on[1] == p.bytes_on[1] // MIB * MIB
    assert p.bytes_on[0] + p.bytes_on[1] == 30 * G + 512 * MIB
    # Too much for the two once the context is counted: refused, not over-committed.
    assert place(two_gpus(), ModelToPlace("big", 36 * G - 256 * MIB, per_extra_device=512 * MIB)).action == "refuse"


def test_a_split_after_eviction_when_nothing_fits_otherwise(three_placed: list[DeviceState]) -> None:
    decision = place(three_placed, ModelToPlace("big", 30 * G))
    assert decision.action == "evict" and decision.placement is not None
    assert decision.placement.devices == (0, 1) and decision.placement.split is not None
    assert set(decision.evict) == {"a", "b", "c"}


def test_manual_placement_wins_over_best_fit(three_placed: list[DeviceState]) -> None:
    # 4 GiB fits cuda:1 exactly (the best fit); devices = 0 puts it on cuda:0.
    decision = place(three_placed, ModelToPlace("m", 4 * G, devices=(0,)))
    assert decision.action == "place" and decision.placement is not None
    assert decision.placement.devices == (0,) and decision.placement.source == "preset"
    assert "(manual)" in decision.reason
    # Pinned to cuda:1, which has 4 GiB free: a is stopped there, though cuda:0 has room.
    decision = place(three_placed, ModelToPlace("m", 6 * G, devices=(1,)))
    assert decision.action == "evict" and decision.evict == ("a",)
    assert decision.placement is not None and decision.placement.devices == (1,)


def test_manual_split_takes_the_given_shares() -> None:
    decision = place(two_gpus(), ModelToPlace("m", 10 * G, devices=(1, 0), tensor_split=(1, 4), source="args"))
    p = decision.placement
    assert decision.action == "split" and p is not None
    assert p.devices == (1, 0) and p.split == (0.2, 0.8) and p.bytes_on == (2 * G, 8 * G)
    # The model's own -dev/-ts stand: the child is only told the device order.
    assert child_launch(p) == ({"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, [])


def test_auto_placement_works_around_manually_placed_models() -> None:
    devices = put(two_gpus(), Placement((0,), None, (20 * G,), "preset"), "pinned-there", 1, idle=False)
    decision = place(devices, ModelToPlace("n", 6 * G))
    assert decision.placement is not None and decision.placement.devices == (1,)


def test_manual_devices_that_do_not_exist_are_refused() -> None:
    decision = place(two_gpus(), ModelToPlace("m", G, devices=(2,)))
    assert decision.action == "refuse" and "[2]" in decision.reason


def test_too_large_is_refused_naming_each_device_and_its_free_memory(three_placed: list[DeviceState]) -> None:
    decision = place(three_placed, ModelToPlace("huge", 40 * G))
    assert decision.action == "refuse" and decision.placement is None and not decision.evict
    assert "huge needs 40960 MiB" in decision.reason
    assert "cuda:0 10240 MiB free of 24576 MiB" in decision.reason
    assert "cuda:1 4096 MiB free of 12288 MiB" in decision.reason


def test_busy_models_make_it_wait_and_pinned_ones_make_it_refuse() -> None:
    busy = put([DeviceState(0, 10 * G)], Placement((0,), None, (8 * G,)), "busy", 1, idle=False)
    assert place(busy, ModelToPlace("n", 6 * G)).action == "wait"
    pinned = put([DeviceState(0, 10 * G)], Placement((0,), None, (8 * G,)), "p", 1, pinned=True)
    decision = place(pinned, ModelToPlace("n", 6 * G))
    assert decision.action == "refuse" and "cuda:0 2048 MiB free" in decision.reason


def test_margin_and_measured_free_both_bound_the_room() -> None:
    d = DeviceState(0, 24 * G, margin=G)
    assert d.free == 23 * G
    # NVML sees less free than the budget thinks (another process, VRAM not back yet).
    d = DeviceState(0, 24 * G, margin=G, measured_free=10 * G)
    assert d.free == 9 * G
    assert place([d, DeviceState(1, 12 * G)], ModelToPlace("n", 10 * G)).placement == Placement((1,), None, (10 * G,))


def test_a_single_device_placement_sets_only_the_visible_device() -> None:
    assert child_launch(Placement((1,), None, (G,))) == (
        {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "1"}, [],
    )
    assert child_launch(Placement((), None, (), "args")) == ({}, [])
    assert child_launch(Placement((), None, (), "preset")) == ({"CUDA_VISIBLE_DEVICES": ""}, [])


def test_parse_devices() -> None:
    assert parse_devices("0,1") == (0, 1)
    assert parse_devices(" 2 ") == (2,)
    assert parse_devices("none") == ()
    for bad in ("a", "0,0", "-1"):
        with pytest.raises(ValueError, match="devices"):
            parse_devices(bad)


def test_manual_from_options() -> None:
    assert manual_from_options({"-c": "512"}) is None
    m = manual_from_options({}, "0,1")
    assert m is not None and (m.devices, m.tensor_split, m.source) == ((0, 1), None, "preset")
    m = manual_from_options({"-ts": "3,1"}, "1,0")
    assert m is not None and (m.devices, m.tensor_split) == ((1, 0), (3.0, 1.0))
    m = manual_from_options({"-dev": "CUDA1,CUDA0", "-ts": "1,1"})
    assert m is not None and (m.devices, m.tensor_split, m.source) == ((1, 0), (1.0, 1.0), "args")
    m = manual_from_options({"-ts": "0,3,1"})
    assert m is not None and (m.devices, m.tensor_split) == ((1, 2), (3.0, 1.0))
    m = manual_from_options({"-sm": "none", "-mg": "1"})
    assert m is not None and m.devices == (1,)
    m = manual_from_options({"-dev": "none"})
    assert m is not None and m.devices == ()
    with pytest.raises(ValueError, match="CUDA"):
        manual_from_options({"-dev": "Vulkan0"})
    cpu = manual_from_options({"-dev": "none"})
    assert cpu is not None
    assert place(two_gpus(), dataclasses.replace(cpu, name="c", bytes=G)).action == "place"


def test_the_four_gpu_example_in_the_docs() -> None:
    """docs/memory.md, "Four GPUs": 4 x 24 GiB, margin 1 GiB, 20, 16 and 12 GiB models on
    GPUs 0, 1 and 3 (idle, used in that order)."""
    devices = [DeviceState(i, 24 * G, G) for i in range(4)]
    for t, (i, size) in enumerate([(0, 20), (1, 16), (3, 12)], start=1):
        devices = put(devices, Placement((i,), None, (size * G,)), f"m{i}", last_used=t)
    assert [d.free // G for d in devices] == [3, 7, 23, 11]

    def decide(size: int, **kw: object) -> tuple[str, tuple[dict[str, str], list[str]] | None, tuple[str, ...]]:
        d = place(devices, ModelToPlace("x", size * G, **kw))  # type: ignore[arg-type]
        return d.action, child_launch(d.placement) if d.placement else None, d.evict

    def env(ids: str, ts: str | None = None) -> tuple[dict[str, str], list[str]]:
        args = ["--main-gpu", "0", "--tensor-split", ts] if ts else []
        return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": ids}, args

    assert decide(10) == ("place", env("3"), ())
    assert decide(30) == ("split", env("2,3", "0.6765,0.3235"), ())
    assert decide(40) == ("split", env("1,2,3", "0.1707,0.561,0.2683"), ())
    assert decide(60) == ("evict", env("1,2,3", "0.3333,0.3333,0.3333"), ("m1", "m3"))
    assert decide(10, devices=(0, 1), tensor_split=(1.0, 1.0)) == ("evict", env("0,1", "0.5,0.5"), ("m0",))


def test_the_two_gpu_example_in_the_docs(three_placed: list[DeviceState]) -> None:
    decision = place(three_placed, ModelToPlace("e", 12 * G))
    assert decision.action == "split" and decision.placement is not None
    assert child_launch(decision.placement)[1] == ["--main-gpu", "0", "--tensor-split", "0.7143,0.2857"]
