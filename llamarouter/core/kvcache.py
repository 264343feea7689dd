"""Keep-cache: a model's slot caches saved before it is stopped and restored when it loads.

llama-server saves and restores one slot's KV cache with `POST /slots/{id}?action=save|restore`
(files inside its `--slot-save-path`). Before an idle model is stopped (eviction, TTL, unload)
every slot that holds a prompt is saved; after the next load, before requests are granted,
they are restored, so a follow-up of a long conversation prefills only its new suffix.

Never raises into its caller: a save or restore that fails or takes longer than
`Timeouts.keep_cache` is logged and skipped, so it can delay a stop or a load by at most that
limit per slot and never block it. Saved caches of every model share one disk budget
(`Limits.keep_cache_budget`); the oldest are deleted first.

Each save has a sidecar JSON record (model, slot, tokens, bytes, when, and a fingerprint of
the child's options and model file): a cache is restored only into a child started the same
way, since a KV cache of another model or context size is garbage to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ..settings.childargs import keep_cache_dir
from ..settings.config import RouterConfig
from .childclient import ChildClient, ChildError

log = logging.getLogger("llamarouter.core.kvcache")

_SUFFIX = ".slot"
_RECORD = ".json"

# name -> fingerprint of how its child is started (None: unknown, nothing is restored).
Fingerprint = Callable[[str], str | None]
# name -> whether the model has keep-cache on.
Wants = Callable[[str], bool]


@dataclass(frozen=True)
class SavedCache:
    model: str
    slot: int
    tokens: int
    bytes: int
    saved_at: float  # wall clock
    fingerprint: str


class KvCache:
    def __init__(
        self,
        config: RouterConfig,
        children: ChildClient,
        wants: Wants,
        fingerprint: Fingerprint,
    ) -> None:
        self._config = config
        self._children = children
        self._wants = wants
        self._fingerprint = fingerprint
        self._timeout = config.timeouts.keep_cache
        self._budget = config.limits.keep_cache_budget
        self._saved: dict[tuple[str, int], SavedCache] = {}
        self.saves = 0
        self.restores = 0
        self.failures = 0
        self._load_records()

    # ----------------------------------------------------------------- queries
    def saved(self, model: str | None = None) -> list[SavedCache]:
        """Saved caches (of one model, or all), oldest first."""
        items = (s for s in self._saved.values() if model is None or s.model == model)
        return sorted(items, key=lambda s: (s.saved_at, s.model, s.slot))

    def total_bytes(self) -> int:
        return sum(s.bytes for s in self._saved.values())

    def directory(self, model: str) -> Path | None:
        return keep_cache_dir(self._config, model)

    def ensure_dir(self, model: str) -> None:
        """Create the model's --slot-save-path (llama-server refuses to start without it)."""
        path = self.directory(model)
        if path is None or not self._wants(model):
            return
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("[%s] keep-cache: cannot create %s: %s", model, path, exc)

    # ----------------------------------------------------------------- hooks
    async def save_before_stop(self, model: str, port: int) -> list[SavedCache]:
        """Save every idle slot of the child on `port` that holds a prompt. Never raises."""
        if not self._wants(model) or self.directory(model) is None:
            return []
        try:
            return await self._save_all(model, port)
        except Exception:  # a bug of ours must not stop the eviction
            log.exception("[%s] keep-cache: save failed", model)
            self.failures += 1
            return []

    async def restore_after_ready(self, model: str, port: int) -> int:
        """Restore the model's saved slots into the child on `port`; the number restored.
        Never raises."""
        if not self._wants(model):
            return 0
        try:
            return await self._restore_all(model, port)
        except Exception:  # a bug of ours must not fail the load
            log.exception("[%s] keep-cache: restore failed", model)
            self.failures += 1
            return 0

    # ----------------------------------------------------------------- internals
    async def _save_all(self, model: str, port: int) -> list[SavedCache]:
        fingerprint = self._fingerprint(model)
        if fingerprint is None:
            return []
        try:
            # A sleeping child has freed its context: nothing to save, and /slots would
            # wake it just to find that out.
            if await self._children.sleeping(port, self._timeout) is True:
                return []
            slots = await self._children.slots(port, self._timeout)
        except ChildError as exc:
            self.failures += 1
            log.warning("[%s] keep-cache: cannot list slots, nothing saved: %s", model, exc)
            return []
        out = []
        for slot in slots:
            if not isinstance(slot.get("id"), int):
                continue
            if slot.get("is_processing") or not slot.get("n_prompt_tokens"):
                continue
            saved = await self._save_one(model, port, slot["id"], fingerprint)
            if saved is not None:
                out.append(saved)
        self._enforce_budget()
        return out

    async def _save_one(self, model: str, port: int, slot: int, fingerprint: str) -> SavedCache | None:
        directory = self.directory(model)
        assert directory is not None
        name = f"slot-{slot}{_SUFFIX}"
        started = time.monotonic()
        try:
            tokens, nbytes = await self._children.save_slot(port, slot, name, self._timeout)
        except ChildError as exc:
            self.failures += 1
            log.warning("[%s] keep-cache: slot %d not saved: %s", model, slot, exc)
            # A half-written file must not be restored later.
            self._forget(model, slot)
            return None
        saved = SavedCache(model, slot, tokens, nbytes, time.time(), fingerprint)
        try:
            (directory / f"slot-{slot}{_RECORD}").write_text(json.dumps(asdict(saved)))
        except OSError as exc:
            self.failures += 1
            log.warning("[%s] keep-cache: slot %d record not written: %s", model, slot, exc)
            self._forget(model, slot)
            return None
        self._saved[(model, slot)] = saved
        self.saves += 1
        log.info(
            "[%s] keep-cache: saved slot %d (%d tokens, %d bytes) in %.2fs",
            model, slot, tokens, nbytes, time.monotonic() - started,
        )
        return saved

    async def _restore_all(self, model: str, port: int) -> int:
        mine = self.saved(model)
        if not mine:
            return 0
        fingerprint = self._fingerprint(model)
        restored = 0
        for saved in mine:
            if saved.fingerprint != fingerprint:
                log.info("[%s] keep-cache: slot %d was saved from another setup; dropped", model, saved.slot)
                self._forget(model, saved.slot)
                continue
            started = time.monotonic()
            try:
                tokens = await self._children.restore_slot(
                    port, saved.slot, f"slot-{saved.slot}{_SUFFIX}", self._timeout
                )
            except ChildError as exc:
                self.failures += 1
                log.warning("[%s] keep-cache: slot %d not restored: %s", model, saved.slot, exc)
                # One that cannot be restored now will not be next time either.
                self._forget(model, saved.slot)
                continue
            restored += 1
            self.restores += 1
            log.info(
                "[%s] keep-cache: restored slot %d (%d tokens) in %.2fs",
                model, saved.slot, tokens, time.monotonic() - started,
            )
        return restored

    def _enforce_budget(self) -> None:
        total = self.total_bytes()
        for saved in self.saved():  # oldest first
            if total <= self._budget:
                return
            log.info(
                "[%s] keep-cache: slot %d deleted (%d bytes) to stay within the %d-byte budget",
                saved.model, saved.slot, saved.bytes, self._budget,
            )
            self._forget(saved.model, saved.slot)
            total -= saved.bytes

    def _forget(self, model: str, slot: int) -> None:
        self._saved.pop((model, slot), None)
        directory = self.directory(model)
        if directory is None:
            return
        for suffix in (_RECORD, _SUFFIX):
            with contextlib.suppress(OSError):
                (directory / f"slot-{slot}{suffix}").unlink(missing_ok=True)

    def _load_records(self) -> None:
        """Caches saved by an earlier run of the router (records next to their files)."""
        root = self._config.keep_cache_dir
        if root is None or not root.is_dir():
            return
        for record in sorted(root.glob(f"*/slot-*{_RECORD}")):
            try:
                data = json.loads(record.read_text())
                saved = SavedCache(
                    model=str(data["model"]), slot=int(data["slot"]), tokens=int(data["tokens"]),
                    bytes=int(data["bytes"]), saved_at=float(data["saved_at"]),
                    fingerprint=str(data["fingerprint"]),
                )
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if record.with_suffix(_SUFFIX).is_file() and record.parent == self.directory(saved.model):
                self._saved[(saved.model, saved.slot)] = saved
        self._enforce_budget()


def kv_fingerprint(options: dict[str, str], model_path: str | None) -> str:
    """How a child is started, plus the identity of its model file: a saved KV cache is only
    valid in a child that matches it."""
    parts: list[object] = [*sorted(options.items())]
    if model_path:
        try:
            st = os.stat(model_path)
            parts.append((st.st_size, st.st_mtime_ns))
        except OSError:
            parts.append("missing")
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
