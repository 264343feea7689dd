"""How the core asks a child whether it is up: /health for readiness and liveness, and
its /v1/models entry once ready. A Protocol, so process tests can script the answers
without sockets."""

from __future__ import annotations

from typing import Any, Protocol

import aiohttp

from .canary import canary


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


class HttpProbe:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def canary(self, port: int, timeout: float) -> bool:
        return await canary(self._session, port, timeout)

    async def health(self, port: int, timeout: float) -> int | None:
        try:
            async with self._session.get(
                f"http://127.0.0.1:{port}/health", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    async def info(self, port: int, timeout: float) -> dict[str, Any]:
        try:
            async with self._session.get(
                f"http://127.0.0.1:{port}/v1/models", timeout=aiohttp.ClientTimeout(total=timeout)
            ) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return {}
        data = body.get("data") if isinstance(body, dict) else None
        if isinstance(data, list) and data and isinstance(data[0], dict):
            return dict(data[0])
        return {}
