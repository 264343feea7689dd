"""Model discovery (models dir, HF cache, INI presets) and a child's argv / preset text.

Discovery only looks at file names, so most files here hold a few dummy bytes; one test
uses a real split model from the tiny-model generator.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from llamarouter.settings.childargs import ChildArgs
from llamarouter.cli import flag_tables
from llamarouter.settings.config import ModelSpec, RouterConfig
from llamarouter.devtools.tinymodel import write_model
from llamarouter.settings.discovery import (
    Discovery,
    Sources,
    cache_dir_from_env,
    canonical_tag,
    parse_preset_file,
    scan_cache,
    scan_models_dir,
    split_info,
)
from llamarouter.errors import ConfigError
from llamarouter.settings.flags import FlagTable, key

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture(scope="module")
def table() -> FlagTable:
    """The preset table the router uses (llama-server options + preset-only keys)."""
    return flag_tables()[1]


def opt_key(table: FlagTable, env: str) -> str:
    """Option key (first spelling) of the option read from environment variable `env`."""
    opt = table.by_env(env)
    assert opt is not None, env
    return key(opt)


def touch(path: Path, data: bytes = b"GGUF") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def discover(
    table: FlagTable,
    models_dir: Path | None = None,
    preset: Path | None = None,
    cache: Path | None = None,
) -> dict[str, ModelSpec]:
    return Discovery(Sources(models_dir, preset, cache), table)()


def write_preset(tmp_path: Path, text: str, name: str = "models.ini") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- split names


@pytest.mark.parametrize(
    ("filename", "expected"),
    [
        ("a.gguf", ("a", 1, 1)),
        ("big-00001-of-00003.gguf", ("big", 1, 3)),
        ("big-00003-of-00003.gguf", ("big", 3, 3)),
        ("x-UD-Q8_0-00002-of-00002.gguf", ("x-UD-Q8_0", 2, 2)),
        ("not-a-shard-0001-of-0003.gguf", ("not-a-shard-0001-of-0003", 1, 1)),
    ],
)
def test_split_info(filename: str, expected: tuple[str, int, int]) -> None:
    assert split_info(filename) == expected


# --------------------------------------------------------------------------- models dir


def test_top_level_file_is_a_model_named_after_it(tmp_path: Path) -> None:
    a = touch(tmp_path / "a.gguf")
    touch(tmp_path / "notes.txt")
    models = scan_models_dir(tmp_path)
    assert [(m.name, m.path, m.mmproj, m.draft) for m in models] == [("a", a, None, None)]


@pytest.mark.parametrize(
    "companion",
    ["mmproj-a-f16.gguf", "a-mmproj.gguf", "mtp-a.gguf", "dspark-a.gguf", "dflash-a.gguf"],
)
def test_top_level_companion_files_are_ignored(tmp_path: Path, companion: str) -> None:
    touch(tmp_path / "a.gguf")
    touch(tmp_path / companion)
    assert [m.name for m in scan_models_dir(tmp_path)] == ["a"]


def test_top_level_shards_form_one_model_at_the_first_shard(tmp_path: Path) -> None:
    # Upstream lists each shard as its own model; we list the split model once.
    for i in (3, 1, 2):
        touch(tmp_path / f"big-0000{i}-of-00003.gguf")
    touch(tmp_path / "small.gguf")
    models = {m.name: m for m in scan_models_dir(tmp_path)}
    assert sorted(models) == ["big", "small"]
    assert models["big"].path == tmp_path / "big-00001-of-00003.gguf"


def test_top_level_shards_without_first_are_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    touch(tmp_path / "big-00002-of-00003.gguf")
    touch(tmp_path / "big-00003-of-00003.gguf")
    with caplog.at_level(logging.WARNING, logger="llamarouter.settings.discovery"):
        assert scan_models_dir(tmp_path) == []
    assert "big" in caplog.text


def test_subdirectory_with_one_file_is_named_after_the_directory(tmp_path: Path) -> None:
    f = touch(tmp_path / "m" / "whatever-Q4_K_M.gguf")
    models = scan_models_dir(tmp_path)
    assert [(m.name, m.path, m.mmproj, m.draft) for m in models] == [("m", f, None, None)]


def test_subdirectory_with_real_shards_mmproj_and_draft(tmp_path: Path, table: FlagTable) -> None:
    sub = tmp_path / "vision"
    shards = write_model(sub / "big.gguf", split_max_tensors=8)
    assert len(shards) > 1
    mmproj = touch(sub / "mmproj-big-f16.gguf")
    touch(sub / "mtp-big.gguf")
    draft = touch(sub / "dflash-big.gguf")  # only the first draft by name is used
    models = scan_models_dir(tmp_path)
    assert len(models) == 1
    m = models[0]
    assert (m.name, m.path, m.mmproj, m.draft) == ("vision", shards[0], mmproj, draft)
    assert m.path.name == "big-00001-of-" + f"{len(shards):05d}" + ".gguf"

    spec = discover(table, models_dir=tmp_path)["vision"]
    opts = dict(spec.options)
    assert spec.source == "models_dir"
    assert opts[opt_key(table, "LLAMA_ARG_MODEL")] == str(shards[0])
    assert opts[opt_key(table, "LLAMA_ARG_MMPROJ")] == str(mmproj)
    assert opts[opt_key(table, "LLAMA_ARG_SPEC_DRAFT_MODEL")] == str(draft)
    assert spec.model_path == str(shards[0])
    assert spec.input_modalities == ("text", "image")


def test_subdirectory_shard_is_preferred_over_plain_files(tmp_path: Path) -> None:
    sub = tmp_path / "m"
    touch(sub / "aaa.gguf")
    touch(sub / "zz-00002-of-00002.gguf")
    first = touch(sub / "zz-00001-of-00002.gguf")
    assert scan_models_dir(tmp_path)[0].path == first


def test_subdirectory_with_two_candidates_picks_first_by_name_and_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sub = tmp_path / "m"
    touch(sub / "b-model.gguf")
    a = touch(sub / "a-model.gguf")
    with caplog.at_level(logging.WARNING, logger="llamarouter.settings.discovery"):
        models = scan_models_dir(tmp_path)
    assert [(m.name, m.path) for m in models] == [("m", a)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "a-model.gguf" in warnings[0].getMessage()
    assert "b-model.gguf" in warnings[0].getMessage()


def test_subdirectory_without_gguf_is_no_model(tmp_path: Path) -> None:
    touch(tmp_path / "empty" / "README.md")
    (tmp_path / "really-empty").mkdir()
    touch(tmp_path / "only-mmproj" / "mmproj-f16.gguf")
    assert scan_models_dir(tmp_path) == []


def test_nested_directories_are_not_scanned(tmp_path: Path) -> None:
    touch(tmp_path / "m" / "deeper" / "x.gguf")
    assert scan_models_dir(tmp_path) == []


def test_hidden_entries_are_ignored(tmp_path: Path) -> None:
    touch(tmp_path / ".hidden.gguf")
    touch(tmp_path / ".cache" / "x.gguf")
    real = touch(tmp_path / "m" / "model.gguf")
    touch(tmp_path / "m" / "._model.gguf")  # macOS AppleDouble companion
    models = scan_models_dir(tmp_path)
    assert [(m.name, m.path) for m in models] == [("m", real)]


def test_models_are_sorted_by_name(tmp_path: Path) -> None:
    for name in ("c.gguf", "a.gguf", "b/x.gguf"):
        touch(tmp_path / name)
    assert [m.name for m in scan_models_dir(tmp_path)] == ["a", "b", "c"]


def test_missing_models_dir_is_a_config_error(tmp_path: Path, table: FlagTable) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        scan_models_dir(tmp_path / "nope")
    touch(tmp_path / "file.gguf")
    with pytest.raises(ConfigError):
        scan_models_dir(tmp_path / "file.gguf")
    with pytest.raises(ConfigError):
        discover(table, models_dir=tmp_path / "nope")


# --------------------------------------------------------------------------- cache


def make_repo(cache: Path, repo: str, files: list[str], *, ref: str = "main", commit: str = COMMIT) -> Path:
    owner, name = repo.split("/")
    repo_dir = cache / f"models--{owner}--{name}"
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / ref).write_text(commit + "\n")
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for f in files:
        touch(snap / f)
    return snap


def test_cache_ids_tags_shards_and_mmproj(tmp_path: Path) -> None:
    snap = make_repo(
        tmp_path,
        "owner/repo",
        [
            "model-Q4_K_M.gguf",
            "x-UD-Q8_0-00001-of-00002.gguf",
            "x-UD-Q8_0-00002-of-00002.gguf",
            "mmproj-F16.gguf",
            "mtp-model-Q2_K.gguf",
            "weights.gguf",  # no tag
        ],
    )
    models = {m.name: m for m in scan_cache(tmp_path)}
    assert sorted(models) == ["owner/repo:Q4_K_M", "owner/repo:Q8_0"]
    assert models["owner/repo:Q4_K_M"].path == snap / "model-Q4_K_M.gguf"
    assert models["owner/repo:Q8_0"].path == snap / "x-UD-Q8_0-00001-of-00002.gguf"
    for m in models.values():
        assert m.mmproj == snap / "mmproj-F16.gguf"


def test_cache_tag_is_upper_cased(tmp_path: Path) -> None:
    make_repo(tmp_path, "o/r", ["model.q5_k_s.gguf"])
    assert [m.name for m in scan_cache(tmp_path)] == ["o/r:Q5_K_S"]


def test_cache_without_mmproj(tmp_path: Path) -> None:
    make_repo(tmp_path, "o/r", ["m-F16.gguf"])
    (m,) = scan_cache(tmp_path)
    assert m.mmproj is None


def test_cache_ref_fallback_when_main_is_absent(tmp_path: Path) -> None:
    snap = make_repo(tmp_path, "o/r", ["m-Q4_0.gguf"], ref="dev")
    (m,) = scan_cache(tmp_path)
    assert (m.name, m.path) == ("o/r:Q4_0", snap / "m-Q4_0.gguf")


def test_cache_prefers_main_over_other_refs(tmp_path: Path) -> None:
    make_repo(tmp_path, "o/r", ["old-Q4_0.gguf"], ref="aaa-branch", commit=OTHER_COMMIT)
    snap = make_repo(tmp_path, "o/r", ["new-Q4_0.gguf"], ref="main", commit=COMMIT)
    (m,) = scan_cache(tmp_path)
    assert m.path == snap / "new-Q4_0.gguf"


def test_cache_invalid_commit_is_skipped(tmp_path: Path) -> None:
    make_repo(tmp_path, "o/bad", ["m-Q4_0.gguf"], commit="not-a-commit")
    make_repo(tmp_path, "o/good", ["m-Q4_0.gguf"])
    assert [m.name for m in scan_cache(tmp_path)] == ["o/good:Q4_0"]


def test_cache_skips_missing_snapshot_and_non_repo_dirs(tmp_path: Path) -> None:
    repo_dir = tmp_path / "models--o--nosnap"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(COMMIT)
    touch(tmp_path / "datasets--o--d" / "snapshots" / COMMIT / "m-Q4_0.gguf")
    touch(tmp_path / "models--bad" / "snapshots" / COMMIT / "m-Q4_0.gguf")
    assert scan_cache(tmp_path) == []
    assert scan_cache(tmp_path / "missing") == []


def test_cache_models_in_discovery(tmp_path: Path, table: FlagTable) -> None:
    snap = make_repo(tmp_path / "cache", "owner/repo", ["model-Q4_K_M.gguf", "mmproj-F16.gguf"])
    specs = discover(table, cache=tmp_path / "cache")
    spec = specs["owner/repo:Q4_K_M"]
    assert spec.source == "cache"
    opts = dict(spec.options)
    assert opts[opt_key(table, "LLAMA_ARG_MODEL")] == str(snap / "model-Q4_K_M.gguf")
    assert opts[opt_key(table, "LLAMA_ARG_MMPROJ")] == str(snap / "mmproj-F16.gguf")
    assert spec.input_modalities == ("text", "image")


CACHE_VARS = [
    ("LLAMA_CACHE", "llama", ""),
    ("HF_HUB_CACHE", "hfhub", ""),
    ("HUGGINGFACE_HUB_CACHE", "hfhub2", ""),
    ("HF_HOME", "hfhome", "hub"),
    ("XDG_CACHE_HOME", "xdg", "huggingface/hub"),
    ("HOME", "home", ".cache/huggingface/hub"),
]


@pytest.mark.parametrize("winner", range(len(CACHE_VARS)))
def test_cache_dir_precedence(winner: int) -> None:
    # every variable from `winner` on is set; the first of them decides
    environ = {var: f"/base/{base}" for var, base, _ in CACHE_VARS[winner:]}
    environ["UNRELATED"] = "x"
    var, base, sub = CACHE_VARS[winner]
    expected = Path(f"/base/{base}") / sub if sub else Path(f"/base/{base}")
    assert cache_dir_from_env(environ) == expected


def test_cache_dir_empty_values_are_unset() -> None:
    assert cache_dir_from_env({"LLAMA_CACHE": "", "HF_HOME": "/h"}) == Path("/h/hub")
    assert cache_dir_from_env({}) is None


# --------------------------------------------------------------------------- presets


def test_preset_key_spellings(tmp_path: Path, table: FlagTable) -> None:
    ini = write_preset(
        tmp_path,
        """
