"""The first import of the command line: aiohttp, without two things it does at import
that a router only pays for in memory.

- aiohttp builds two TLS client contexts when it is imported, and both parse the system's
  CA bundle: about 2 MiB resident, for a process that never speaks TLS (its one HTTP
  client talks plain HTTP to its children on loopback; downloads are the children's own).
  It is imported here with `SSL_CERT_FILE` naming an empty file, then the variable is put
  back as it was, so every child sees the environment the router was given. Those two
  contexts can then only trust less than before, never more: they still find CAs in the
  system's hashed certificate directory where it has one, and fail closed where not.
- `aiohttp.web` reads the system's MIME type files at import (about 0.35 MiB) for a guess
  the router never asks it for: the files it serves say their own type (the UI's and
  `--path`'s tables, `llamarouter.web.mediatypes`).

Importing this module has those effects only when it is the first import of aiohttp in
the process; anywhere else it is a no-op.
"""

from __future__ import annotations

import mimetypes
import os
import sys


def _import_aiohttp() -> None:
    if "aiohttp" in sys.modules:
        return
    mimetypes.knownfiles = []
    saved = os.environ.get("SSL_CERT_FILE")
    os.environ["SSL_CERT_FILE"] = os.devnull
    try:
        import aiohttp.web  # noqa: F401  # imported for its side effect on sys.modules
    finally:
        if saved is None:
            del os.environ["SSL_CERT_FILE"]
        else:
            os.environ["SSL_CERT_FILE"] = saved


_import_aiohttp()
