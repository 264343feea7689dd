"""The /models items (llamarouter.web.listing): an item's cached JSON follows everything
the item is built from, its command line and log tail included."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from llamarouter.core.logring import LogRing
from llamarouter.core.states import State
from llamarouter.settings.config import ModelSpec, RouterConfig
from llamarouter.web.listing import ModelListing


class _Proc:
    """The ModelProcess attributes an item reads (a weakly referenceable stand-in)."""

    def __init__(self, name: str) -> None:
        self.spec = ModelSpec(name=name, source="models_dir")
        self.name = name
        self.state = State.STOPPED
        self.api_status = "unloaded"
        self.argv: list[str] = []
        self.crashed = False
        self.exit_code: int | None = None
        self.failure: str | None = None
        self.sick_exit = False
        self.stop_reason: str | None = None
        self.in_flight = 0
        self.restarts = 0
        self.measured_bytes: int | None = None
        self.device_bytes: int | None = None
        self.loaded_info: dict[str, Any] = {}
        self.logs = LogRing(50, 50)

    def log_tail(self, n: int) -> list[str]:
        return self.logs.tail(n)


class _Sup:
    def __init__(self, procs: list[_Proc]) -> None:
        self.procs = procs
        self.memory = None  # no budget: no placement shown

    def visible(self) -> list[_Proc]:
        return self.procs

    def queued_for(self, proc: _Proc) -> int:
        return 0

    def draining(self, proc: _Proc) -> bool:
        return False

    def pinned(self, proc: _Proc) -> bool:
        return False

    def usage(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(last_used_wall=0.0)

    def estimate_of(self, proc: _Proc) -> None:
        return None


class _ChildArgs:
    def argv(self, spec: ModelSpec, port: int) -> list[str]:
        return ["llama-server", "--port", str(port)]

    def preset_ini(self, spec: ModelSpec) -> str:
        return f"[{spec.name}]\n"


def _items(listing: ModelListing, sup: _Sup) -> dict[str, dict[str, Any]]:
    body = json.loads(listing.body(sup, None, None))  # type: ignore[arg-type]  # stand-ins
    return {item["id"]: item for item in body["data"]}


def test_changed_args_and_log_tail_show_up() -> None:
    proc = _Proc("a")
    sup = _Sup([proc])
    listing = ModelListing(RouterConfig(), _ChildArgs())  # type: ignore[arg-type]  # a stand-in
    assert _items(listing, sup)["a"]["status"]["args"] == ["llama-server", "--port", "0"]
    proc.argv = ["llama-server", "--port", "5001"]
    assert _items(listing, sup)["a"]["status"]["args"] == ["llama-server", "--port", "5001"]
    # The same list, changed in place, is a changed command line too.
    proc.argv.append("--verbose")
    assert _items(listing, sup)["a"]["status"]["args"][-1] == "--verbose"

    proc.failure = "model name=a failed to load: exit code 1"
    proc.crashed, proc.exit_code = True, 1
    proc.logs.append("first try")
    status = _items(listing, sup)["a"]["status"]
    assert status["log_tail"] == ["first try"] and status["failed"] is True
    # A later failure with the same message and exit code but new output.
    proc.logs.append("gguf_init_from_file: invalid magic characters: 'NOPE', expected 'GGUF'")
    status = _items(listing, sup)["a"]["status"]
    assert status["log_tail"][-1].startswith("gguf_init_from_file")
    assert status["cause"] == "invalid magic characters: 'NOPE', expected 'GGUF'"


def test_an_unchanged_item_is_served_from_the_cache() -> None:
    proc = _Proc("a")
    sup = _Sup([proc])
    listing = ModelListing(RouterConfig(), _ChildArgs())  # type: ignore[arg-type]  # a stand-in
    listing._item_json(sup, None, proc)  # type: ignore[arg-type]  # stand-ins
    cached = listing._item_json(sup, None, proc)  # type: ignore[arg-type]  # stand-ins
    assert listing._item_json(sup, None, proc) is cached  # type: ignore[arg-type]  # stand-ins
    proc.in_flight = 1
    changed = listing._item_json(sup, None, proc)  # type: ignore[arg-type]  # stand-ins
    assert changed is not cached and b'"in_flight":1' in changed[1]
