"""Models from --models-dir, the llama.cpp / Hugging Face cache and INI presets.

Returns ModelSpecs and never spawns anything. Merge order follows upstream
(server-models.cpp `load_models`): cache, then --models-dir (replaces a same-named cache
entry), then presets (merged into a same-named entry); `[*]` applies under every source.
The router's own command-line flags are applied last, when a child's argv is built.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .config import ModelSpec
from .declared import BOOL, INT, PER_MODEL, STR, Setting
from .flags import FlagTable, is_falsey, is_truthy, key

log = logging.getLogger("llamarouter.settings.discovery")

_DRAFT_PREFIXES = ("mtp-", "dspark-", "dflash-")
_CACHE_SKIP = ("mmproj", "mtp-", "eagle3-", "dflash-", "dspark-")
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})$", re.IGNORECASE)
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)
_COMMIT = re.compile(r"^[0-9a-fA-F]{40}$|^[0-9a-fA-F]{64}$")

# Options a model's source sets (upstream's env names, which identify options in presets).
MODEL_ENV = "LLAMA_ARG_MODEL"
MMPROJ_ENV = "LLAMA_ARG_MMPROJ"
DRAFT_ENV = "LLAMA_ARG_SPEC_DRAFT_MODEL"
HF_REPO_ENV = "LLAMA_ARG_HF_REPO"
HF_FILE_ENV = "LLAMA_ARG_HF_FILE"
DRAFT_HF_REPO_ENV = "LLAMA_ARG_SPEC_DRAFT_HF_REPO"
ALIAS_ENV = "LLAMA_ARG_ALIAS"
TAGS_ENV = "LLAMA_ARG_TAGS"

Options = dict[str, str]  # option key -> value as upstream stores it (strings)


def is_mmproj(fname: str) -> bool:
    return "mmproj" in fname


def is_draft(fname: str) -> bool:
    return fname.startswith(_DRAFT_PREFIXES)


def split_info(filename: str) -> tuple[str, int, int]:
    """(stem without shard suffix, shard index, shard count) of a .gguf file name."""
    stem = filename[: -len(".gguf")] if filename.endswith(".gguf") else filename
    m = _SHARD.match(stem)
    if m:
        return m.group("stem"), int(m.group("index")), int(m.group("count"))
    return stem, 1, 1


# --------------------------------------------------------------------------- models dir
@dataclass(frozen=True)
class LocalModel:
    name: str
    path: Path
    mmproj: Path | None = None
    draft: Path | None = None


def scan_models_dir(models_dir: Path) -> list[LocalModel]:
    """Top-level GGUFs and one level of subdirectories.

    Deterministic where upstream is not (llama.cpp #28337): entries are read in sorted
    order; in a subdirectory the first shard wins, else the only non-auxiliary file; with
    several candidates the first by name is used and a warning names the rest. Top-level
    shards of one model form one model (upstream lists each shard).
    """
    if not models_dir.is_dir():
        raise ConfigError(f"--models-dir '{models_dir}' does not exist or is not a directory")
    out: list[LocalModel] = []
    shard_groups: dict[str, list[tuple[int, Path]]] = {}
    try:
        entries = sorted(os.scandir(models_dir), key=lambda e: e.name)
    except OSError as exc:
        raise ConfigError(f"cannot read --models-dir '{models_dir}': {exc}") from exc
    for entry in entries:
        if entry.name.startswith("."):
            continue
        try:
            if entry.is_dir():
                found = _scan_subdir(Path(entry.path), entry.name)
                if found is not None:
                    out.append(found)
                continue
            if not entry.is_file():
                continue
        except OSError:
            continue
        fname = entry.name
        if not fname.endswith(".gguf") or is_mmproj(fname) or is_draft(fname):
            continue
        stem, index, count = split_info(fname)
        if count > 1:
            shard_groups.setdefault(stem, []).append((index, Path(entry.path)))
            continue
        out.append(LocalModel(fname.replace(".gguf", ""), Path(entry.path)))
    for stem, shards in shard_groups.items():
        first = [p for i, p in shards if i == 1]
        if not first:
            log.warning("shards of '%s' in %s lack the first shard (-00001-of-); skipped", stem, models_dir)
            continue
        out.append(LocalModel(stem.replace(".gguf", ""), first[0]))
    out.sort(key=lambda m: m.name)
    return out


def _scan_subdir(path: Path, name: str) -> LocalModel | None:
    mmproj: Path | None = None
    draft: Path | None = None
    first_shard: Path | None = None
    plain: list[Path] = []
    try:
        files = sorted(
            (
                e for e in os.scandir(path)
                if not e.name.startswith(".") and e.is_file() and e.name.endswith(".gguf")
            ),
            key=lambda e: e.name,
        )
    except OSError as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
    for entry in files:
        fname = entry.name
        if is_mmproj(fname):
            mmproj = mmproj or Path(entry.path)
        elif is_draft(fname):
            draft = draft or Path(entry.path)
        elif split_info(fname)[1:] != (1, 1):
            if split_info(fname)[1] == 1:
                first_shard = first_shard or Path(entry.path)
        else:
            plain.append(Path(entry.path))
    model = first_shard
    if model is None and plain:
        model = plain[0]
        if len(plain) > 1:
            log.warning(
                "%s holds %d candidate GGUF files (%s); using %s. Keep one model per "
                "subdirectory or name it in a preset",
                path, len(plain), ", ".join(p.name for p in plain), model.name,
            )
    if model is None:
        return None
    return LocalModel(name, model, mmproj, draft)


# --------------------------------------------------------------------------- cache
def cache_dir_from_env(environ: Mapping[str, str]) -> Path | None:
    """The first of upstream's cache locations that is set (common/hf-cache.cpp)."""
    for var, sub in (
        ("LLAMA_CACHE", ""),
        ("HF_HUB_CACHE", ""),
        ("HUGGINGFACE_HUB_CACHE", ""),
        ("HF_HOME", "hub"),
        ("XDG_CACHE_HOME", "huggingface/hub"),
        ("HOME", ".cache/huggingface/hub"),
    ):
        base = environ.get(var, "")
        if base:
            return Path(base) / sub if sub else Path(base)
    return None


@dataclass(frozen=True)
class CachedModel:
    name: str  # owner/repo:TAG
    path: Path  # first shard / single file
    mmproj: Path | None


def scan_cache(cache_dir: Path) -> list[CachedModel]:
    """HF hub layout: models--owner--repo/{refs/main, snapshots/<commit>/...}."""
    if not cache_dir.is_dir():
        return []
    out: dict[str, CachedModel] = {}
    for repo_dir in sorted(cache_dir.iterdir()):
        if not repo_dir.name.startswith("models--") or not repo_dir.is_dir():
            continue
        repo_id = repo_dir.name[len("models--") :].replace("--", "/")
        if repo_id.count("/") != 1 or not all(repo_id.split("/")):
            continue
        commit = _cached_ref(repo_dir)
        snap = repo_dir / "snapshots" / commit if commit else None
        if snap is None or not snap.is_dir():
            continue
        files = sorted(p for p in snap.rglob("*.gguf") if p.is_file())
        mmproj = next((p for p in files if is_mmproj(p.name)), None)
        for path in files:
            rel = path.relative_to(snap).as_posix()
            stem, index, _ = split_info(rel)
            m = _TAG.search(stem)
            if index != 1 or m is None or any(s in stem for s in _CACHE_SKIP):
                continue
            name = f"{repo_id}:{m.group(1).upper()}"
            out.setdefault(name, CachedModel(name, path, mmproj))
    return list(out.values())


def _cached_ref(repo_dir: Path) -> str | None:
    refs = repo_dir / "refs"
    if not refs.is_dir():
        return None
    fallback = None
    for ref in sorted(refs.iterdir()):
        try:
            commit = ref.read_text().strip()
        except (OSError, UnicodeDecodeError):  # unreadable or corrupt: not a usable ref
            continue
        if not _COMMIT.match(commit):
            continue
        if ref.name == "main":
            return commit
        fallback = fallback or commit
    return fallback


def _default_cache_entry(repo: str, specs: Mapping[str, ModelSpec]) -> str:
    """The cache entry an untagged `hf-repo` resolves to, as upstream picks a repo's file
    (download.cpp find_best_model): Q4_K_M, else Q8_0, else the first file."""
    entries = sorted(
        (spec.model_path or "", name) for name, spec in specs.items()
        if spec.source == "cache" and name.partition(":")[0] == repo
    )
    for tag in ("Q4_K_M", "Q8_0"):
        for _, name in entries:
            if name.endswith(":" + tag):
                return name
    return entries[0][1] if entries else repo


# --------------------------------------------------------------------------- presets
@dataclass(frozen=True)
class Preset:
    name: str
    options: tuple[tuple[str, str], ...]  # (option key, stored value), file order


def canonical_tag(section: str) -> str:
    """`repo:q4_k_m` -> `repo:Q4_K_M`, as upstream canonicalises preset section names."""
    if section in ("*",) or ":" not in section:
        return section
    head, _, tag = section.rpartition(":")
    m = _TAG.search(tag)  # upstream keeps only the last [-.] token, like cache ids (UD-Q8_0 -> Q8_0)
    return f"{head}:{(m.group(1) if m else tag).upper()}"


def parse_preset_file(path: Path, table: FlagTable) -> tuple[Preset | None, list[Preset]]:
    """(`[*]` global preset, model presets). Errors name the file, section and key."""
    import configparser  # only with a preset: 0.3 MiB of resident memory otherwise

    parser = configparser.RawConfigParser(
        delimiters=("=",),
        comment_prefixes=("#", ";"),
        inline_comment_prefixes=("#", ";"),
        strict=False,
        empty_lines_in_values=False,
        default_section="\x00none",  # no DEFAULT section magic: keys before a section are an error
        interpolation=None,
    )
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"preset file does not exist: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"failed to read preset file {path}: {exc}") from None
    try:
        parser.read_string(text, source=str(path))
    except configparser.MissingSectionHeaderError as exc:
        raise ConfigError(
            f"{path}:{exc.lineno}: key outside any section; put it under [*] for every "
            "model or under [model-name]"
        ) from None
    except configparser.Error as exc:
        raise ConfigError(f"failed to parse preset file {path}: {exc}") from None
    global_preset: Preset | None = None
    presets: list[Preset] = []
    for section in parser.sections():
        options: list[tuple[str, str]] = []
        for raw_key, value in parser.items(section):
            if raw_key == "version":
                continue
            hit = table.by_preset_key(raw_key)
            if hit is None:
                raise ConfigError(
                    f"{path}: option '{raw_key}' in section [{section}] is not a llama-server "
                    "option nor a preset key (use the long flag without dashes, the short "
                    "flag, or the LLAMA_ARG_* name)"
                )
            if hit.opt.nargs > 1:
                raise ConfigError(
                    f"{path}: option '{raw_key}' in section [{section}] takes two values and "
                    "cannot be set from a preset; pass it on the command line"
                )
            options.append((key(hit.opt), table.preset_value(hit, value.strip())))
        name = canonical_tag(section.strip())
        preset = Preset(name, tuple(options))
        if name == "*":
            global_preset = preset
        else:
            presets.append(preset)
    return global_preset, presets


# --------------------------------------------------------------------------- merge
@dataclass(frozen=True)
class Sources:
    models_dir: Path | None
    preset_file: Path | None
    cache_dir: Path | None


class Discovery:
    """Callable that rescans every source (also used for ?reload=1 and SIGHUP)."""

    def __init__(self, sources: Sources, table: FlagTable) -> None:
        self.sources = sources
        self.table = table
        self._model_key = self._key_of(MODEL_ENV)
        self._mmproj_key = self._key_of(MMPROJ_ENV)
        self._draft_key = self._key_of(DRAFT_ENV)
        self._hf_key = self._key_of(HF_REPO_ENV)
        # (repo key, file key) pairs that name a cached Hugging Face file, as upstream's
        # dedup reads them (server-models.cpp): the model's and the draft model's.
        self._hf_pairs = (
            (self._hf_key, self._key_of(HF_FILE_ENV)),
            (self._key_of(DRAFT_HF_REPO_ENV), self._draft_key),
        )
        self._alias_key = self._key_of(ALIAS_ENV)
        self._tags_key = self._key_of(TAGS_ENV)

    def _key_of(self, env: str) -> str:
        opt = self.table.by_env(env)
        if opt is None:
            raise ConfigError(f"llama-server flag table lacks {env}")
        return key(opt)

    def __call__(self) -> dict[str, ModelSpec]:
        merged: dict[str, tuple[str, Options]] = {}  # name -> (source, options)
        src = self.sources
        if src.cache_dir is not None:
            for cm in scan_cache(src.cache_dir):
                opts: Options = {self._model_key: str(cm.path)}
                if cm.mmproj is not None:
                    opts[self._mmproj_key] = str(cm.mmproj)
                merged[cm.name] = ("cache", opts)
        if src.models_dir is not None:
            for lm in scan_models_dir(src.models_dir):
                opts = {self._model_key: str(lm.path)}
                if lm.mmproj is not None:
                    opts[self._mmproj_key] = str(lm.mmproj)
                if lm.draft is not None:
                    opts[self._draft_key] = str(lm.draft)
                merged[lm.name] = ("models_dir", opts)
        global_opts: Options = {}
        if src.preset_file is not None:
            global_preset, presets = parse_preset_file(src.preset_file, self.table)
            if global_preset is not None:
                global_opts = dict(global_preset.options)
            for preset in presets:
                if preset.name in merged:
                    merged[preset.name][1].update(preset.options)
                    merged[preset.name] = ("preset", merged[preset.name][1])
                    continue
                opts = dict(preset.options)
                if self._model_key not in opts and self._hf_key not in opts:
                    raise ConfigError(
                        f"{src.preset_file}: section [{preset.name}] defines a new model but sets "
                        "neither 'model' nor 'hf-repo'"
                    )
                merged[preset.name] = ("preset", opts)
        specs = {}
        for name, (source, opts) in sorted(merged.items()):
            full = {**global_opts, **opts}
            specs[name] = self._spec(name, source, full)
        self._hide_covered_cache_models(specs)
        self._check_names(specs)
        return specs

    def _hide_covered_cache_models(self, specs: dict[str, ModelSpec]) -> None:
        """`dedup-cache-models = true` in a preset hides the cache entries it already covers,
        so each is listed once, under the preset's name (and still answers to its own name):
        the repo named by `hf-repo` or `spec-draft-hf` (with `hf-file` / `spec-draft-model`
        naming the file, when given), and the file named by `model`."""
        ids: set[str] = set()
        files: set[tuple[str, str]] = set()  # (owner/repo, file name inside the snapshot)
        paths: set[str] = set()
        for spec in specs.values():
            opts = dict(spec.options)
            if spec.source != "preset" or not is_truthy(opts.get("dedup-cache-models", "")):
                continue
            for repo_key, file_key in self._hf_pairs:
                repo = opts.get(repo_key, "")
                if not repo:
                    continue
                if opts.get(file_key):
                    files.add((repo.partition(":")[0], Path(opts[file_key]).name))
                elif ":" in repo:
                    ids.add(canonical_tag(repo))
                else:
                    ids.add(_default_cache_entry(repo, specs))
            if spec.model_path:
                paths.add(os.path.realpath(spec.model_path))
        if not ids and not paths and not files:
            return
        for name, spec in specs.items():
            if spec.source != "cache":
                continue
            path = os.path.realpath(spec.model_path) if spec.model_path else None
            by_file = spec.model_path is not None and (name.partition(":")[0], Path(spec.model_path).name) in files
            if name in ids or path in paths or by_file:
                specs[name] = spec.with_changes(hidden=True)

    def _spec(self, name: str, source: str, opts: Options) -> ModelSpec:
        aliases = tuple(a.strip() for a in opts.get(self._alias_key, "").split(",") if a.strip())
        tags = tuple(t.strip() for t in opts.get(self._tags_key, "").split(",") if t.strip())
        model_path = opts.get(self._model_key)
        return ModelSpec(
            name=name,
            source=source,
            options=tuple(sorted(opts.items())),
            aliases=aliases,
            tags=tags,
            model_path=model_path,
            input_modalities=("text", "image") if self._mmproj_key in opts else ("text",),
            **per_model(opts, name),
        )

    @staticmethod
    def _check_names(specs: dict[str, ModelSpec]) -> None:
        # Upstream kills startup on a clash (#20320); we do too, but say which models clash.
        seen: dict[str, str] = {}
        for name in specs:
            seen[name] = name
        for name, spec in specs.items():
            for alias in spec.aliases:
                other = seen.get(alias)
                if other is not None and other != name:
                    raise ConfigError(
                        f"alias '{alias}' of model '{name}' clashes with "
                        f"{'model' if other == alias else 'an alias of'} '{other}'"
                    )
                seen[alias] = name


def per_model(opts: Options, model: str) -> dict[str, Any]:
    """The ModelSpec fields of the preset keys `opts` sets, each read as its kind says; a
    key that is not set leaves its field at its default (None: the router's flag).

    `Any` to the type checker: tests/unit/test_declared.py checks each kind against its
    ModelSpec field."""
    out: dict[str, Any] = {}
    for s in PER_MODEL:
        value = opts.get(s.preset)
        if value is not None:
            out[s.model_field] = _preset_value(s, value, model)
    return out


def _preset_value(s: Setting[Any], value: str, model: str) -> bool | float | int | str | None:
    if s.kind is BOOL:
        return _bool_opt(s.preset, value, model)
    if s.kind is STR:
        # Its reader checks it (`devices`: placement.parse_devices, whose error is the
        # 503 of a request for the model).
        return value.strip() or None
    if s.kind is INT:
        return _count_opt(s, value, model)
    return _float_opt(s.preset, value, model)  # the other PRESET_KINDS: seconds


def _count_opt(s: Setting[Any], value: str, model: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"preset [{model}]: {s.preset} must be a whole number, not '{value}'") from None
    if number < 1 or (s.maximum is not None and number > s.maximum):
        raise ConfigError(f"preset [{model}]: {s.preset} must be from 1 to {s.maximum:g}, not {number}")
    return number


def _bool_opt(name: str, value: str, model: str) -> bool:
    if is_truthy(value):
        return True
    if is_falsey(value):
        return False
    raise ConfigError(f"preset [{model}]: {name} must be true/false/on/off/1/0, not '{value}'")


def _float_opt(name: str, value: str, model: str) -> float | None:
    if value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"preset [{model}]: {name} must be a number of seconds, not '{value}'") from None
    if number < 0:
        raise ConfigError(f"preset [{model}]: {name} must not be negative")
    return number