[*]
n-gpu-layers = 99

[a]
model = /m/a.gguf
c = 2048
temp = 0.7

[b]
m = /m/b.gguf
ngl = 12
LLAMA_ARG_CTX_SIZE = 4096
no-jinja = true
jinja = false
""",
    )
    specs = discover(table, preset=ini)
    a, b = dict(specs["a"].options), dict(specs["b"].options)
    ngl, ctx, temp, jinja = "-ngl", "-c", "--temp", "--jinja"
    assert a[opt_key(table, "LLAMA_ARG_N_GPU_LAYERS")] == a[ngl] == "99"
    assert a[ctx] == "2048"
    assert a[temp] == "0.7"
    assert b[ngl] == "12"
    assert opt_key(table, "LLAMA_ARG_CTX_SIZE") == ctx
    assert b[ctx] == "4096"
    assert b[jinja] == "false"  # last key wins; both say "off"
    assert specs["a"].source == specs["b"].source == "preset"


@pytest.mark.parametrize(
    ("line", "stored"),
    [
        ("no-jinja = true", "false"),
        ("no-jinja = 1", "false"),
        ("no-jinja = false", "true"),
        ("no-jinja = maybe", "true"),  # upstream: anything not truthy enables
        ("jinja = true", "true"),
        ("jinja = off", "off"),
        ("LLAMA_ARG_JINJA = on", "on"),
        ("nocb = on", "false"),
        ("no-cont-batching = on", "false"),
    ],
)
def test_preset_no_prefix_inverts_value(tmp_path: Path, table: FlagTable, line: str, stored: str) -> None:
    ini = write_preset(tmp_path, f"[a]\nmodel = /m/a.gguf\n{line}\n")
    _, (preset,) = parse_preset_file(ini, table)
    name = line.split("=")[0].strip()
    hit = table.by_preset_key(name)
    assert hit is not None
    assert dict(preset.options)[key(hit.opt)] == stored


def test_preset_only_keys_alias_and_tags(tmp_path: Path, table: FlagTable) -> None:
    ini = write_preset(
        tmp_path,
        """
