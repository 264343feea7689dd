"""Canary: a one-token completion that proves a READY child can still answer.

`/health` answers from llama-server's HTTP thread; a child whose inference loop is stuck or
broken still says 200 there. The canary asks for one token (`max_tokens: 1`, no prompt
cache so it cannot be answered from a stale slot); one that fails or takes longer than its
limit is a failed canary, and as many in a row as the liveness failure limit replace the
child. The caller decides when: only while the model is
idle (no request in flight or queued) and awake (a canary must not wake a sleeping model,
see sleep.py), every `canary_interval` seconds. The request itself is
childclient.ChildClient.canary.
"""

from __future__ import annotations

from ..settings.config import ModelSpec, RouterConfig
from ..settings.declared import CANARY_INTERVAL, effective


def canary_interval(config: RouterConfig, spec: ModelSpec) -> float | None:
    """Seconds between canaries of this model (preset key over flag); None = off."""
    value = effective(spec, config, CANARY_INTERVAL)
    return value if value else None


def canary_due(
    config: RouterConfig,
    spec: ModelSpec,
    *,
    now: float,
    last_canary: float,
    last_activity: float,
    busy: bool,
    sleeping: bool,
) -> bool:
    """Whether the liveness loop should send a canary now: never while busy or asleep, and
    not within an interval of the last canary or of the last request (a served request
    is proof enough)."""
    interval = canary_interval(config, spec)
    if interval is None or busy or sleeping:
        return False
    return now - max(last_canary, last_activity) >= interval
