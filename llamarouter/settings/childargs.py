"""A child's command line and the INI text /models shows, from spec + router flags.

Mirrors upstream (server-models.cpp `update_args`, preset.cpp `to_args`/`to_ini`): options
are merged [*] < model section < router command line, ordered by their first spelling,
written with their last (long) spelling; then --host 127.0.0.1 --port P --alias NAME
--log-colors off are forced.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from .config import ModelSpec, RouterConfig
from .declared import KEEP_CACHE, SLEEP_IDLE, effective
from .flags import FORCED_PER_CHILD, RESERVED_ALWAYS, FlagTable, canonical, default_table, key, split_argv

# Not shown in status.preset, as upstream leaves them out (server-models.cpp, /models).
_HIDDEN_IN_PRESET = frozenset({"--host", "--port", "-a", "--tags"}) | RESERVED_ALWAYS


# Specs are immutable and the router flags fixed, so results are cached per spec: GET /models
# renders every model's preset and would-be command line on each call (1,000 files: 1,000x).
_CACHE_SIZE = 8192

_K_SLOT_SAVE = "--slot-save-path"
_K_SLEEP_IDLE = "--sleep-idle-seconds"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def keeps_cache(config: RouterConfig, spec: ModelSpec) -> bool:
    """Whether the model's slot caches are saved before a stop (preset key over flag)."""
    return effective(spec, config, KEEP_CACHE) and config.keep_cache_dir is not None


def keep_cache_dir(config: RouterConfig, name: str) -> Path | None:
    """The directory a model's saved slots live in: one per model, since llama-server takes
    bare file names inside its --slot-save-path. Names like `owner/repo:Q4` are made safe,
    with a short hash so two names that sanitise alike stay apart."""
    if config.keep_cache_dir is None:
        return None
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return config.keep_cache_dir / f"{_UNSAFE.sub('_', name)[:80]}-{digest}"


def sleep_idle(config: RouterConfig, spec: ModelSpec) -> float | None:
    value = effective(spec, config, SLEEP_IDLE)
    return value if value else None


def running_options(argv: Iterable[str], env: Mapping[str, str], table: FlagTable | None = None) -> dict[str, str]:
    """The value options a running child has, keyed as `ChildArgs.merged` keys them: read
    back from its command line (the last one wins) over its environment, as llama-server
    reads them."""
    table = table or default_table()
    opts = {key(o): env[o.env] for o in table.options if o.nargs == 1 and o.env and o.env in env}
    args = list(argv)
    if args and not args[0].startswith("-"):
        args = args[1:]  # the program
    try:
        parsed = split_argv(args, table)
    except ValueError:
        return opts  # a command line llama-server would refuse: no child runs with it
    for item in parsed.known():
        if item.opt is not None and item.opt.nargs == 1:
            opts[key(item.opt)] = item.values[0]
    return opts


def with_slot_dir(argv: list[str], directory: Path | None) -> list[str]:
    """`argv` with its --slot-save-path (if it has one: keep-cache is on) set to
    `directory`."""
    out = list(argv)
    for i, arg in enumerate(out[:-1]):
        if arg == _K_SLOT_SAVE and directory is not None:
            out[i + 1] = str(directory)
    return out


def parallel_slots(argv: Iterable[str], env: Mapping[str, str]) -> int:
    """A running child's parallel slots, read back from its command line: `-np`, where
    llama-server's auto (unset or negative) is 4."""
    value = running_options(argv, env).get("-np", "-1")
    try:
        slots = int(value)
    except ValueError:
        slots = -1
    return slots if slots > 0 else 4


class ChildArgs:
    def __init__(self, config: RouterConfig, table: FlagTable) -> None:
        self._config = config
        self._table = table
        self._merged = functools.lru_cache(maxsize=_CACHE_SIZE)(self._compute_merged)
        self._preview = functools.lru_cache(maxsize=_CACHE_SIZE)(self._compute_preview)
        self.preset_ini = functools.lru_cache(maxsize=_CACHE_SIZE)(self._compute_preset_ini)

    def merged(self, spec: ModelSpec) -> dict[str, str]:
        """The options a child of `spec` gets (before the forced per-child ones); a copy."""
        return dict(self._merged(spec))

    def argv(self, spec: ModelSpec, port: int) -> list[str]:
        """The child's command line; port 0 gives the preview /models shows."""
        if port == 0:
            return list(self._preview(spec))
        return self._compute_argv(spec, port)

    def _compute_preview(self, spec: ModelSpec) -> tuple[str, ...]:
        return tuple(self._compute_argv(spec, 0))

    def _compute_merged(self, spec: ModelSpec) -> dict[str, str]:
        opts = dict(spec.options)
        opts.update(self._config.child_options)
        for reserved in RESERVED_ALWAYS:
            opts.pop(reserved, None)
        # --no-mmproj also turns off a projector discovery found next to the model.
        if opts.get("--mmproj-auto") == "false":
            opts.pop("-mm", None)
        # We read the child's output line by line; colour codes would only get in the way.
        # (Upstream forces its own colour choice the same way, and shows it in the preset.)
        opts["--log-colors"] = "off"
        # Our tiered-idle and keep-cache settings become the child's own options, unless
        # the model sets those options itself.
        idle = sleep_idle(self._config, spec)
        if idle is not None and _K_SLEEP_IDLE not in opts:
            # llama-server takes whole seconds and refuses 0.
            opts[_K_SLEEP_IDLE] = str(max(1, round(idle)))
        kv_dir = keep_cache_dir(self._config, spec.name)
        if keeps_cache(self._config, spec) and kv_dir is not None:
            opts[_K_SLOT_SAVE] = str(kv_dir)
        return opts

    def _compute_argv(self, spec: ModelSpec, port: int) -> list[str]:
        opts = self.merged(spec)
        for forced in FORCED_PER_CHILD:
            opts.pop(forced, None)
        opts["--host"] = "127.0.0.1"
        opts["--port"] = str(port)
        if spec.source == "cli":
            # -m/-hf mode: the child gets the --alias it was given, or none, so it names
            # itself exactly as a lone llama-server would (the file path without --alias).
            alias = dict(spec.options).get("-a")
            if alias:
                opts["-a"] = alias
        else:
            opts["-a"] = spec.name
        opts["--log-colors"] = "off"
        argv = [self._config.server_bin]
        for opt_key in sorted(opts):
            opt = self._table.by_key(opt_key)
            if opt is not None:
                argv += self._table.to_args(opt, opts[opt_key])
        argv += self._config.child_extra
        return argv

    def _compute_preset_ini(self, spec: ModelSpec) -> str:
        lines = [f"[{spec.name}]"]
        opts = self.merged(spec)
        for opt_key in sorted(opts):
            opt = self._table.by_key(opt_key)
            if opt is None:  # a preset-only key (load-on-startup, ttl, ...): shown too
                hit = self._table.by_preset_key(opt_key)
                opt = hit.opt if hit is not None else None
            if opt is None or opt_key in _HIDDEN_IN_PRESET:
                continue
            value = opts[opt_key].replace("\n", "\\\n")
            lines.append(f"{canonical(opt).lstrip('-')} = {value}")
        return "\n".join(lines) + "\n\n"  # upstream's to_ini ends with a blank line