[a]
model = /m/a.gguf
alias = first, second ,,third
tags = chat,small
load-on-startup = true
stop-timeout = 5
ttl = 300
pin = on
""",
    )
    spec = discover(table, preset=ini)["a"]
    assert spec.aliases == ("first", "second", "third")
    assert spec.tags == ("chat", "small")
    assert spec.load_on_startup is True
    assert spec.stop_timeout == 5.0
    assert spec.ttl == 300.0
    assert spec.pin is True
    assert spec.model_path == "/m/a.gguf"
    assert spec.input_modalities == ("text",)


def test_preset_only_key_defaults(tmp_path: Path, table: FlagTable) -> None:
    ini = write_preset(tmp_path, "[a]\nmodel = /m/a.gguf\n")
    spec = discover(table, preset=ini)["a"]
    assert (spec.aliases, spec.tags, spec.load_on_startup, spec.stop_timeout, spec.ttl, spec.pin) == (
        (), (), False, None, None, False,
    )


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("pin = perhaps", "pin"),
        ("load-on-startup = yes", "load-on-startup"),
        ("ttl = soon", "ttl"),
        ("ttl = -1", "ttl"),
        ("stop-timeout = x", "stop-timeout"),
    ],
)
def test_preset_only_key_bad_values(tmp_path: Path, table: FlagTable, line: str, message: str) -> None:
    ini = write_preset(tmp_path, f"[a]\nmodel = /m/a.gguf\n{line}\n")
    with pytest.raises(ConfigError, match=message):
        discover(table, preset=ini)


def test_global_section_applies_to_every_source(tmp_path: Path, table: FlagTable) -> None:
    models = tmp_path / "models"
    touch(models / "local.gguf")
    make_repo(tmp_path / "cache", "o/r", ["m-Q4_0.gguf"])
    ini = write_preset(tmp_path, "[*]\nc = 1234\n\n[p]\nmodel = /m/p.gguf\n")
    specs = discover(table, models_dir=models, preset=ini, cache=tmp_path / "cache")
    assert sorted(specs) == ["local", "o/r:Q4_0", "p"]
    for spec in specs.values():
        assert dict(spec.options)["-c"] == "1234"
    assert "*" not in specs


def test_precedence_router_cli_over_section_over_global(tmp_path: Path, table: FlagTable) -> None:
    ini = write_preset(
        tmp_path,
        """
