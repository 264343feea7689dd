"""Why a child failed to load, from its own output (a pure function; no I/O).

llama-server reports a model it cannot load with a chain of lines, most of them generic
("failed to load model", "exiting due to model loading error"); the cause is the one or
two lines from the GGUF reader or the model loader before them ("failed to open GGUF file
'…' (No such file or directory)", "invalid magic characters: …"). `explain_failure` keeps
those, so the error a client gets and `status` in GET /models say why.

`is_permanent` tells a file that cannot load at all (missing, unreadable, not GGUF,
corrupt) from a failure that a retry may fix (out of memory, a crash): retrying the former
only repeats the same lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# Optional "0.00.057.823 " timestamp and "E " level of llama.cpp's log format.
_PREFIX = re.compile(r"^(?:\d+\.\d+\.\d+\.\d+\s+)?(?:[EWIDT]\s+)?")
# "srv    load_model: " / "cmn  common_init_: " / "llama_model_load: " style sources.
_SOURCE = re.compile(r"^(?:[a-z]{3}\s+)?(?P<func>[A-Za-z_][\w:~<>]*):\s+")

# The line llama-server prints right before it exits because the model did not load
# (server.cpp); it marks a load failure, as opposed to a crash later on.
LOAD_ERROR_EXIT = "exiting due to model loading error"

# Lines that only say "it failed", never why: the chain around every load failure.
_GENERIC = (
    re.compile(r"^failed to load model\b"),
    re.compile(r"^error loading model: llama_model_loader: failed to load model from "),
    re.compile(r"^encountered an error while trying to fit params"),
    re.compile(r"^exiting due to "),
    re.compile(r"cleaning up before exit"),
    re.compile(r"^failed to load model, '"),
)

# Causes: what the GGUF reader, the file layer and the model loader say is wrong.
_CAUSE = re.compile(
    r"failed to open GGUF file|invalid magic characters|failed to read (?:magic|header|key-value pairs"
    r"|tensor info|tensor data)|bad GGUF version|GGUFv1 is no longer supported|this GGUF file is version"
    r"|number of (?:tensors|key value pairs) is|duplicate (?:key|tensor name)|has invalid (?:GGUF|ggml) type"
    r"|invalid number of dimensions|alignment \d+ is not a power of 2|tensor data is not within the file bounds"
    r"|error loading model|unknown model architecture|missing tensor|wrong number of tensors"
    r"|tensor '.*' has (?:wrong shape|invalid data)|key not found in model|is not a valid split"
    r"|No such file or directory|Permission denied|Is a directory"
    r"|failed to allocate|out of memory|cudaMalloc failed|unable to allocate",
    re.IGNORECASE,
)
# Causes that say the file itself is unusable: loading it again gives the same answer.
_FILE_CAUSE = re.compile(
    r"failed to open GGUF file|invalid magic characters|failed to read (?:magic|header|key-value pairs"
    r"|tensor info)|bad GGUF version|GGUFv1 is no longer supported|this GGUF file is version"
    r"|number of (?:tensors|key value pairs) is|duplicate (?:key|tensor name)|has invalid (?:GGUF|ggml) type"
    r"|invalid number of dimensions|alignment \d+ is not a power of 2|tensor data is not within the file bounds"
    r"|unknown model architecture|missing tensor|wrong number of tensors|tensor '.*' has wrong shape"
    r"|No such file or directory|Permission denied|Is a directory",
    re.IGNORECASE,
)
# At most this many distinct cause lines go into a message.
MAX_CAUSES = 3


@dataclass(frozen=True)
class LoadFailure:
    cause: str | None  # the child's own words, " | "-joined, or None when it gave none
    permanent: bool  # the file cannot load at all: do not retry it as if it had crashed


def _message(line: str) -> str:
    text = _PREFIX.sub("", line.strip(), count=1)
    match = _SOURCE.match(text)
    return text[match.end():] if match else text


def _last_attempt(lines: Sequence[str]) -> Sequence[str]:
    # A restarted child's output follows the previous one's: look at the last load only.
    for i in range(len(lines) - 1, -1, -1):
        if "load_model: loading model" in lines[i]:
            return lines[i:]
    return lines


def causes(lines: Iterable[str]) -> list[str]:
    """The distinct cause lines (without timestamp, level and function), in order."""
    out: list[str] = []
    for line in lines:
        text = _message(line)
        if not text or any(g.search(text) for g in _GENERIC) or not _CAUSE.search(text):
            continue
        if text not in out:
            out.append(text)
    return out


def classify(lines: Sequence[str]) -> LoadFailure:
    """The cause and permanence of the last load attempt in a child's output."""
    attempt = _last_attempt(lines)
    found = causes(attempt)
    load_error = any(LOAD_ERROR_EXIT in line for line in attempt)
    permanent = load_error and any(_FILE_CAUSE.search(c) for c in found)
    return LoadFailure(" | ".join(found[:MAX_CAUSES]) if found else None, permanent)


def explain_failure(log_lines: Sequence[str]) -> str | None:
    """Why the child's last load failed, in its own words, or None when it did not say."""
    return classify(log_lines).cause
