"""The one way the router speaks HTTP to a child llama-server (and the tools helper),
outside the request relay (web/relay.py, web/proxy.py), which writes raw HTTP for speed
but takes the child's address from here too.

Every call is bounded by the timeout its caller passes (a `Timeouts` setting). A child
that does not answer -- connection refused or reset, timed out, or an answer that is not
what llama-server sends -- is one case, `NO_ANSWER`: each method either turns it into its
"unknown" value (health, info, metrics, stream lookup) or raises `ChildError`, for the
callers that log why (keep-cache, stream stop).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import aiohttp

from .http1 import MAX_HEAD, ExchangeFailed, Head, parse_head

log = logging.getLogger("llamarouter.core.childclient")

# Every child listens on loopback only (childargs forces --host, as upstream's router does).
CHILD_HOST = "127.0.0.1"

# The child did not answer: aiohttp wraps most socket errors, but not all (OSError), and
# a body that is not JSON or not UTF-8 is a ValueError.
NO_ANSWER: tuple[type[BaseException], ...] = (aiohttp.ClientError, TimeoutError, OSError, ValueError)

# The liveness probe's request (its whole answer is read up to `MAX_HEAD` bytes).
_PROBE = b"GET /health HTTP/1.1\r\nHost: " + CHILD_HOST.encode() + b":%d\r\nConnection: close\r\n\r\n"

# A one-token completion that cannot be answered from a stale slot (see canary.py).
_CANARY_BODY = {
    "prompt": "0",
    "max_tokens": 1,
    "n_predict": 1,
    "temperature": 0,
    "cache_prompt": False,
    "stream": False,
}


def child_host(port: int) -> str:
    """`host:port` of the child on `port` (its Host header, its address in messages)."""
    return f"{CHILD_HOST}:{port}"


def child_url(port: int, path: str = "") -> str:
    """The URL of `path` (with its query, if any) on the child on `port`."""
    return f"http://{child_host(port)}{path}"


class ChildError(Exception):
    """The child did not answer, or refused (`status` is then its HTTP status); the
    message says which, for logs."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.status = status


