"""The model listing: `GET /models`, `/v1/models` and /llamarouter/models.

Items follow upstream's router (`status.value`, `status.args`, `status.preset`), plus our
fields upstream does not use. Each item is built only from its `_Inputs`, which also key
its cached JSON: whatever the item shows is in the key by construction, so no change can
be missed and served stale.
"""

from __future__ import annotations

import json
import time
import weakref
from typing import TYPE_CHECKING, Any, NamedTuple

from ..core.failure import explain_failure
from ..core.gguf_info import Estimate
from ..core.process import ModelProcess
from ..core.sleep import sleeping_from_log
from ..core.states import State
from ..core.supervisor import Supervisor
from ..settings.childargs import ChildArgs
from ..settings.config import ModelSpec, RouterConfig
from . import api_models

if TYPE_CHECKING:
    from ..core.downloads import Downloads
    from ..core.kvcache import KvCache


class _Inputs(NamedTuple):
    """Everything one item is built from, read off the process and the supervisor."""

    spec: ModelSpec
    status_value: str
    argv: tuple[str, ...]
    state: State
    api_status: str
    crashed: bool
    exit_code: int | None
    failure: str | None
    sick_exit: bool
    # The child's kept output, only while `failure` is shown (its cause and log tail).
    log: tuple[str, ...]
    stop_reason: str | None
    in_flight: int
    queued: int
    draining: bool
    restarts: int
    pinned: bool
    last_used_wall: float
    saved_caches: tuple[tuple[int, int, int], ...]
    estimate: Estimate | None
    measured_bytes: int | None
    device_bytes: int | None
    loaded_info: dict[str, Any]
    placement: dict[str, object] | None  # several GPUs: where it runs and why
    # A model with `replicas = N`: each child as (number, status, state, port, in flight,
    # restarts, placement).
    replicas: tuple[tuple[Any, ...], ...] = ()


def status_value(proc: ModelProcess) -> str:
    """Upstream's status word; "sleeping" while a loaded child sleeps (its own
    --sleep-idle-seconds), as upstream's router shows it."""
    value = proc.api_status
    if value == "loaded" and proc.state == State.READY and sleeping_from_log(proc.logs):
        return "sleeping"
    return value


_REPLICA_FIELDS = ("replica", "status", "state", "port", "in_flight", "restarts", "placement")


def _replicas(sup: Supervisor, proc: ModelProcess) -> tuple[tuple[Any, ...], ...]:
    if proc.spec.replicas <= 1:
        return ()
    memory = sup.memory
    return tuple(
        (
            p.replica + 1, status_value(p), str(p.state), p.port, p.in_flight, p.restarts,
            memory.placement_view(p.key) if memory is not None else None,
        )
        for p in sup.table.replicas(proc)
    )


def saved_caches(kv: KvCache | None, name: str) -> tuple[tuple[int, int, int], ...]:
    if kv is None:
        return ()
    return tuple((s.slot, s.tokens, s.bytes) for s in kv.saved(name))


