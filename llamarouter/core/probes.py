"""How the core asks a child whether it is up: /health for readiness and liveness, and
its /v1/models entry once ready. A Protocol, so process tests can script the answers
without sockets; childclient.ChildClient is the one that asks over HTTP."""

from __future__ import annotations

from typing import Any, Protocol


class Probe(Protocol):
    async def health(self, port: int, timeout: float) -> int | None:
        """The status of GET /health (200 ready, 503 loading), None when unreachable."""
        ...

    async def info(self, port: int, timeout: float) -> dict[str, Any]:
        """The child's own /v1/models entry (merged into the router's), {} on failure."""
        ...

    async def canary(self, port: int, timeout: float) -> bool:
        """A one-token completion answered within `timeout` (see canary.py)."""
        ...
