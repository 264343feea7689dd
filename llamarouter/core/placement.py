"""Where a model goes on a host with several GPUs: one device, a split over several, after
evicting idle models from the devices it will use, or nowhere (and why).

Pure functions over plain values: the caller reads the devices (NVML, per-device budgets)
and the models placed on them, and acts on the decision (stops the victims, starts the child
with `child_launch`). Nothing here does I/O or awaits, so every rule is tested directly.

Device ids are NVML indices, which `child_launch` makes CUDA's too (CUDA_DEVICE_ORDER).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

MIB = 1024 * 1024

Action = Literal["place", "split", "evict", "wait", "refuse"]
Source = Literal["auto", "preset", "args"]


@dataclass(frozen=True)
class PlacedModel:
    """A model that holds memory on a device (a split model is listed on each of its
    devices with its share there)."""

    name: str
    bytes: int
    # Ready, no request in flight and none queued for it: it may be stopped for room now.
    idle: bool
    last_used: float  # monotonic; 0 = never used
    pinned: bool = False  # never stopped for room, not even once it is idle


@dataclass(frozen=True)
class DeviceState:
    id: int  # NVML index
    total: int  # this device's budget (bytes)
    margin: int = 0  # kept free on this device
    models: tuple[PlacedModel, ...] = ()
    # NVML's free bytes when known: other processes and a late VRAM release count too.
    measured_free: int | None = None
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or f"cuda:{self.id}"

    @property
    def used(self) -> int:
        return sum(m.bytes for m in self.models)

    @property
    def free(self) -> int:
        room = self.total - self.margin - self.used
        if self.measured_free is not None:
            room = min(room, self.measured_free - self.margin)
        return max(room, 0)

    def idle_lru(self) -> list[PlacedModel]:
        return sorted((m for m in self.models if m.idle and not m.pinned), key=lambda m: (m.last_used, m.name))

    def releasable(self) -> int:
        """What stopping every model not pinned would free here (busy ones once idle)."""
        return sum(m.bytes for m in self.models if not m.pinned)

    def room_without(self, stopped: Iterable[str]) -> int:
        gone = set(stopped)
        freed = sum(m.bytes for m in self.models if m.name in gone)
        room = self.total - self.margin - self.used + freed
        if self.measured_free is not None:
            room = min(room, self.measured_free - self.margin + freed)
        return max(room, 0)


@dataclass(frozen=True)
class ModelToPlace:
    name: str
    bytes: int  # the whole footprint, as on one device
    # Manual placement: NVML ids (preset `devices = 0,1`, or the model's own -dev/-ts).
    devices: tuple[int, ...] | None = None
    tensor_split: tuple[float, ...] | None = None  # shares over `devices`, in that order
    source: Source = "auto"
    # Each device past the first holds its own device context and compute buffers.
    per_extra_device: int = 0


@dataclass(frozen=True)
class Placement:
    devices: tuple[int, ...]  # NVML ids, in the order the child numbers them (0, 1, ...)
    split: tuple[float, ...] | None  # fractions over `devices` (sum 1); None on one device
    bytes_on: tuple[int, ...]  # what the model will hold on each of `devices`
    source: Source = "auto"

    def as_dict(self) -> dict[str, object]:
        return {
            "devices": list(self.devices),
            "tensor_split": list(self.split) if self.split is not None else None,
            "bytes": list(self.bytes_on),
            "source": self.source,
        }


@dataclass(frozen=True)
class Decision:
    action: Action
    placement: Placement | None
    reason: str  # for the log, GET /memory, and the 503 on refuse
    # Stop these first (LRU order), all on the devices of `placement`.
    evict: tuple[str, ...] = ()


def _mib(n: int) -> int:
    return n // MIB


def _fractions(weights: Sequence[int | float]) -> tuple[float, ...]:
    total = float(sum(weights))
    return tuple(w / total for w in weights)


def _shares(need: int, fractions: Sequence[float], extra: int) -> tuple[int, ...]:
    # The first device is the main GPU; the others each add their own context.
    return tuple(math.ceil(need * f) + (extra if i else 0) for i, f in enumerate(fractions))


def _describe(devices: Sequence[DeviceState]) -> str:
    return ", ".join(
        f"{d.label} {_mib(d.free)} MiB free of {_mib(d.total - d.margin)} MiB" for d in devices
    )


def _placement(devs: Sequence[DeviceState], fractions: Sequence[float] | None, model: ModelToPlace) -> Placement:
    ids = tuple(d.id for d in devs)
    if len(devs) == 1:
        return Placement(ids, None, (model.bytes,), model.source)
    assert fractions is not None
    rounded = tuple(round(f, 4) for f in fractions)
    return Placement(ids, rounded, _shares(model.bytes, fractions, model.per_extra_device), model.source)


def _lru_victims(devs: Sequence[DeviceState], needs: Sequence[int]) -> list[str] | None:
    """Idle models to stop, least recently used first over these devices, until each device
    has room for its need; None when the idle ones cannot free enough."""
    candidates: dict[str, PlacedModel] = {}
    for d in devs:
        for m in d.idle_lru():
            candidates.setdefault(m.name, m)
    order = sorted(candidates.values(), key=lambda m: (m.last_used, m.name))
    chosen: list[str] = []

    def short() -> bool:
        return any(d.room_without(chosen) < n for d, n in zip(devs, needs, strict=True))

    for m in order:
        if not short():
            break
        # Stopping a model that frees nothing on a device still short of room helps no one.
        if any(d.room_without(chosen) < n and any(x.name == m.name for x in d.models)
               for d, n in zip(devs, needs, strict=True)):
            chosen.append(m.name)
    return None if short() else chosen


def _fits_without_busy(devs: Sequence[DeviceState], needs: Sequence[int]) -> bool:
    return all(
        d.total - d.margin - d.used + d.releasable() >= n for d, n in zip(devs, needs, strict=True)
    )


def _manual(devices: Sequence[DeviceState], model: ModelToPlace) -> Decision:
    if model.source == "auto":
        model = replace(model, source="preset")
    by_id = {d.id: d for d in devices}
    wanted = model.devices or ()
    unknown = [i for i in wanted if i not in by_id]
    if unknown:
        return Decision("refuse", None, f"model {model.name} is placed on device(s) {unknown} that do not exist "
                        f"(devices: {_describe(devices)})")
    devs = [by_id[i] for i in wanted]
    if not devs:
        # -dev none: weights stay on the CPU, nothing to budget on a GPU.
        return Decision("place", Placement((), None, (), model.source), f"model {model.name} runs on the CPU (manual)")
    fractions: Sequence[float] | None = None
    if len(devs) > 1:
        if model.tensor_split is not None and len(model.tensor_split) == len(devs) and sum(model.tensor_split) > 0:
            fractions = _fractions(model.tensor_split)
        else:
            # As llama.cpp splits when given no -ts: by each device's free memory.
            fractions = _fractions([max(d.free, 1) for d in devs])
    placement = _placement(devs, fractions, model)
    needs = placement.bytes_on
    where = ", ".join(f"{d.label} {_mib(n)} MiB" for d, n in zip(devs, needs, strict=True))
    if all(d.free >= n for d, n in zip(devs, needs, strict=True)):
        return Decision("split" if len(devs) > 1 else "place", placement, f"model {model.name} on {where} (manual)")
    victims = _lru_victims(devs, needs)
    if victims is not None:
        return Decision("evict", placement, f"model {model.name} on {where} (manual) after stopping "
                        f"{', '.join(victims)}", tuple(victims))
    if _fits_without_busy(devs, needs):
        return Decision("wait", placement, f"model {model.name} needs {where} (manual): waiting for busy "
                        f"models there to go idle ({_describe(devs)})")
    return Decision("refuse", None, f"model {model.name} is placed manually on {where}, which does not fit "
                    f"even with every unpinned model stopped ({_describe(devs)})")


def _split_over(devs: Sequence[DeviceState], room: Mapping[int, int], model: ModelToPlace) -> Placement | None:
    """The fewest devices, most room first, whose room covers the model; shares in
    proportion to each one's room (ids ascending, so the child's numbering is stable). Of
    devices with equal room, those with more free now: fewer models stopped for it."""
    chosen: list[DeviceState] = []
    for d in sorted(devs, key=lambda d: (-room[d.id], -d.free, d.id)):
        if room[d.id] <= 0:
            break
        chosen.append(d)
        if len(chosen) < 2:
            continue
        chosen.sort(key=lambda d: d.id)
        fractions = _fractions([room[d.id] for d in chosen])
        needs = _shares(model.bytes, fractions, model.per_extra_device)
        if all(room[d.id] >= n for d, n in zip(chosen, needs, strict=True)):
            return _placement(chosen, fractions, model)
    return None


def _where(p: Placement, devices: Sequence[DeviceState]) -> str:
    by_id = {d.id: d for d in devices}
    return ", ".join(f"{by_id[i].label} {_mib(n)} MiB" for i, n in zip(p.devices, p.bytes_on, strict=True))


def place(devices: Sequence[DeviceState], model: ModelToPlace) -> Decision:
    """Decide where `model` goes.

    - Manual placement (`model.devices`) is taken as given: evicting there if need be.
    - One device whose free room fits the model: the tightest such fit (least left over),
      so the roomy devices stay free for large models.
    - Else several devices, most free room first, `split` in proportion to each one's room.
    - Else evict: on the one device, then the split, that needs only the least recently used
      idle models stopped (the oldest newest victim wins; then fewer victims, then a tighter fit).
    - Else `wait` when it would fit once busy models there go idle, or `refuse`, naming each
      device and its free memory.
    """
    if model.devices is not None:
        return _manual(devices, model)
    if not devices:
        return Decision("refuse", None, f"model {model.name}: no GPU to place it on")
    need = model.bytes
    fits = [d for d in devices if d.free >= need]
    if fits:
        best = min(fits, key=lambda d: (d.free - need, d.id))
        return Decision("place", _placement([best], None, model),
                        f"model {model.name} ({_mib(need)} MiB) on {best.label}: the tightest fit "
                        f"({_describe(devices)})")
    split = _split_over(devices, {d.id: d.free for d in devices}, model)
    if split is not None:
        return Decision("split", split, f"model {model.name} ({_mib(need)} MiB) fits no device whole: split "
                        f"over {_where(split, devices)} ({_describe(devices)})")

    options: list[tuple[tuple[float, int, int], Placement, list[str]]] = []
    for d in devices:
        victims = _lru_victims([d], [need])
        if victims is not None:
            newest = max((m.last_used for m in d.models if m.name in victims), default=0.0)
            options.append(((newest, len(victims), d.room_without(victims) - need), _placement([d], None, model), victims))
    if not options:
        # Room after stopping every idle model anywhere, then the same split rule over it.
        room = {d.id: d.room_without(m.name for m in d.idle_lru()) for d in devices}
        split = _split_over(devices, room, model)
        if split is not None:
            devs = [d for d in devices if d.id in split.devices]
            victims = _lru_victims(devs, split.bytes_on)
            if victims is not None:
                newest = max((m.last_used for d in devs for m in d.models if m.name in victims), default=0.0)
                options.append(((newest, len(victims), 0), split, victims))
    if options:
        _, placement, victims = min(options, key=lambda o: (o[0], o[1].devices))
        return Decision("evict", placement, f"model {model.name} ({_mib(need)} MiB) on {_where(placement, devices)} "
                        f"after stopping {', '.join(victims)} ({_describe(devices)})", tuple(victims))

    room = {d.id: d.total - d.margin - d.used + d.releasable() for d in devices}
    if any(r >= need for r in room.values()) or _split_over(devices, room, model) is not None:
        return Decision("wait", None, f"model {model.name} ({_mib(need)} MiB) fits once busy models go idle "
                        f"({_describe(devices)})")
    return Decision("refuse", None, f"model {model.name} needs {_mib(need)} MiB, more than any device or split "
                    f"over them can hold even with every unpinned model stopped: {_describe(devices)}")


def child_launch(placement: Placement) -> tuple[dict[str, str], list[str]]:
    """The child's environment and extra arguments for a placement.

    CUDA_VISIBLE_DEVICES renumbers: a child given `2,3` sees those GPUs as its devices 0
    and 1, so `--main-gpu 0` is the first of them and `--tensor-split` lists shares in the
    order of the variable, whatever the physical ids. CUDA numbers devices fastest first
    unless told otherwise, NVML by PCI bus; CUDA_DEVICE_ORDER=PCI_BUS_ID makes the ids we
    chose from NVML the same GPUs for CUDA. A CPU build warns that the flags have no effect
    and starts. A placement from the model's own -dev/-ts keeps its flags and gets only the
    device order, so that its CUDA1 is the GPU NVML calls 1.
    """
    if not placement.devices:
        # `devices = none`: no GPU at all (an empty list hides every one from CUDA); the
        # model's own `-dev none` says so itself.
        return ({"CUDA_VISIBLE_DEVICES": ""} if placement.source == "preset" else {}), []
    if placement.source == "args":
        return {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, []
    env = {
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": ",".join(str(i) for i in placement.devices),
    }
    if placement.split is None:
        return env, []
    return env, ["--main-gpu", "0", "--tensor-split", ",".join(_fmt(f) for f in placement.split)]


def _fmt(f: float) -> str:
    return f"{f:.4f}".rstrip("0").rstrip(".") or "0"


def parse_devices(text: str) -> tuple[int, ...]:
    """The preset key `devices = 0,1` (NVML ids); `none` for the CPU only."""
    text = text.strip()
    if text.lower() in ("none", ""):
        return ()
    try:
        ids = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ValueError(f"devices: not a list of GPU numbers: {text!r} (e.g. 0,1)") from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"devices: each GPU number once, none negative: {text!r}")
    return ids


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.replace("/", ",").split(",") if x.strip())


def manual_from_options(opts: Mapping[str, str], preset_devices: str | None = None) -> ModelToPlace | None:
    """The manual part of a model's placement, or None for auto: the preset key `devices`
    (with the model's own -ts as the shares, if it gives one per device), else the model's
    own -dev (`CUDA0,CUDA1`, `none`), -ts, or -sm none with -mg. Returned with bytes 0:
    the caller sets name and bytes with dataclasses.replace."""

    def get(*keys: str) -> str | None:
        return next((opts[k] for k in keys if k in opts), None)

    ts_text = get("-ts", "--tensor-split")
    ts = _floats(ts_text) if ts_text else None
    if preset_devices is not None:
        ids = parse_devices(preset_devices)
        share = ts if ts is not None and len(ts) == len(ids) else None
        return ModelToPlace("", 0, ids, share, "preset")
    dev = get("-dev", "--device")
    if dev is not None:
        if dev.strip().lower() == "none":
            return ModelToPlace("", 0, (), None, "args")
        try:
            ids = tuple(int(name.strip().upper().removeprefix("CUDA")) for name in dev.split(","))
        except ValueError:
            raise ValueError(f"-dev {dev}: only CUDA devices (CUDA0,CUDA1) or none can be placed") from None
        share = ts if ts is not None and len(ts) == len(ids) else None
        return ModelToPlace("", 0, ids, share, "args")
    if ts is not None:
        # -ts alone spans the devices with a share, in their order.
        ids = tuple(i for i, v in enumerate(ts) if v > 0)
        return ModelToPlace("", 0, ids, tuple(v for v in ts if v > 0), "args")
    mode = get("-sm", "--split-mode")
    if mode is not None and mode.strip().lower() == "none":
        main = get("-mg", "--main-gpu") or "0"
        return ModelToPlace("", 0, (int(main),), None, "args")
    return None