[*]
c = 1024
temp = 0.1
top-k = 10

[a]
model = /m/a.gguf
c = 2048
temp = 0.2
""",
    )
    spec = discover(table, preset=ini)["a"]
    config = RouterConfig(server_bin="/bin/srv", child_options=(("--temp", "0.9"),))
    argv = ChildArgs(config, table).argv(spec, 5555)
    assert argv.count("--ctx-size") == argv.count("--temperature") == argv.count("--top-k") == 1
    assert argv[argv.index("--ctx-size") + 1] == "2048"  # section over [*]
    assert argv[argv.index("--temperature") + 1] == "0.9"  # router CLI over section
    assert argv[argv.index("--top-k") + 1] == "10"  # [*] fills the gaps


def test_section_matching_models_dir_model_merges(tmp_path: Path, table: FlagTable) -> None:
    models = tmp_path / "models"
    a = touch(models / "a.gguf")
    touch(models / "b.gguf")
    ini = write_preset(tmp_path, "[a]\nc = 4096\nalias = alpha\n")
    specs = discover(table, models_dir=models, preset=ini)
    assert specs["a"].source == "preset"
    assert specs["b"].source == "models_dir"
    opts = dict(specs["a"].options)
    assert opts[opt_key(table, "LLAMA_ARG_MODEL")] == str(a)
    assert opts["-c"] == "4096"
    assert specs["a"].aliases == ("alpha",)
    assert specs["a"].model_path == str(a)


def test_section_can_override_discovered_model_path(tmp_path: Path, table: FlagTable) -> None:
    models = tmp_path / "models"
    touch(models / "a.gguf")
    ini = write_preset(tmp_path, "[a]\nmodel = /elsewhere/a.gguf\n")
    assert discover(table, models_dir=models, preset=ini)["a"].model_path == "/elsewhere/a.gguf"


def test_new_section_with_hf_repo_is_enough(tmp_path: Path, table: FlagTable) -> None:
    ini = write_preset(tmp_path, "[remote]\nhf-repo = owner/repo:Q4_K_M\n")
    spec = discover(table, preset=ini)["remote"]
    assert dict(spec.options)[opt_key(table, "LLAMA_ARG_HF_REPO")] == "owner/repo:Q4_K_M"
    assert spec.model_path is None


def test_new_section_without_model_is_a_config_error(tmp_path: Path, table: FlagTable) -> None:
    ini = write_preset(tmp_path, "[lonely]\nc = 4096\n")
    with pytest.raises(ConfigError, match=r"\[lonely\]"):
        discover(table, preset=ini)


def test_unknown_key_names_file_section_and_key(tmp_path: Path, table: FlagTable) -> None:
    ini = write_preset(tmp_path, "[a]\nmodel = /m/a.gguf\nsystem-prompt = hi\n")
    with pytest.raises(ConfigError) as info:
        discover(table, preset=ini)
    message = info.value.message
    assert str(ini) in message
    assert "[a]" in message
    assert "system-prompt" in message


def test_router_settings_are_not_preset_keys(tmp_path: Path, table: FlagTable) -> None:
    # llamarouter's own command-line settings (--max-queue ...) are not INI keys
    ini = write_preset(tmp_path, "[a]\nmodel = /m/a.gguf\nmax-queue = 3\n")
    with pytest.raises(ConfigError, match="max-queue"):
        discover(table, preset=ini)


def test_preset_keys_are_case_sensitive(tmp_path: Path, table: FlagTable) -> None:
    ini = write_preset(tmp_path, "[a]\nmodel = /m/a.gguf\nCTX-SIZE = 1\n")
    with pytest.raises(ConfigError, match="CTX-SIZE"):
        discover(table, preset=ini)


def test_version_key_is_ignored(tmp_path: Path, table: FlagTable) -> None:
    ini = write_preset(tmp_path, "[*]\nversion = 1\n[a]\nversion = 2\nmodel = /m/a.gguf\n")
    glob, (preset,) = parse_preset_file(ini, table)
    assert glob is not None and glob.options == ()
    assert [k for k, _ in preset.options] == ["-m"]


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("repo:q4_k_m", "repo:Q4_K_M"),
        ("owner/repo:q8_0", "owner/repo:Q8_0"),
        # upstream keeps only the last [-.] token of the tag, like cache ids
        ("owner/repo:ud-q4_k_xl", "owner/repo:Q4_K_XL"),
        ("owner/repo:UD-Q8_0", "owner/repo:Q8_0"),
        ("plain-name", "plain-name"),
        ("*", "*"),
    ],
)
def test_canonical_tag(section: str, expected: str) -> None:
    assert canonical_tag(section) == expected


def test_section_name_is_canonicalised_and_merges_with_cache(tmp_path: Path, table: FlagTable) -> None:
    make_repo(tmp_path / "cache", "owner/repo", ["m-Q4_K_M.gguf", "x-UD-Q8_0.gguf"])
    ini = write_preset(tmp_path, "[owner/repo:q4_k_m]\nc = 111\n\n[owner/repo:ud-q8_0]\nc = 222\n")
    specs = discover(table, preset=ini, cache=tmp_path / "cache")
    assert sorted(specs) == ["owner/repo:Q4_K_M", "owner/repo:Q8_0"]
    assert dict(specs["owner/repo:Q4_K_M"].options)["-c"] == "111"
    assert dict(specs["owner/repo:Q8_0"].options)["-c"] == "222"
    assert {s.source for s in specs.values()} == {"preset"}


def test_comments_and_blank_lines(tmp_path: Path, table: FlagTable) -> None:
    ini = write_preset(
        tmp_path,
        """; leading comment
