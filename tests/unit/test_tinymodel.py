"""Generated GGUF models: metadata, layout, determinism, size targeting, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
from click.testing import CliRunner

from llamarouter.devtools.cli import dev
from llamarouter.devtools.tinymodel import (
    DEFAULT_SHAPE,
    DRAFT_SHAPE,
    FTYPES,
    ModelShape,
    VOCAB_SIZE,
    estimate_file_size,
    make_demo_models,
    parse_size,
    planned_files,
    shape_for_size,
    shard_paths,
    write_draft_model,
    write_mmproj,
    write_model,
)


def field(reader: gguf.GGUFReader, key: str) -> Any:
    f = reader.get_field(key)
    assert f is not None, f"missing metadata key {key}"
    return f.contents()


def tensors(reader: gguf.GGUFReader) -> dict[str, gguf.ReaderTensor]:
    return {t.name: t for t in reader.tensors}


# --------------------------------------------------------------------------
# single-file models


def test_default_model_metadata(tmp_path: Path) -> None:
    [path] = write_model(tmp_path / "tiny.gguf")
    assert path == tmp_path / "tiny.gguf"
    r = gguf.GGUFReader(path)

    assert field(r, "general.architecture") == "llama"
    assert field(r, "general.name") == "tiny"
    assert field(r, "general.file_type") == gguf.LlamaFileType.ALL_F32
    assert field(r, "llama.context_length") == DEFAULT_SHAPE.n_ctx_train == 2048
    assert field(r, "llama.embedding_length") == 64
    assert field(r, "llama.block_count") == 2
    assert field(r, "llama.feed_forward_length") == 128
    assert field(r, "llama.attention.head_count") == 4
    assert field(r, "llama.attention.head_count_kv") == 4
    assert field(r, "llama.rope.dimension_count") == 16
    assert field(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    assert field(r, "llama.vocab_size") == VOCAB_SIZE == 259


def test_vocabulary(tmp_path: Path) -> None:
    [path] = write_model(tmp_path / "tiny.gguf")
    r = gguf.GGUFReader(path)
    tokens = field(r, "tokenizer.ggml.tokens")
    types = field(r, "tokenizer.ggml.token_type")
    scores = field(r, "tokenizer.ggml.scores")

    assert field(r, "tokenizer.ggml.model") == "llama"
    assert len(tokens) == len(types) == len(scores) == 259
    assert tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert tokens[3] == "<0x00>" and tokens[3 + 0x41] == "<0x41>" and tokens[-1] == "<0xFF>"
    assert types[:3] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    assert set(types[3:]) == {gguf.TokenType.BYTE}
    assert (field(r, "tokenizer.ggml.unknown_token_id"), field(r, "tokenizer.ggml.bos_token_id"),
            field(r, "tokenizer.ggml.eos_token_id")) == (0, 1, 2)
    assert field(r, "tokenizer.ggml.add_bos_token") is True
    assert field(r, "tokenizer.ggml.add_eos_token") is False


def test_tensor_layout_and_exact_size(tmp_path: Path) -> None:
    shape = ModelShape(n_embd=96, n_layer=3, n_head=6, n_head_kv=2, n_ff=160)
    [path] = write_model(tmp_path / "gqa.gguf", shape)
    t = tensors(gguf.GGUFReader(path))

    assert len(t) == shape.n_tensors == 3 + 9 * 3
    # GGUF stores ggml order: innermost dimension first.
    assert list(t["token_embd.weight"].shape) == [96, 259]
    assert list(t["output.weight"].shape) == [96, 259]
    assert list(t["blk.2.attn_k.weight"].shape) == [96, 2 * 16]
    assert list(t["blk.0.ffn_down.weight"].shape) == [160, 96]
    assert t["output_norm.weight"].data.tolist() == [1.0] * 96
    assert sum(int(x.n_elements) for x in t.values()) == shape.n_params
    assert path.stat().st_size == estimate_file_size(shape, name="gqa")


def test_special_token_logits_are_neutral(tmp_path: Path) -> None:
    # Zero output rows for <unk>/<s>/</s> keep random models from ending early.
    [path] = write_model(tmp_path / "tiny.gguf")
    out = tensors(gguf.GGUFReader(path))["output.weight"].data
    assert not out[:3].any()
    assert np.all(out[3:].any(axis=1))


def test_tied_embeddings_have_no_output_tensor(tmp_path: Path) -> None:
    shape = ModelShape(tie_embeddings=True)
    [path] = write_model(tmp_path / "tied.gguf", shape)
    t = tensors(gguf.GGUFReader(path))
    assert "output.weight" not in t and len(t) == shape.n_tensors


@pytest.mark.parametrize(
    ("ftype", "matrix_type", "file_type"),
    [
        ("f32", gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
        ("f16", gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
        ("q8_0", gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    ],
)
def test_ftypes(tmp_path: Path, ftype: str, matrix_type: gguf.GGMLQuantizationType,
                file_type: gguf.LlamaFileType) -> None:
    [path] = write_model(tmp_path / f"{ftype}.gguf", ftype=ftype)
    r = gguf.GGUFReader(path)
    t = tensors(r)
    assert field(r, "general.file_type") == file_type
    assert t["blk.0.attn_q.weight"].tensor_type == matrix_type
    assert t["token_embd.weight"].tensor_type == matrix_type
    assert t["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert path.stat().st_size == estimate_file_size(ftype=ftype, name=ftype)
    # The quantized values must decode close to the f32 reference weights.
    [ref] = write_model(tmp_path / "ref.gguf")
    want = tensors(gguf.GGUFReader(ref))["blk.1.ffn_up.weight"].data
    got = gguf.quants.dequantize(t["blk.1.ffn_up.weight"].data, matrix_type)
    np.testing.assert_allclose(got, want, atol=0.01)


def test_q8_0_requires_multiples_of_32() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        write_model("unused.gguf", ModelShape(n_embd=48, n_head=4, n_head_kv=4), ftype="q8_0")


def test_unknown_ftype_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match="ftype"):
        write_model("unused.gguf", ftype="q4_k")
    with pytest.raises(ValueError, match="divisible"):
        ModelShape(n_embd=64, n_head=5)
    with pytest.raises(ValueError, match="n_head_kv"):
        ModelShape(n_head=4, n_head_kv=3)
    with pytest.raises(ValueError, match="positive"):
        ModelShape(n_layer=0)


# --------------------------------------------------------------------------
# determinism


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    [a] = write_model(tmp_path / "a" / "m.gguf", ftype="f16", seed=7)
    [b] = write_model(tmp_path / "b" / "m.gguf", ftype="f16", seed=7)
    [c] = write_model(tmp_path / "c" / "m.gguf", ftype="f16", seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.stat().st_size == c.stat().st_size and a.read_bytes() != c.read_bytes()


def test_split_does_not_change_weights(tmp_path: Path) -> None:
    [single] = write_model(tmp_path / "single.gguf", seed=3)
    shards = write_model(tmp_path / "split.gguf", seed=3, n_shards=3)
    want = tensors(gguf.GGUFReader(single))
    got: dict[str, gguf.ReaderTensor] = {}
    for shard in shards:
        got |= tensors(gguf.GGUFReader(shard))
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name].data, want[name].data)


def test_no_temporary_files_left(tmp_path: Path) -> None:
    write_model(tmp_path / "m.gguf", n_shards=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"]


# --------------------------------------------------------------------------
# split models


def test_split_metadata_and_names(tmp_path: Path) -> None:
    paths = write_model(tmp_path / "big.gguf", n_shards=2)
    assert [p.name for p in paths] == ["big-00001-of-00002.gguf", "big-00002-of-00002.gguf"]
    assert paths == shard_paths(tmp_path / "big.gguf", 2)
    assert not (tmp_path / "big.gguf").exists()

    readers = [gguf.GGUFReader(p) for p in paths]
    for i, r in enumerate(readers):
        assert field(r, "split.no") == i
        assert field(r, "split.count") == 2
        assert field(r, "split.tensors.count") == DEFAULT_SHAPE.n_tensors
    assert sum(len(r.tensors) for r in readers) == DEFAULT_SHAPE.n_tensors
    # Model metadata lives in the first shard only, like convert_hf_to_gguf output.
    assert field(readers[0], "general.architecture") == "llama"
    assert readers[1].get_field("general.architecture") is None
    assert field(readers[0], "general.name") == "big"
    expected = planned_files(tmp_path / "big.gguf", n_shards=2)
    assert [(p, p.stat().st_size) for p in paths] == expected


def test_split_max_tensors(tmp_path: Path) -> None:
    paths = write_model(tmp_path / "m.gguf", split_max_tensors=8)  # 21 tensors -> 8 + 8 + 5
    assert [p.name for p in paths] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert [len(gguf.GGUFReader(p).tensors) for p in paths] == [8, 8, 5]


def test_split_larger_than_tensor_count_writes_one_file(tmp_path: Path) -> None:
    assert write_model(tmp_path / "m.gguf", split_max_tensors=1000) == [tmp_path / "m.gguf"]


def test_split_argument_errors() -> None:
    with pytest.raises(ValueError, match="exactly 8 shards"):
        write_model("unused.gguf", n_shards=8)  # 21 tensors: 3 per shard gives 7 files
    with pytest.raises(ValueError, match="either"):
        write_model("unused.gguf", n_shards=2, split_max_tensors=5)
    with pytest.raises(ValueError):
        write_model("unused.gguf", n_shards=0)


# --------------------------------------------------------------------------
# size targeting


@pytest.mark.parametrize("ftype", FTYPES)
@pytest.mark.parametrize("target", ["30KB", "100KB", "300KB", "1MB", "5MB", "50MB", "500MB", "1GiB", "5GB"])
def test_shape_for_size_accuracy(ftype: str, target: str) -> None:
    n = parse_size(target)
    size = estimate_file_size(shape_for_size(n, ftype=ftype), ftype)
    assert abs(size - n) / n < 0.05


@pytest.mark.parametrize(("target", "ftype"), [("300KB", "f32"), ("2MB", "f16"), ("1MB", "q8_0"), ("12MB", "f32")])
def test_written_file_matches_target(tmp_path: Path, target: str, ftype: str) -> None:
    n = parse_size(target)
    [path] = write_model(tmp_path / "m.gguf", shape_for_size(n, ftype=ftype), ftype=ftype)
    assert abs(path.stat().st_size - n) / n < 0.15


def test_shape_for_size_small_targets_give_smallest_model() -> None:
    tiny = shape_for_size(1)
    assert tiny == shape_for_size(1000)
    assert tiny.n_layer == 1 and tiny.tie_embeddings
    assert estimate_file_size(tiny) < 20_000
    assert shape_for_size(1, ftype="q8_0").n_embd % 32 == 0


def test_shape_for_size_looks_like_a_model() -> None:
    shape = shape_for_size(parse_size("1GiB"), ftype="f16")
    assert shape.n_embd % 64 == 0 and shape.head_dim == 64
    assert shape.n_embd <= shape.n_ff <= 4 * shape.n_embd
    assert 4 <= shape.n_layer <= 32


def test_shape_for_size_rejects_non_positive() -> None:
    for bad in (0, -5):
        with pytest.raises(ValueError):
            shape_for_size(bad)


# --------------------------------------------------------------------------
# parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0), ("4096", 4096), ("12B", 12), (" 7 ", 7), (1234, 1234),
        ("300KB", 300_000), ("300kb", 300_000), ("5MB", 5_000_000), ("2GB", 2_000_000_000),
        ("1KiB", 1024), ("5MiB", 5 * 2**20), ("1GiB", 2**30), ("1gib", 2**30), ("1TiB", 2**40),
        ("5M", 5 * 2**20), ("8k", 8192), ("1.5MB", 1_500_000), ("0.5GiB", 2**29), ("10 MB", 10_000_000),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "  ", "MB", "5XB", "-5MB", "5 M B", "1e6", "five", "5MB!", "1..5MB", -1, None, True])
def test_parse_size_rejects(text: Any) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


# --------------------------------------------------------------------------
# draft and projector


def test_draft_model_shares_the_vocabulary(tmp_path: Path) -> None:
    [main] = write_model(tmp_path / "main.gguf")
    draft = write_draft_model(tmp_path / "draft.gguf")
    rm, rd = gguf.GGUFReader(main), gguf.GGUFReader(draft)
    assert field(rd, "llama.block_count") == DRAFT_SHAPE.n_layer < DEFAULT_SHAPE.n_layer
    assert draft.stat().st_size < main.stat().st_size
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"):
        assert field(rd, key) == field(rm, key)


def test_mmproj_metadata(tmp_path: Path) -> None:
    path = write_mmproj(tmp_path / "mmproj-tiny.gguf")
    r = gguf.GGUFReader(path)
    t = tensors(r)
    assert field(r, "general.architecture") == "clip"
    assert "mmproj" in path.name and "mmproj" in field(r, "general.name")
    assert field(r, "clip.has_vision_encoder") is True
    assert field(r, "clip.projector_type") == "mlp"
    assert field(r, "clip.vision.projection_dim") == DEFAULT_SHAPE.n_embd
    assert len(field(r, "clip.vision.image_mean")) == 3
    # The projector's output width must equal the text model's n_embd.
    assert list(t["mm.2.weight"].shape) == [DEFAULT_SHAPE.n_embd, DEFAULT_SHAPE.n_embd]
    assert {"v.patch_embd.weight", "v.position_embd.weight", "v.blk.1.attn_out.weight"} <= t.keys()
    assert path.read_bytes() == write_mmproj(tmp_path / "again" / "mmproj-tiny.gguf").read_bytes()


def test_mmproj_for_wider_text_model(tmp_path: Path) -> None:
    path = write_mmproj(tmp_path / "mmproj.gguf", n_embd_text=128)
    assert list(tensors(gguf.GGUFReader(path))["mm.2.weight"].shape) == [128, 128]


def test_mmproj_name_must_say_mmproj(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mmproj"):
        write_mmproj(tmp_path / "projector.gguf")


# --------------------------------------------------------------------------
# demo folder


def test_make_demo_models_is_idempotent(tmp_path: Path) -> None:
    paths = make_demo_models(tmp_path)
    rel = sorted(str(p.relative_to(tmp_path)) for p in paths)
    assert rel == ["tiny-a.gguf", "tiny-b.gguf", "tiny-split/tiny-split-00001-of-00002.gguf",
                   "tiny-split/tiny-split-00002-of-00002.gguf"]
    stamps = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths}

    assert make_demo_models(tmp_path) == paths
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in paths} == stamps

    # A damaged file is replaced; untouched ones are kept.
    damaged = tmp_path / "tiny-b.gguf"
    original = damaged.read_bytes()
    damaged.write_bytes(original[: len(original) // 2])
    make_demo_models(tmp_path)
    assert damaged.read_bytes() == original
    assert (paths[0].stat().st_ino, paths[0].stat().st_mtime_ns) == stamps[paths[0]]


# --------------------------------------------------------------------------
# CLI


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(dev, list(args), catch_exceptions=False)


def test_cli_make_model_by_size(tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    result = run_cli("make-model", "--out", str(out), "--size", "300KB", "--ftype", "f16", "--seed", "4")
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    assert abs(out.stat().st_size - 300_000) / 300_000 < 0.05
    assert out.read_bytes() == write_model(tmp_path / "x" / "m.gguf", shape_for_size(300_000, ftype="f16"),
                                           ftype="f16", seed=4)[0].read_bytes()


def test_cli_make_model_by_dimensions(tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    result = run_cli("make-model", "--out", str(out), "--n-embd", "96", "--n-layer", "3", "--n-head", "6",
                     "--n-head-kv", "3", "--n-ff", "200", "--ctx", "4096", "--name", "custom")
    assert result.exit_code == 0, result.output
    r = gguf.GGUFReader(out)
    assert [field(r, f"llama.{k}") for k in ("embedding_length", "block_count", "attention.head_count",
                                              "attention.head_count_kv", "feed_forward_length",
                                              "context_length")] == [96, 3, 6, 3, 200, 4096]
    assert field(r, "general.name") == "custom"


def test_cli_split_draft_mmproj_and_demo(tmp_path: Path) -> None:
    assert run_cli("make-model", "--out", str(tmp_path / "s.gguf"), "--split", "3").exit_code == 0
    assert [p.name for p in sorted(tmp_path.glob("s-*.gguf"))] == [f"s-0000{i}-of-00003.gguf" for i in (1, 2, 3)]

    assert run_cli("make-model", "--out", str(tmp_path / "d.gguf"), "--draft").exit_code == 0
    assert field(gguf.GGUFReader(tmp_path / "d.gguf"), "llama.block_count") == DRAFT_SHAPE.n_layer

    result = run_cli("make-model", "--out", str(tmp_path / "mmproj-x.gguf"), "--mmproj", "--n-embd", "128")
    assert result.exit_code == 0, result.output
    r = gguf.GGUFReader(tmp_path / "mmproj-x.gguf")
    assert field(r, "general.architecture") == "clip" and field(r, "clip.vision.projection_dim") == 128

    result = run_cli("make-demo", str(tmp_path / "demo"))
    assert result.exit_code == 0 and "tiny-split-00002-of-00002.gguf" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["--size", "5XB"],
        ["--size", "0"],
        ["--size", "1MB", "--n-embd", "64"],
        ["--n-embd", "30"],
        ["--ftype", "q8_0", "--n-embd", "48"],
        ["--split", "8"],
        ["--mmproj", "--draft"],
        ["--mmproj", "--size", "1MB"],
        ["--draft", "--n-layer", "3"],
        ["--ftype", "q4_0"],
    ],
)
def test_cli_usage_errors(tmp_path: Path, args: list[str]) -> None:
    out = tmp_path / "mmproj-m.gguf"
    result = run_cli("make-model", "--out", str(out), *args)
    assert result.exit_code == 2, result.output
    assert not out.exists()


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    out = tmp_path / "m.gguf"
    proc = subprocess.run(
        [sys.executable, "-m", "llamarouter.devtools", "make-model", "--out", str(out), "--n-layer", "1"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert field(gguf.GGUFReader(out), "llama.block_count") == 1
