"""Media types by file name, for the files the router serves itself.

The table is what llama-server says for the files of `--path` (its HTTP library's
built-in list; an unknown extension is `application/octet-stream`), so a client sees the
same Content-Type from either. The router does not ask Python's `mimetypes`: its answer
depends on the host's MIME files, and reading them costs resident memory at startup.
"""

from __future__ import annotations

from types import MappingProxyType

UNKNOWN = "application/octet-stream"

BY_EXTENSION = MappingProxyType({
    "css": "text/css",
    "csv": "text/csv",
    "htm": "text/html",
    "html": "text/html",
    "js": "text/javascript",
    "mjs": "text/javascript",
    "txt": "text/plain",
    "vtt": "text/vtt",
    "apng": "image/apng",
    "avif": "image/avif",
    "bmp": "image/bmp",
    "gif": "image/gif",
    "png": "image/png",
    "svg": "image/svg+xml",
    "webp": "image/webp",
    "ico": "image/x-icon",
    "tif": "image/tiff",
    "tiff": "image/tiff",
    "jpg": "image/jpeg",
    "jpeg": "image/jpeg",
    "mp4": "video/mp4",
    "mpeg": "video/mpeg",
    "webm": "video/webm",
    "mp3": "audio/mp3",
    "mpga": "audio/mpeg",
    "weba": "audio/webm",
    "wav": "audio/wave",
    "otf": "font/otf",
    "ttf": "font/ttf",
    "woff": "font/woff",
    "woff2": "font/woff2",
    "7z": "application/x-7z-compressed",
    "atom": "application/atom+xml",
    "pdf": "application/pdf",
    "json": "application/json",
    "rss": "application/rss+xml",
    "tar": "application/x-tar",
    "xht": "application/xhtml+xml",
    "xhtml": "application/xhtml+xml",
    "xslt": "application/xslt+xml",
    "xml": "application/xml",
    "gz": "application/gzip",
    "zip": "application/zip",
    "wasm": "application/wasm",
})


def media_type(name: str) -> str:
    """The type of a file named `name`, by what follows its last dot (case as given,
    like llama-server's: `A.HTML` is not `text/html`)."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return UNKNOWN
    return BY_EXTENSION.get(base.rsplit(".", 1)[1], UNKNOWN)