# another comment

[a]   ; section comment
model = /m/a.gguf  # inline comment
   ; indented comment
c = 512 ; trailing
""",
    )
    _, (preset,) = parse_preset_file(ini, table)
    assert preset.name == "a"
    assert dict(preset.options) == {"-m": "/m/a.gguf", "-c": "512"}


def test_key_outside_section_is_a_config_error(tmp_path: Path, table: FlagTable) -> None:
    ini = write_preset(tmp_path, "c = 1\n[a]\nmodel = /m/a.gguf\n")
    with pytest.raises(ConfigError, match=str(ini)):
        discover(table, preset=ini)


def test_missing_preset_file_is_a_config_error(tmp_path: Path, table: FlagTable) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        discover(table, preset=tmp_path / "missing.ini")


def test_two_value_option_is_refused_in_presets(tmp_path: Path, table: FlagTable) -> None:
    ini = write_preset(tmp_path, "[a]\nmodel = /m/a.gguf\ncontrol-vector-layer-range = 1 2\n")
    with pytest.raises(ConfigError, match="control-vector-layer-range"):
        discover(table, preset=ini)


def test_alias_clash_between_models_names_both(tmp_path: Path, table: FlagTable) -> None:
    ini = write_preset(
        tmp_path,
        "[first]\nmodel = /m/1.gguf\nalias = shared\n\n[second]\nmodel = /m/2.gguf\nalias = shared\n",
    )
    with pytest.raises(ConfigError) as info:
        discover(table, preset=ini)
    message = info.value.message
    assert "shared" in message and "first" in message and "second" in message


def test_alias_clash_with_model_name(tmp_path: Path, table: FlagTable) -> None:
    models = tmp_path / "models"
    touch(models / "taken.gguf")
    ini = write_preset(tmp_path, "[other]\nmodel = /m/o.gguf\nalias = taken\n")
    with pytest.raises(ConfigError) as info:
        discover(table, models_dir=models, preset=ini)
    assert "taken" in info.value.message and "other" in info.value.message


def test_alias_equal_to_own_name_is_fine(tmp_path: Path, table: FlagTable) -> None:
    ini = write_preset(tmp_path, "[a]\nmodel = /m/a.gguf\nalias = a,b\n")
    assert discover(table, preset=ini)["a"].aliases == ("a", "b")


def test_discovery_rescans(tmp_path: Path, table: FlagTable) -> None:
    d = Discovery(Sources(tmp_path, None, None), table)
    assert d() == {}
    touch(tmp_path / "new.gguf")
    assert list(d()) == ["new"]


# --------------------------------------------------------------------------- ChildArgs


def spec_with(name: str, **options: str) -> ModelSpec:
    return ModelSpec(name=name, source="preset", options=tuple(sorted(options.items())))


def test_argv_order_and_spelling_match_upstream(table: FlagTable) -> None:
    spec = spec_with(
        "mymodel",
        **{
            "-m": "/m/a.gguf",
            "-c": "4096",
            "-ngl": "99",
            "--jinja": "true",
            "--perf": "false",  # has a negation -> --no-perf
            "--swa-full": "false",  # no negation -> dropped
            "--offline": "true",
        },
    )
    config = RouterConfig(
        server_bin="/opt/llama-server",
        child_options=(("--temp", "0.5"),),
        child_extra=("--some-unknown-flag", "3", "--another-unknown"),
    )
    argv = ChildArgs(config, table).argv(spec, 41234)
    assert argv == [
        "/opt/llama-server",
        "--host", "127.0.0.1",
        "--jinja",
        "--log-colors", "off",
        "--offline",
        "--no-perf",
        "--port", "41234",
        "--temperature", "0.5",
        "--alias", "mymodel",
        "--ctx-size", "4096",
        "--model", "/m/a.gguf",
        "--n-gpu-layers", "99",
        "--some-unknown-flag", "3", "--another-unknown",
    ]


def test_argv_forced_values_override_presets(table: FlagTable) -> None:
    spec = spec_with(
        "real-name",
        **{"-m": "/m/a.gguf", "--host": "0.0.0.0", "--port": "1", "-a": "alias1,alias2", "--log-colors": "on"},
    )
    argv = ChildArgs(RouterConfig(server_bin="srv"), table).argv(spec, 9999)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "9999"
    assert argv[argv.index("--alias") + 1] == "real-name"
    assert argv[argv.index("--log-colors") + 1] == "off"
    for flag in ("--host", "--port", "--alias", "--log-colors"):
        assert argv.count(flag) == 1


def test_argv_switch_rendering(table: FlagTable) -> None:
    spec = spec_with(
        "s",
        **{
            "--jinja": "false",  # -> --no-jinja
            "-cb": "off",  # -> --no-cont-batching (last negative spelling)
            "-kvo": "on",  # -> --kv-offload
            "--ui": "maybe",  # anything not falsey -> positive spelling
            "--mmproj-auto": "0",  # -> --no-mmproj-auto
        },
    )
    argv = ChildArgs(RouterConfig(server_bin="srv"), table).argv(spec, 1)
    for flag in ("--no-jinja", "--no-cont-batching", "--kv-offload", "--webui", "--no-mmproj-auto"):
        assert flag in argv
    for flag in ("--jinja", "--cont-batching", "-cb", "--no-kv-offload", "--no-webui", "--mmproj-auto"):
        assert flag not in argv


def test_argv_never_contains_router_only_or_preset_only_options(table: FlagTable) -> None:
    spec = spec_with(
        "m",
        **{
            "-m": "/m/a.gguf",
            "--api-key": "secret",
            "--api-key-file": "/k",
            "--ssl-key-file": "/k.pem",
            "--ssl-cert-file": "/c.pem",
            "--models-dir": "/models",
            "--models-max": "9",
            "--models-preset": "/p.ini",
            "--models-autoload": "false",
            "load-on-startup": "true",
            "stop-timeout": "3",
            "ttl": "60",
            "pin": "true",
        },
    )
    argv = ChildArgs(RouterConfig(server_bin="srv"), table).argv(spec, 1)
    joined = " ".join(argv)
    for word in ("api-key", "ssl-", "models-", "secret", "load-on-startup", "stop-timeout", "ttl", "pin"):
        assert word not in joined, word
    assert "--model" in argv


def test_argv_unknown_option_keys_are_skipped(table: FlagTable) -> None:
    spec = spec_with("m", **{"-m": "/m/a.gguf", "--not-an-option": "1"})
    argv = ChildArgs(RouterConfig(server_bin="srv"), table).argv(spec, 1)
    assert "--not-an-option" not in argv


def test_preset_ini_text(table: FlagTable) -> None:
    spec = spec_with(
        "mymodel",
        **{
            "-m": "/m/a.gguf",
            "-c": "4096",
            "--jinja": "true",
            "-a": "x,y",
            "--tags": "t",
            "--host": "0.0.0.0",
            "--port": "123",
            "--api-key": "secret",
            "--chat-template": "line1\nline2",
        },
    )
    config = RouterConfig(server_bin="srv", child_options=(("--temp", "0.5"),))
    text = ChildArgs(config, table).preset_ini(spec)
    assert text == (
        "[mymodel]\n"
        "chat-template = line1\\\nline2\n"
        "jinja = true\n"
        "log-colors = off\n"
        "temperature = 0.5\n"
        "ctx-size = 4096\n"
        "model = /m/a.gguf\n"
        "\n"
    )
    for hidden in ("host", "port", "alias", "tags", "api-key", "secret"):
        assert f"{hidden} =" not in text and "secret" not in text


def test_merged_router_options_win(table: FlagTable) -> None:
    spec = spec_with("m", **{"-c": "1", "--temp": "0.1"})
    config = RouterConfig(server_bin="srv", child_options=(("-c", "2"),))
    merged = ChildArgs(config, table).merged(spec)
    assert merged["-c"] == "2"
    assert merged["--temp"] == "0.1"
    assert merged["--log-colors"] == "off"


def test_dedup_cache_models_hides_the_cache_entry_a_preset_covers(tmp_path: Path) -> None:
    from llamarouter.cli import flag_tables
    from llamarouter.settings.discovery import Discovery, Sources

    commit = "a" * 40
    repo = tmp_path / "cache" / "models--owner--repo"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "model-Q4_K_M.gguf").write_bytes(b"GGUF")
    (snap / "other-Q8_0.gguf").write_bytes(b"GGUF")
    preset = tmp_path / "p.ini"
    preset.write_text(
        "[mine]\nhf-repo = owner/repo:q4_k_m\ndedup-cache-models = true\n\n"
        f"[byfile]\nmodel = {snap / 'other-Q8_0.gguf'}\ndedup-cache-models = 1\n"
    )
    specs = Discovery(Sources(None, preset, tmp_path / "cache"), flag_tables()[1])()
    assert specs["owner/repo:Q4_K_M"].hidden and specs["owner/repo:Q8_0"].hidden
    assert not specs["mine"].hidden and not specs["byfile"].hidden
    preset.write_text("[mine]\nhf-repo = owner/repo:Q4_K_M\n")
    specs = Discovery(Sources(None, preset, tmp_path / "cache"), flag_tables()[1])()
    assert not specs["owner/repo:Q4_K_M"].hidden  # without the key both stay listed


def test_dedup_cache_models_also_covers_draft_and_named_files(tmp_path: Path) -> None:
    from llamarouter.cli import flag_tables
    from llamarouter.settings.discovery import Discovery, Sources

    commit = "b" * 40
    for repo_name, files in (("owner--big", ("big-Q4_K_M.gguf", "big-Q8_0.gguf")),
                             ("owner--small", ("small-Q4_K_M.gguf",)),
                             ("owner--other", ("other-Q4_K_M.gguf",))):
        repo = tmp_path / "cache" / f"models--{repo_name}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in files:
            (snap / f).write_bytes(b"GGUF")
    preset = tmp_path / "p.ini"
    preset.write_text(
        "[spec]\nhf-repo = owner/big\nhf-file = big-Q8_0.gguf\n"
        "spec-draft-hf = owner/small:q4_k_m\ndedup-cache-models = true\n"
    )
    specs = Discovery(Sources(None, preset, tmp_path / "cache"), flag_tables()[1])()
    hidden = sorted(name for name, spec in specs.items() if spec.hidden)
    # The file hf-file names and the draft repo are covered; the repo's other file and an
    # unrelated repo stay listed.
    assert hidden == ["owner/big:Q8_0", "owner/small:Q4_K_M"]
    assert not specs["owner/big:Q4_K_M"].hidden and not specs["owner/other:Q4_K_M"].hidden


def test_dedup_cache_models_untagged_repo_hides_its_default_file(tmp_path: Path) -> None:
    # As upstream resolves an untagged repo: Q4_K_M, else Q8_0, else the first file.
    from llamarouter.cli import flag_tables
    from llamarouter.settings.discovery import Discovery, Sources

    commit = "c" * 40
    for repo_name, files in (("owner--multi", ("m-F16.gguf", "m-Q8_0.gguf", "m-Q4_K_M.gguf")),
                             ("owner--one", ("one-F32.gguf",))):
        repo = tmp_path / "cache" / f"models--{repo_name}"
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
        snap = repo / "snapshots" / commit
        snap.mkdir(parents=True)
        for f in files:
            (snap / f).write_bytes(b"GGUF")
    preset = tmp_path / "p.ini"
    preset.write_text("[a]\nhf-repo = owner/multi\nspec-draft-hf = owner/one\ndedup-cache-models = 1\n")
    specs = Discovery(Sources(None, preset, tmp_path / "cache"), flag_tables()[1])()
    assert sorted(name for name, spec in specs.items() if spec.hidden) == ["owner/multi:Q4_K_M", "owner/one:F32"]
    # From the global section too, as upstream.
    preset.write_text("[*]\ndedup-cache-models = 1\n\n[a]\nhf-repo = owner/multi\n")
    specs = Discovery(Sources(None, preset, tmp_path / "cache"), flag_tables()[1])()
    assert sorted(name for name, spec in specs.items() if spec.hidden) == ["owner/multi:Q4_K_M"]
