"""How much memory a model will take, from its GGUF metadata, before it is loaded.

weights: the tensor data (all shards), split between GPU and CPU by -ngl the way llama.cpp
         places layers (the last -ngl repeating layers, then the output layer; token
         embeddings stay on the CPU).
kv:      n_ctx cells x layers x (K width x K type size + V width x V type size), with n_ctx
         rounded up as llama.cpp does (per sequence to a multiple of 256).
compute: an allowance for the scheduler's compute buffer; llama.cpp sizes it from the graph,
         which we do not build, so this is a rough upper-ish figure, not a measurement.

Checked against the sizes llama-server prints at load (tests/integration/test_memory_real.py):
weights and KV within 10 %.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Bytes per element of the KV cache types llama-server accepts for -ctk/-ctv
# (block size, bytes per block).
_KV_TYPE_BYTES: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "iq4_nl": (32, 18),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
}
_PAD = 256
_BLOCK = re.compile(r"^blk\.(\d+)\.")
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
MiB = 1024 * 1024


@dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs from a GGUF, read once per file."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    key_length: int
    value_length: int
    n_ctx_train: int
    n_vocab: int
    n_ff: int
    weight_bytes: int
    layer_bytes: tuple[int, ...]  # per repeating layer (blk.N.*)
    output_bytes: int  # output.weight / output_norm (offloaded after the layers)
    input_bytes: int  # token embeddings and anything else that stays on the CPU


@dataclass(frozen=True)
class Estimate:
    weights_gpu: int
    weights_cpu: int
    kv: int
    compute: int
    n_ctx: int

    @property
    def weights(self) -> int:
        return self.weights_gpu + self.weights_cpu

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute

    def as_dict(self) -> dict[str, int]:
        return {
            "weights": self.weights,
            "weights_gpu": self.weights_gpu,
            "weights_cpu": self.weights_cpu,
            "kv": self.kv,
            "compute": self.compute,
            "n_ctx": self.n_ctx,
            "total": self.total,
        }


def shard_paths(path: Path) -> list[Path]:
    """All shards of a split model given its first shard (or [path])."""
    m = _SHARD.match(path.name)
    if not m or int(m.group("index")) != 1:
        return [path]
    count = int(m.group("count"))
    return [path.with_name(f"{m.group('stem')}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def read_facts(path: Path) -> ModelFacts:
    """Read metadata and tensor sizes (memory-maps the files; no tensor data is read)."""
    import gguf

    first: gguf.GGUFReader | None = None
    layer: dict[int, int] = {}
    output = inputs = 0
    for shard in shard_paths(path):
        reader = gguf.GGUFReader(str(shard), "r")
        first = first or reader
        for t in reader.tensors:
            size = int(t.n_bytes)
            m = _BLOCK.match(t.name)
            if m:
                idx = int(m.group(1))
                layer[idx] = layer.get(idx, 0) + size
            elif t.name.startswith("output"):
                output += size
            else:
                inputs += size
    assert first is not None
    meta = _Meta(first)
    arch = meta.text("general.architecture") or "llama"
    n_layer = meta.integer(f"{arch}.block_count") or (max(layer) + 1 if layer else 0)
    n_embd = meta.integer(f"{arch}.embedding_length") or 0
    n_head = meta.integer(f"{arch}.attention.head_count") or 1
    n_head_kv = meta.integer(f"{arch}.attention.head_count_kv") or n_head
    head_dim = n_embd // n_head if n_head else 0
    layers = tuple(layer.get(i, 0) for i in range(n_layer))
    return ModelFacts(
        arch=arch,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        key_length=meta.integer(f"{arch}.attention.key_length") or head_dim,
        value_length=meta.integer(f"{arch}.attention.value_length") or head_dim,
        n_ctx_train=meta.integer(f"{arch}.context_length") or 4096,
        n_vocab=meta.integer(f"{arch}.vocab_size") or meta.array_len("tokenizer.ggml.tokens"),
        n_ff=meta.integer(f"{arch}.feed_forward_length") or 4 * n_embd,
        weight_bytes=sum(layers) + output + inputs + sum(v for k, v in layer.items() if k >= n_layer),
        layer_bytes=layers,
        output_bytes=output,
        input_bytes=inputs,
    )


class _Meta:
    def __init__(self, reader: object) -> None:
        self._fields = reader.fields  # type: ignore[attr-defined]  # the gguf reader's fields are not in its stubs

    def _value(self, key: str) -> object | None:
        f = self._fields.get(key)
        if f is None or not f.data:
            return None
        value: object = f.parts[f.data[0]]
        return value

    def integer(self, key: str) -> int | None:
        v = self._value(key)
        if v is None:
            return None
        try:
            return int(v[0])  # type: ignore[index]  # a numpy array here
        except (TypeError, ValueError, IndexError):
            return None

    def text(self, key: str) -> str | None:
        v = self._value(key)
        if v is None:
            return None
        try:
            raw: bytes = bytes(v)  # type: ignore[call-overload]  # a numpy uint8 array here
            return raw.decode("utf-8")
        except (TypeError, ValueError):
            return None

    def array_len(self, key: str) -> int:
        f = self._fields.get(key)
        return len(f.data) if f is not None else 0


@dataclass(frozen=True)
class RunSettings:
    """The child flags that change memory use (from the merged child options)."""

    n_ctx: int = 0  # -c; 0 = the model's training context
    n_parallel: int = -1  # -np; -1 = auto (unified KV)
    n_gpu_layers: int | None = None  # -ngl; None = the build's default
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    n_ubatch: int = 512
    kv_unified: bool | None = None

    @classmethod
    def from_options(cls, opts: Mapping[str, str]) -> RunSettings:
        def num(key: str, default: int) -> int:
            try:
                return int(opts[key])
            except (KeyError, ValueError):
                return default

        ngl_text = opts.get("-ngl")
        ngl: int | None
        if ngl_text is None or ngl_text == "auto":
            ngl = None
        elif ngl_text == "all":
            ngl = 1 << 30
        else:
            try:
                ngl = int(ngl_text)
            except ValueError:
                ngl = None
        kvu = opts.get("-kvu")
        return cls(
            n_ctx=num("-c", 0),
            n_parallel=num("-np", -1),
            n_gpu_layers=ngl,
            cache_type_k=opts.get("-ctk", "f16"),
            cache_type_v=opts.get("-ctv", "f16"),
            n_ubatch=num("-ub", 512),
            kv_unified=None if kvu is None else kvu not in ("false", "0", "off"),
        )


def _kv_bytes(kind: str, elements: int) -> int:
    block, size = _KV_TYPE_BYTES.get(kind, (1, 2))
    return math.ceil(elements / block) * size


def effective_ctx(facts: ModelFacts, run: RunSettings) -> int:
    """Total KV cells llama.cpp allocates: per-sequence context padded to 256."""
    n_ctx = run.n_ctx if run.n_ctx > 0 else facts.n_ctx_train
    n_seq = run.n_parallel if run.n_parallel > 0 else 1
    unified = run.kv_unified if run.kv_unified is not None else run.n_parallel <= 0
    if unified:
        return _pad(n_ctx)
    per_seq = _pad(math.ceil(n_ctx / n_seq))
    return per_seq * n_seq


def _pad(n: int) -> int:
    return max(_PAD, math.ceil(n / _PAD) * _PAD)


def estimate(facts: ModelFacts, run: RunSettings, gpu: bool) -> Estimate:
    """The memory a child will use; GPU bytes only when the build offloads (gpu=True)."""
    n_layer = facts.n_layer
    if gpu:
        # llama.cpp offloads the last `ngl` repeating layers, and the output layer once
        # ngl exceeds the layer count; a GPU build with no -ngl offloads what fits ("auto"),
        # which we count as everything.
        ngl = run.n_gpu_layers if run.n_gpu_layers is not None else n_layer + 1
        first_gpu = max(n_layer - ngl, 0)
        gpu_w = sum(facts.layer_bytes[first_gpu:]) + (facts.output_bytes if ngl > n_layer else 0)
    else:
        gpu_w = 0
        first_gpu = n_layer
    cpu_w = facts.weight_bytes - gpu_w
    n_ctx = effective_ctx(facts, run)
    k_width = facts.key_length * facts.n_head_kv
    v_width = facts.value_length * facts.n_head_kv
    kv = facts.n_layer * (
        _kv_bytes(run.cache_type_k, n_ctx * k_width) + _kv_bytes(run.cache_type_v, n_ctx * v_width)
    )
    # Logits and the widest activations for one micro-batch, in f32, plus a fixed floor for
    # the graph's own scratch; measured buffers on the generated models are 6-10 MiB.
    compute = 4 * run.n_ubatch * (facts.n_vocab + 4 * facts.n_embd + 2 * facts.n_ff) + 4 * MiB
    return Estimate(weights_gpu=gpu_w, weights_cpu=cpu_w, kv=kv, compute=compute, n_ctx=n_ctx)


class FactsCache:
    """read_facts() memoised by (path, size, mtime): rescans and reloads stay cheap."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], ModelFacts] = {}

    def get(self, path: Path) -> ModelFacts:
        st = os.stat(path)
        cache_key = (str(path), st.st_size, st.st_mtime_ns)
        facts = self._cache.get(cache_key)
        if facts is None:
            facts = read_facts(path)
            self._cache[cache_key] = facts
        return facts


# llama-server's load report (at verbosity >= 4, or older builds at default verbosity):
#   load_tensors:   CPU_Mapped model buffer size =     9.01 MiB
#   llama_kv_cache:        CPU KV buffer size =     1.00 MiB
#   sched_reserve:        CPU compute buffer size =     6.02 MiB
_BUFFER_LINE = re.compile(
    r"(?P<dev>[A-Za-z0-9_]+)\s+(?P<kind>model|KV|compute|output)\s+buffer size\s*=\s*"
    r"(?P<num>[0-9.]+)\s*(?P<unit>[KMG]i?B)"
)
_UNITS = {"KiB": 1024, "MiB": MiB, "GiB": 1024 * MiB, "KB": 1000, "MB": 10**6, "GB": 10**9}


def parse_buffer_line(line: str) -> tuple[str, str, int] | None:
    """(device, kind, bytes) from one load-report line, or None."""
    m = _BUFFER_LINE.search(line)
    if m is None:
        return None
    dev = m.group("dev")
    if dev.endswith("_Mapped"):
        dev = dev[: -len("_Mapped")]
    return dev, m.group("kind").lower(), int(float(m.group("num")) * _UNITS[m.group("unit")])
