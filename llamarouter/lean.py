"""The first import of the command line: aiohttp, without three things it does at import
that a router only pays for in memory.

- aiohttp's client builds two TLS client contexts when it is imported (the first one
  initialises OpenSSL's TLS tables, about 0.6 MiB, and both parse the system's CA bundle,
  about 2 MiB more), for a process that never speaks TLS: its one HTTP client talks plain
  HTTP to its children on loopback, downloads are the children's own, and the router
  serves plain HTTP. aiohttp is imported here as on a Python built without `ssl`, which it
  supports: its client then refuses `https://` URLs ("SSL is not supported") instead of
  building contexts for them. Only aiohttp's own modules see `ssl` missing: the standard
  library's users of it (`asyncio`, `http.client`, `urllib.request`) are imported first,
  with `ssl`, and uvloop imports it later as usual. An aiohttp that cannot be imported
  without `ssl` is imported again the usual way.
- `aiohttp.web` reads the system's MIME type files at import (about 0.35 MiB) for a guess
  the router never asks it for: the files it serves say their own type (the UI's and
  `--path`'s tables, `llamarouter.web.mediatypes`).
- aiohttp's `frozenlist` dependency ships its compiled module built as C++, and loading it
  maps the C++ runtime (libstdc++, about 1 MiB resident) into a process that has no other
  use for it. Its pure-Python twin is asked for (`FROZENLIST_NO_EXTENSIONS`, the package's
  own switch, read when it is imported): the router's frozen lists are aiohttp's signal and
  middleware lists, read a handful of times per request, never on a per-byte path. The
  variable is set for the length of the import only, then put back as it was, so every
  child sees the environment the router was given.

Importing this module has those effects only when it is the first import of aiohttp in
the process; anywhere else it is a no-op.
"""

from __future__ import annotations

import mimetypes
import os
import sys

_SWITCH = "FROZENLIST_NO_EXTENSIONS"
_ABSENT = object()


def _import_aiohttp() -> None:
    if "aiohttp" in sys.modules:
        return
    mimetypes.knownfiles = []
    # The standard library's modules that use ssl when they find it, imported with it.
    import asyncio  # noqa: F401  # imported so that it finds ssl
    import http.client  # noqa: F401  # imported so that it finds ssl
    import urllib.request  # noqa: F401  # imported so that it finds ssl

    try:
        import ssl  # noqa: F401  # imported to be put back after aiohttp's import
    except ImportError:
        pass  # a Python built without it: aiohttp does without it anyway
    ssl_entry = sys.modules.get("ssl", _ABSENT)
    given = os.environ.get(_SWITCH)
    os.environ[_SWITCH] = "1"
    sys.modules["ssl"] = None  # type: ignore[assignment]  # None: "no such module", for import
    try:
        try:
            import aiohttp.web  # imported for its side effect on sys.modules
        except ImportError:
            # An aiohttp that needs ssl: its half-imported modules go, and it is imported
            # again with ssl (and the CA bundle that comes with it).
            for name in [m for m in sys.modules if m == "aiohttp" or m.startswith("aiohttp.")]:
                del sys.modules[name]
            _put_back(ssl_entry)
            import aiohttp.web  # noqa: F401  # imported for its side effect on sys.modules
    finally:
        _put_back(ssl_entry)
        if given is None:
            del os.environ[_SWITCH]
        else:
            os.environ[_SWITCH] = given


def _put_back(entry: object) -> None:
    if entry is _ABSENT:
        sys.modules.pop("ssl", None)
    else:
        sys.modules["ssl"] = entry  # type: ignore[assignment]  # the module, or None as it was


_import_aiohttp()