class ModelListing:
    def __init__(self, config: RouterConfig, child_args: ChildArgs) -> None:
        self.config = config
        self.child_args = child_args
        self._cache: weakref.WeakKeyDictionary[
            ModelProcess, tuple[_Inputs, tuple[bytes, bytes]]
        ] = weakref.WeakKeyDictionary()

    def body(self, sup: Supervisor, kv: KvCache | None, downloads: Downloads | None) -> bytes:
        """The whole listing as JSON: every visible model, then the running downloads."""
        now = int(time.time())
        created = b'"created":%d,' % now
        items = []
        for proc in sup.visible():
            head, tail = self._item_json(sup, kv, proc)
            items.append(head + created + tail)
        if downloads is not None:
            items += [
                json.dumps(api_models.download_item(d, now), separators=(",", ":")).encode()
                for d in downloads.running.values()
            ]
        return b'{"data":[' + b",".join(items) + b'],"object":"list"}'

    def _item_json(self, sup: Supervisor, kv: KvCache | None, proc: ModelProcess) -> tuple[bytes, bytes]:
        """A model's item as JSON, split around `created` (the only field that changes
        every second). Cached while its inputs stay equal: a listing of 1,000 models would
        otherwise rebuild and re-encode 1,000 items on every call."""
        inputs = self._inputs(sup, kv, proc)
        cached = self._cache.get(proc)
        if cached is not None and cached[0] == inputs:
            return cached[1]
        text = json.dumps(self._build(inputs, 0), separators=(",", ":")).encode()
        # Keys before `created` are fixed and strings are escaped, so this is the field.
        head, _, tail = text.partition(b'"created":0,')
        self._cache[proc] = (inputs, (head, tail))
        return head, tail

    def _inputs(self, sup: Supervisor, kv: KvCache | None, proc: ModelProcess) -> _Inputs:
        return _Inputs(
            spec=proc.spec,
            status_value=status_value(proc),
            argv=tuple(proc.argv),
            state=proc.state,
            api_status=proc.api_status,
            crashed=proc.crashed,
            exit_code=proc.exit_code,
            failure=proc.failure,
            sick_exit=proc.sick_exit,
            log=tuple(proc.log_tail(self.config.limits.log_lines)) if proc.failure else (),
            stop_reason=proc.stop_reason,
            in_flight=proc.in_flight,
            queued=sup.queued_for(proc),
            draining=sup.draining(proc),
            restarts=proc.restarts,
            pinned=sup.pinned(proc),
            last_used_wall=sup.usage(proc.name).last_used_wall,
            saved_caches=saved_caches(kv, proc.name),
            estimate=sup.estimate_of(proc),
            measured_bytes=proc.measured_bytes,
            device_bytes=proc.device_bytes,
            loaded_info=proc.loaded_info,
            placement=sup.memory.placement_view(proc.name) if sup.memory is not None else None,
            replicas=_replicas(sup, proc),
        )

    def _build(self, i: _Inputs, now: int) -> dict[str, Any]:
        spec = i.spec
        unloaded = i.api_status == "unloaded"
        item: dict[str, Any] = {
            "id": spec.name,
            "aliases": list(spec.aliases),
            "tags": list(spec.tags),
            "object": "model",
            "owned_by": "llamacpp",
            "created": now,
            "status": self._status(i),
            "architecture": {
                "input_modalities": list(spec.input_modalities),
                "output_modalities": ["text"],
            },
            "source": spec.source,
            "can_remove": spec.source == "cache",
            "in_flight": i.in_flight,
            "queued": i.queued,
            "draining": i.draining,
            "restarts": i.restarts,
            "pinned": i.pinned,
        }
        if i.last_used_wall:
            item["last_used"] = int(i.last_used_wall)
        if i.saved_caches:
            item["saved_caches"] = [dict(zip(("slot", "tokens", "bytes"), s, strict=True)) for s in i.saved_caches]
        if i.estimate is not None:
            item["estimated_bytes"] = i.estimate.total
            item["estimate"] = i.estimate.as_dict()
        if i.measured_bytes is not None and not unloaded:
            item["measured_bytes"] = i.measured_bytes
        if i.device_bytes is not None and not unloaded:
            item["device_bytes"] = i.device_bytes
        if i.placement is not None:
            item["placement"] = i.placement
        if i.replicas:
            item["replicas"] = [dict(zip(_REPLICA_FIELDS, r, strict=True)) for r in i.replicas]
        if not unloaded:
            for key, value in i.loaded_info.items():
                item.setdefault(key, value)
        return item

    def _status(self, i: _Inputs) -> dict[str, Any]:
        status: dict[str, Any] = {
            "value": i.status_value,
            # The last command line (upstream keeps it after an unload), or the would-be
            # one with port 0 for a model never started.
            "args": list(i.argv) if i.argv else self.child_args.argv(i.spec, 0),
        }
        status["preset"] = self.child_args.preset_ini(i.spec)
        if i.crashed and i.api_status == "unloaded":
            status["failed"] = True
            status["exit_code"] = i.exit_code
        # Our additions, in fields upstream does not use (llama.cpp #23257: tell a crash from
        # an unload).
        status["state"] = str(i.state)
        if i.failure:
            status["error"] = i.failure
            # The child's own words for why its last load failed ("No such file", "invalid
            # magic characters"), which the generic exit lines above do not say.
            cause = explain_failure(list(i.log))
            if cause is None and i.sick_exit:
                cause = i.failure  # its live requests said it, not its output
            if cause is not None:
                status["cause"] = cause
            status["log_tail"] = list(i.log[-20:])
        if i.stop_reason and i.api_status == "unloaded":
            status["stop_reason"] = i.stop_reason
        return status
