"""Request JSON read as strictly as llama-server's parser (nlohmann) reads it."""

from __future__ import annotations

import json
import math
import re
from typing import Any


def parse_json(raw: bytes) -> Any:
    """JSON as llama-server's parser (nlohmann) reads it: NaN and Infinity, numbers too
    large for a double and unpaired surrogates are errors (Python's json takes them, so a
    request llama-server would refuse could load a model first). Raises ValueError."""
    if not raw:
        raise ValueError("empty input")
    try:
        data = _STRICT.decode(raw.decode("utf-8-sig"))  # nlohmann skips a BOM too
    except UnicodeDecodeError as exc:
        raise ValueError(str(exc)) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if _SURROGATE_ESCAPE.search(raw):  # one may be unpaired: look at every string
        _check_strings(data)
    return data


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number overflow: {text[:40]}")
    return value


def _bounded_int(text: str) -> int:
    value = int(text)
    if len(text) > 300:  # beyond int64 nlohmann reads a double, and this one may not fit
        try:
            float(value)
        except OverflowError:
            raise ValueError(f"number overflow: {text[:40]}...") from None
    return value


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_STRICT = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int)


def _check_strings(data: Any) -> None:
    # Iterative: the document may be nested nearly as deep as the parser allows.
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            strings: Any = (item,)
        elif isinstance(item, dict):
            strings = item.keys()
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
            continue
        else:
            continue
        for text in strings:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("invalid string: a surrogate escape without its pair") from None