class ChildClient:
    """Speaks to children on the router's child session; holds nothing else."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    # ----------------------------------------------------------------- liveness (Probe)
    async def health(self, port: int, timeout: float) -> int | None:
        """The status of GET /health (200 ready, 503 loading), None when unreachable.

        Written by hand on a connection of its own, closed after the answer: a READY
        child is probed every `health_interval` while the router rests, and each probe
        through the session cost several times the CPU (a pooled connection's setup and
        expiry, aiohttp's request and response objects), run cold after seconds asleep."""
        try:
            async with asyncio.timeout(timeout):
                return await _probe(port)
        except (TimeoutError, OSError, ExchangeFailed):
            return None

    async def info(self, port: int, timeout: float) -> dict[str, Any]:
        """The child's own /v1/models entry (merged into the router's), {} on failure."""
        try:
            _, raw = await self._call("GET", port, "/v1/models", timeout)
            body = _json(raw)
        except ChildError:
            return {}
        data = body.get("data") if isinstance(body, dict) else None
        if isinstance(data, list) and data and isinstance(data[0], dict):
            return dict(data[0])
        return {}

    async def canary(self, port: int, timeout: float) -> bool:
        """True when the child completed one token within `timeout` seconds."""
        try:
            status, raw = await self._call("POST", port, "/completion", timeout, body=_CANARY_BODY)
            body = _json(raw)
        except ChildError as exc:
            log.warning("canary on port %d failed: %s", port, exc)
            return False
        if status != 200 or not isinstance(body, dict) or "content" not in body:
            log.warning("canary on port %d failed: HTTP %d", port, status)
            return False
        return True

    async def sleeping(self, port: int, timeout: float) -> bool | None:
        """The child's own `/props` `is_sleeping` (answered from a cache: it never wakes
        the child); None when the answer does not say. Raises `ChildError`."""
        body = await self._json_ok("GET", port, "/props", timeout)
        value = body.get("is_sleeping") if isinstance(body, dict) else None
        return value if isinstance(value, bool) else None

    # ----------------------------------------------------------------- keep-cache
    async def slots(self, port: int, timeout: float) -> list[dict[str, Any]]:
        """GET /slots: one dict per slot. Raises `ChildError`. Wakes a sleeping child."""
        body = await self._json_ok("GET", port, "/slots", timeout)
        return [s for s in body if isinstance(s, dict)] if isinstance(body, list) else []

    async def save_slot(self, port: int, slot: int, filename: str, timeout: float) -> tuple[int, int]:
        """Save one slot's KV cache into `filename` (in the child's --slot-save-path):
        (tokens, bytes) written. Raises `ChildError`."""
        body = await self._json_ok(
            "POST", port, f"/slots/{slot}", timeout, body={"filename": filename}, params={"action": "save"}
        )
        saved, written = _ints(body, "n_saved", "n_written")
        return saved, written

    async def restore_slot(self, port: int, slot: int, filename: str, timeout: float) -> int:
        """Restore one slot's KV cache from `filename`: the tokens restored. Raises `ChildError`."""
        body = await self._json_ok(
            "POST", port, f"/slots/{slot}", timeout, body={"filename": filename}, params={"action": "restore"}
        )
        return _ints(body, "n_restored")[0]

    # ----------------------------------------------------------------- metrics
    async def metrics(self, port: int, timeout: float) -> str | None:
        """The child's Prometheus text (it serves it only with --metrics), None otherwise."""
        try:
            status, raw = await self._call("GET", port, "/metrics", timeout)
            if status != 200:
                return None
            return raw.decode()
        except (ChildError, UnicodeDecodeError):
            return None

    # ----------------------------------------------------------------- resumable streams
    async def lookup_streams(self, port: int, conversation_ids: list[str], timeout: float) -> list[dict[str, Any]]:
        """What the child knows of these conversations' streams; [] when it cannot say."""
        try:
            status, raw = await self._call(
                "POST", port, "/v1/streams/lookup", timeout, body={"conversation_ids": conversation_ids}
            )
            body = _json(raw) if status == 200 else None
        except ChildError:
            return []
        return [e for e in body if isinstance(e, dict)] if isinstance(body, list) else []

    async def stop_stream(self, port: int, conv_id: str, timeout: float) -> None:
        """DELETE /v1/stream (idempotent on the child), whatever it answers. Raises
        `ChildError` when it does not."""
        await self._call("DELETE", port, "/v1/stream", timeout, params={"conv_id": conv_id})

    # ----------------------------------------------------------------- relaying
    def forward(
        self,
        method: str,
        port: int,
        path_qs: str,
        *,
        data: bytes | None,
        headers: Mapping[str, str],
        timeout: float,
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """One request passed through as is, its response to be streamed by the caller
        inside the `async with`; `timeout` bounds the connect and each read, not the whole
        exchange. The caller catches `NO_ANSWER`, raised while it reads too."""
        return self._session.request(
            method, child_url(port, path_qs), data=data, headers=dict(headers), allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout),
        )

    # ----------------------------------------------------------------- internals
    async def _call(
        self,
        method: str,
        port: int,
        path: str,
        timeout: float,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """The status and body of one bounded request; `ChildError` when it has none."""
        try:
            async with self._session.request(
                method, child_url(port, path), json=body, params=params,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                return resp.status, await resp.read()
        except NO_ANSWER as exc:
            raise ChildError(_why(exc)) from exc

    async def _json_ok(
        self,
        method: str,
        port: int,
        path: str,
        timeout: float,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """The JSON of a 200 answer; `ChildError` for any other (with llama-server's
        error message) or none."""
        status, raw = await self._call(method, port, path, timeout, body=body, params=params)
        if status != 200:
            try:
                message = _message(_json(raw))
            except ChildError:  # an error page that is not llama-server's JSON
                message = ""
            raise ChildError(f"HTTP {status}: {message}", status)
        return _json(raw)


def _json(raw: bytes) -> Any:
    # As aiohttp's resp.json(): an empty body is None, not an error.
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ChildError(_why(exc)) from exc


def _ints(body: Any, *keys: str) -> tuple[int, ...]:
    try:
        return tuple(int(body[k]) for k in keys)
    except (KeyError, TypeError, ValueError) as exc:
        raise ChildError(f"unexpected answer: {_why(exc)}") from exc


def _message(data: Any) -> str:
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message", ""))
    return ""


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _probe(port: int) -> int:
    """GET /health with `Connection: close`: the status once the head and the body its
    length announces are in (llama-server's are a few dozen bytes)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, (CHILD_HOST, port))
        await loop.sock_sendall(sock, _PROBE % port)
        answer = b""
        head: Head | None = None
        whole = MAX_HEAD  # head and body, once the head says how long the body is
        while head is None or len(answer) < whole:
            more = await loop.sock_recv(sock, 4096)
            if not more:
                raise ExchangeFailed("closed before the whole answer")
            answer += more
            if head is None and (end := answer.find(b"\r\n\r\n")) >= 0:
                head = parse_head(answer[:end])
                whole = end + 4 + (head.length or 0)
            if max(whole, len(answer)) > MAX_HEAD:
                raise ExchangeFailed("answer to /health too large")
        return head.status
    finally:
        sock.close()
