"""HTTP/1.1 response heads from a child (llama-server, cpp-httplib): the status line and
headers, and the body framing they announce."""

from __future__ import annotations

# Response heads larger than this are a protocol error (llama-server's are < 1 KiB).
MAX_HEAD = 64 * 1024


class ExchangeFailed(Exception):
    """The exchange with the child failed (connection lost, timeout, bad response)."""


class Head:
    """A child's response status line and headers."""

    __slots__ = ("chunked", "headers", "keep_alive", "length", "status")

    def __init__(self, status: int, headers: list[tuple[str, str]], length: int | None,
                 keep_alive: bool, chunked: bool) -> None:
        self.status = status
        self.headers = headers
        self.length = length
        self.keep_alive = keep_alive
        self.chunked = chunked

    def get(self, name: str, default: str = "") -> str:
        low = name.lower()
        for key, value in self.headers:
            if key.lower() == low:
                return value
        return default


def parse_head(raw: bytes) -> Head:
    lines = raw.decode("utf-8", "surrogateescape").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ExchangeFailed(f"bad status line from child: {lines[0][:100]!r}")
    try:
        status = int(parts[1])
    except ValueError:
        raise ExchangeFailed(f"bad status line from child: {lines[0][:100]!r}") from None
    headers: list[tuple[str, str]] = []
    length: int | None = None
    chunked = False
    keep_alive = parts[0] == "HTTP/1.1"
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ExchangeFailed(f"bad header line from child: {line[:100]!r}")
        value = value.strip()
        headers.append((name, value))
        low = name.lower()
        if low == "content-length":
            if not value.isdigit() or (length is not None and length != int(value)):
                raise ExchangeFailed(f"bad Content-Length from child: {value[:40]!r}")
            length = int(value)
        elif low == "transfer-encoding":
            chunked = value.lower().endswith("chunked")
        elif low == "connection" and "close" in value.lower():
            keep_alive = False
    if chunked:
        length = None
    return Head(status, headers, length, keep_alive, chunked)
