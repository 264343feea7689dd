"""llama-server option lookups, command-line tokenising and preset-key rules.

Built on the generated :mod:`llamarouter.settings.flagtable` (see ``bin/gen-flag-table``).
Upstream behaviour that is mirrored here is cited as ``file:line`` of the
llama.cpp sources the table was generated from (common/arg.cpp,
common/preset.cpp, tools/server/server-models.cpp).

Vocabulary:

* *spelling*: one way to write an option on the command line (``-c``,
  ``--ctx-size``); *negation*: a spelling that turns a boolean option off
  (``--no-jinja``);
* *key*: stable identity of an option, its first spelling;
* *canonical*: the spelling written when rendering a child command line.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

from llamarouter.settings.flagtable import OPTIONS, Opt

__all__ = [
    "FORCED_PER_CHILD",
    "NOT_INHERITED",
    "OPTIONS",
    "PRESET_IGNORED_KEYS",
    "PRESET_ONLY",
    "RESERVED_ALWAYS",
    "RESERVED_MODEL",
    "ROUTER_ONLY",
    "ArgItem",
    "EnvItem",
    "FlagTable",
    "Opt",
    "ParsedArgs",
    "PresetKey",
    "canonical",
    "canonical_negation",
    "default_table",
    "env_items",
    "env_names",
    "first_invalid_argument",
    "first_invalid_index",
    "is_autoy",
    "is_falsey",
    "is_truthy",
    "key",
    "lacks_value",
    "negated_env",
    "split_argv",
    "split_own",
]


# ---------------------------------------------------------------------------
# value words (arg.cpp:1337-1347); exact, case-sensitive comparisons upstream
# ---------------------------------------------------------------------------

_TRUTHY = frozenset({"on", "enabled", "true", "1"})
_FALSEY = frozenset({"off", "disabled", "false", "0"})
_AUTOY = frozenset({"auto", "-1"})


def is_truthy(value: str) -> bool:
    """True for the words llama.cpp reads as "yes": on, enabled, true, 1."""
    return value in _TRUTHY


def is_falsey(value: str) -> bool:
    """True for the words llama.cpp reads as "no": off, disabled, false, 0."""
    return value in _FALSEY


def is_autoy(value: str) -> bool:
    """True for the words llama.cpp reads as "auto": auto, -1."""
    return value in _AUTOY


# ---------------------------------------------------------------------------
# per-option helpers (independent of any table)
# ---------------------------------------------------------------------------


def key(opt: Opt) -> str:
    """Stable identity of an option: its first spelling.

    Upstream identifies options the same way: common_arg::operator< and
    operator== compare args[0] (common/arg.h), and presets are std::maps keyed
    on that, so a child's command line is ordered by strcmp of args[0]
    (preset.cpp:44; arg.cpp:2612 relies on it).
    """
    return opt.spellings[0]


def canonical(opt: Opt) -> str:
    """Spelling used on a child command line.

    Upstream renders presets with ``opt.args.back()``, the LAST positive
    spelling, which is normally the long form (preset.cpp:49-50), e.g. ``-ngl,
    --gpu-layers, --n-gpu-layers`` -> ``--n-gpu-layers``.
    """
    return opt.spellings[-1]


def canonical_negation(opt: Opt) -> str | None:
    """Negative spelling used on a child command line (``args_neg.back()``,
    preset.cpp:56-58), or None for options that cannot be negated."""
    return opt.negations[-1] if opt.negations else None


def negated_env(opt: Opt) -> str | None:
    """The ``LLAMA_ARG_NO_*`` variable upstream also honours for a boolean
    option: env with "LLAMA_ARG_" replaced by "LLAMA_ARG_NO_" (arg.cpp:125-143,
    233-245).  None when the option has no env or no negation."""
    if opt.env is None or not opt.negations or not opt.env.startswith("LLAMA_ARG_"):
        # Our own LLAMAROUTER_* switches take true/false values in their one variable.
        return None
    return opt.env.replace("LLAMA_ARG_", "LLAMA_ARG_NO_")


def env_names(opt: Opt) -> tuple[str, ...]:
    """All environment variable names of an option (arg.cpp:233-245)."""
    if opt.env is None:
        return ()
    neg = negated_env(opt)
    return (opt.env,) if neg is None or neg == opt.env else (opt.env, neg)


def _strip_dashes(spelling: str) -> str:
    # preset.cpp:12-18 rm_leading_dashes
    return spelling.lstrip("-")


# ---------------------------------------------------------------------------
# options that only exist in presets, and what the router withholds
# ---------------------------------------------------------------------------

# Preset-only options (arg.cpp:4767-4786, common_params_add_preset_options,
# added to the preset context at preset.cpp:281).  They are valid INI keys but
# never command-line options: to_args() skips them (preset.cpp:45-47).  Their
# "env" is a pseudo name that is never read from the environment.
PRESET_ONLY: tuple[Opt, ...] = (
    Opt(("load-on-startup",), (), "__PRESET_LOAD_ON_STARTUP", 1),
    Opt(("stop-timeout",), (), "__PRESET_STOP_TIMEOUT", 1),
    Opt(("dedup-cache-models",), (), "__PRESET_DEDUP_CACHE_MODELS", 1),
)

# INI keys upstream skips silently (preset.cpp:305-308, reserved for future use).
PRESET_IGNORED_KEYS: frozenset[str] = frozenset({"version"})

# Option keys (first spellings) the upstream router keeps away from children.
#
# tools/server/server-models.cpp:479-487, unset_reserved_args(): removed from
# the router's own command line AND from every model preset before a child's
# command line is rendered (called at :522 and :605).
RESERVED_ALWAYS: frozenset[str] = frozenset(
    {
        "--ssl-key-file",  # LLAMA_ARG_SSL_KEY_FILE   :480
        "--ssl-cert-file",  # LLAMA_ARG_SSL_CERT_FILE :481
        "--api-key",  # LLAMA_API_KEY                 :482
        "--api-key-file",  # LLAMA_ARG_API_KEY_FILE   :483
        "--models-dir",  # LLAMA_ARG_MODELS_DIR       :484
        "--models-max",  # LLAMA_ARG_MODELS_MAX       :485
        "--models-preset",  # LLAMA_ARG_MODELS_PRESET :486
        "--models-autoload",  # LLAMA_ARG_MODELS_AUTOLOAD :487
    }
)
# server-models.cpp:488-493: removed only from the router's own command line
# (unset_model_args=true at :605); a model preset may still set them.
RESERVED_MODEL: frozenset[str] = frozenset(
    {
        "-m",  # LLAMA_ARG_MODEL     :489
        "-mm",  # LLAMA_ARG_MMPROJ   :490  (--mmproj)
        "-a",  # LLAMA_ARG_ALIAS     :491  (--alias)
        "-hf",  # LLAMA_ARG_HF_REPO  :492  (--hf-repo)
    }
)
# server-models.cpp:607-608: not inherited from the router's command line, but
# a model preset may set it.
NOT_INHERITED: frozenset[str] = frozenset({"--log-file"})
# server-models.cpp:522-527, update_args(): overwritten for every child:
# --host 127.0.0.1 (CHILD_ADDR, :59), --port <allocated>, --alias <model name>,
# --log-colors on|off (whatever the router resolved its own colours to).
FORCED_PER_CHILD: frozenset[str] = frozenset({"--host", "--port", "-a", "--log-colors"})
# Everything the router consumes itself and never forwards from its own command
# line.  --log-colors is not in here: upstream forwards its resolved value.
# Note that children still inherit the router's whole environment
# (server-models.cpp:600, :1194), LLAMA_ARG_* variables included.
ROUTER_ONLY: frozenset[str] = RESERVED_ALWAYS | RESERVED_MODEL | NOT_INHERITED | {"--host", "--port"}


# ---------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------


class PresetKey(NamedTuple):
    """Result of :meth:`FlagTable.by_preset_key`."""

    opt: Opt
    negated: bool


def _normalize_spelling(token: str) -> str:
    # "--" options may use "_" for "-" (arg.cpp:825-828: applied before lookup)
    return token.replace("_", "-") if token.startswith("--") else token


def _check_row(opt: Opt) -> None:
    if not opt.spellings:
        raise ValueError(f"option without spellings: {opt!r}")
    if opt.nargs not in (0, 1, 2):
        raise ValueError(f"{opt.spellings[0]}: nargs must be 0, 1 or 2")
    if opt.negations and opt.nargs != 0:
        # only value-less boolean options have args_neg (arg.h:62-67)
        raise ValueError(f"{opt.spellings[0]}: only switches can have negations")


class FlagTable:
    """Read-only lookup structure over option rows.

    ``FlagTable(OPTIONS + EXTRA)`` adds the caller's own options (llamarouter
    extensions); a spelling, env name or preset key used by two different
    options is rejected so an extension cannot shadow an upstream option.
    ``preset_only`` rows are INI keys only (see :data:`PRESET_ONLY`).
    """

    __slots__ = ("_envs", "_keys", "_preset_keys", "_preset_only_ids", "_spellings", "options", "preset_only")

    def __init__(self, options: Iterable[Opt] = OPTIONS, *, preset_only: Iterable[Opt] = PRESET_ONLY) -> None:
        self.options: tuple[Opt, ...] = tuple(options)
        self.preset_only: tuple[Opt, ...] = tuple(preset_only)
        self._preset_only_ids = frozenset(id(p) for p in self.preset_only)

        spellings: dict[str, tuple[Opt, bool]] = {}
        keys: dict[str, Opt] = {}
        envs: dict[str, Opt] = {}
        for opt in self.options:
            _check_row(opt)
            if not all(s.startswith("-") for s in opt.spellings + opt.negations):
                raise ValueError(f"{opt.spellings[0]}: command-line spellings must start with '-'")
            if key(opt) in keys:
                raise ValueError(f"option {key(opt)} listed twice")
            keys[key(opt)] = opt
            for neg, names in ((False, opt.spellings), (True, opt.negations)):
                for s in names:
                    if s in spellings:
                        raise ValueError(f"spelling {s} used by {key(spellings[s][0])} and {key(opt)}")
                    spellings[s] = (opt, neg)
            for name in env_names(opt):
                if name in envs:
                    raise ValueError(f"env {name} used by {key(envs[name])} and {key(opt)}")
                envs[name] = opt

        # preset.cpp:251-262 get_map_key_opt: every env name (LLAMA_ARG_NO_*
        # included) and every spelling, negative ones included, without
        # leading dashes.  Upstream uses a std::map, so a clash would silently
        # let the later option win; here a clash is an error (there is none
        # between upstream options, apart from "-fit"/"--fit" of one option).
        preset_keys: dict[str, PresetKey] = {}

        def add_preset_key(name: str, opt: Opt, negated: bool) -> None:
            old = preset_keys.get(name)
            if old is not None and old.opt is not opt:
                raise ValueError(f"preset key {name} used by {key(old.opt)} and {key(opt)}")
            preset_keys[name] = PresetKey(opt, negated)

        for opt in self.preset_only:
            _check_row(opt)
        for opt in self.options + self.preset_only:
            for name in env_names(opt):
                # negated=False even for LLAMA_ARG_NO_*: preset.cpp:268-277
                # only inverts values of keys that are negative *spellings*.
                add_preset_key(name, opt, False)
            for s in opt.spellings:
                add_preset_key(_strip_dashes(s), opt, False)
            for s in opt.negations:
                add_preset_key(_strip_dashes(s), opt, True)

        self._spellings: Mapping[str, tuple[Opt, bool]] = MappingProxyType(spellings)
        self._keys: Mapping[str, Opt] = MappingProxyType(keys)
        self._envs: Mapping[str, Opt] = MappingProxyType(envs)
        self._preset_keys: Mapping[str, PresetKey] = MappingProxyType(preset_keys)

    # -- basic container protocol --------------------------------------------

    def __iter__(self) -> Iterator[Opt]:
        return iter(self.options)

    def __len__(self) -> int:
        return len(self.options)

    def __repr__(self) -> str:
        return f"<FlagTable {len(self.options)} options, {len(self.preset_only)} preset-only>"

    # -- command line ---------------------------------------------------------

    def lookup(self, token: str) -> tuple[Opt, bool] | None:
        """(option, is-negative-spelling) for a command-line spelling, or None.

        ``--x_y`` is read as ``--x-y`` like upstream (arg.cpp:825-828);
        ``--flag=value`` is not split here (see :func:`split_argv`).
        """
        return self._spellings.get(_normalize_spelling(token))

    def by_spelling(self, token: str) -> Opt | None:
        """Option a command-line spelling (positive or negative) belongs to."""
        hit = self.lookup(token)
        return hit[0] if hit else None

    def is_negation(self, token: str) -> bool:
        """True if ``token`` is a negative spelling such as ``--no-jinja``."""
        hit = self.lookup(token)
        return bool(hit and hit[1])

    def by_key(self, opt_key: str) -> Opt | None:
        """Option whose :func:`key` (first spelling) is ``opt_key``."""
        return self._keys.get(opt_key)

    def by_env(self, name: str) -> Opt | None:
        """Option read from environment variable ``name`` (LLAMA_ARG_NO_* too)."""
        return self._envs.get(name)

    # -- presets ----------------------------------------------------------------

    def by_preset_key(self, preset_key: str) -> PresetKey | None:
        """Resolve an INI preset key the way llama.cpp does (preset.cpp:251-277, 317-324).

        Accepted: any spelling without its leading dashes (``n-gpu-layers``,
        ``gpu-layers``, ``ngl``, ``no-jinja``, ``nocb``), any env name
        (``LLAMA_ARG_N_GPU_LAYERS``, ``LLAMA_ARG_NO_JINJA``) and the preset-only
        keys.  Matching is exact and case-sensitive, with no ``_``/``-``
        folding.  ``negated`` is True only for negative spellings; upstream
        does NOT invert the value of a ``LLAMA_ARG_NO_*`` key (so
        ``LLAMA_ARG_NO_JINJA = true`` enables jinja upstream).  ``version`` and
        unknown keys give None.
        """
        if preset_key in PRESET_IGNORED_KEYS:
            return None
        return self._preset_keys.get(preset_key)

    @staticmethod
    def preset_value(hit: PresetKey, value: str) -> str:
        """The value upstream stores for a preset entry (preset.cpp:264-277, 319-322).

        Boolean options (those with negations): a negative key stores "false"
        if the value is truthy and "true" otherwise (so ``no-jinja = maybe``
        means jinja ON); a positive key stores the value unchanged.  Every
        other option stores the value unchanged.
        """
        if hit.opt.negations and hit.negated:
            return "false" if is_truthy(value) else "true"
        return value

    def is_preset_only(self, opt: Opt) -> bool:
        # Identity, not equality: a preset-only row may equal an option row by value.
        return id(opt) in self._preset_only_ids

    def to_args(self, opt: Opt, value: str) -> list[str]:
        """Render one stored preset value as child arguments (preset.cpp:37-79).

        Switches: a falsey value gives the canonical negation, or nothing when
        the option has no negation; any other value (not only truthy ones)
        gives the canonical spelling.  One-value options: ``[canonical, value]``.
        Preset-only options render to nothing.  Two-value options are
        rejected, as upstream does (preset.cpp:70-75).
        """
        if self.is_preset_only(opt):
            return []
        if opt.nargs == 0:
            if is_falsey(value):
                neg = canonical_negation(opt)
                return [neg] if neg is not None else []
            return [canonical(opt)]
        if opt.nargs == 1:
            return [canonical(opt), value]
        raise ValueError(f"{canonical(opt)} takes two values and cannot be set from a preset")

    # per-option helpers, also reachable through the table
    key = staticmethod(key)
    canonical = staticmethod(canonical)
    canonical_negation = staticmethod(canonical_negation)
    env_names = staticmethod(env_names)

    @staticmethod
    def is_router_only(opt: Opt) -> bool:
        """True if the upstream router never forwards this option from its own
        command line (:data:`ROUTER_ONLY`)."""
        return key(opt) in ROUTER_ONLY


@functools.cache
def default_table() -> FlagTable:
    """The table of upstream options plus the preset-only keys (built once)."""
    return FlagTable(OPTIONS)


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

_NEGATIVE_NUMBER = re.compile(r"-(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def _is_negative_number(token: str) -> bool:
    return _NEGATIVE_NUMBER.fullmatch(token) is not None


class ArgItem(NamedTuple):
    """One option occurrence on a command line.

    ``opt`` is None for options not in the table; ``spelling`` is the
    option as written (for known options with ``_`` already turned into
    ``-``); ``raw`` holds the exact argv tokens the item was made from.
    """

    opt: Opt | None
    spelling: str
    values: tuple[str, ...]
    negated: bool = False
    raw: tuple[str, ...] = ()

    def to_argv(self) -> list[str]:
        """Tokens llama-server accepts: known options always as separate
        tokens (upstream has no ``--flag=value`` form), unknown ones verbatim."""
        if self.opt is None:
            return list(self.raw) if self.raw else [self.spelling, *self.values]
        return [self.spelling, *self.values]


@dataclass(frozen=True, slots=True)
class ParsedArgs:
    """Ordered result of :func:`split_argv`."""

    items: tuple[ArgItem, ...]

    def __iter__(self) -> Iterator[ArgItem]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def last(self, opt: Opt) -> ArgItem | None:
        """Effective occurrence of ``opt``: the last one wins upstream
        (arg.cpp:832-838 warns and keeps the last value)."""
        for item in reversed(self.items):
            if item.opt is not None and key(item.opt) == key(opt):
                return item
        return None

    def known(self) -> tuple[ArgItem, ...]:
        return tuple(i for i in self.items if i.opt is not None)

    def unknown(self) -> tuple[ArgItem, ...]:
        return tuple(i for i in self.items if i.opt is None)

    def without(self, keys: Collection[str]) -> ParsedArgs:
        """Copy without the known options whose :func:`key` is in ``keys``
        (e.g. :data:`ROUTER_ONLY`)."""
        return ParsedArgs(tuple(i for i in self.items if i.opt is None or key(i.opt) not in keys))

    def to_argv(self) -> list[str]:
        return [tok for item in self.items for tok in item.to_argv()]


def split_argv(argv: list[str], table: FlagTable | None = None) -> ParsedArgs:
    """Tokenise a llama-server command line (without the program name).

    * Known options consume exactly ``nargs`` following tokens, whatever they
      look like, as upstream does (arg.cpp:855-872), so ``--seed -1`` and
      ``-r --stop`` work; a missing value raises ValueError naming the flag.
    * ``--flag=value`` / ``-f=value`` is accepted as well (upstream does not
      split on ``=``); for a two-value option the inline value is the first.
      A switch given a value this way is an error.
    * Unknown options are kept: with ``=`` the inline part is their value;
      otherwise they take the next token as value if it does not start with
      ``-`` or is a negative number (``-1``, ``-0.5``).
    * Any other token (a positional argument) raises ValueError.
    """
    table = table or default_table()
    items: list[ArgItem] = []
    i, n = 0, len(argv)
    while i < n:
        tok = argv[i]
        start = i
        i += 1
        if not tok.startswith("-") or tok in ("-", "--") or _is_negative_number(tok):
            raise ValueError(f"unexpected positional argument {tok!r}")

        hit = table.lookup(tok)
        inline: str | None = None
        name = tok
        if hit is None and "=" in tok:
            name, _, inline = tok.partition("=")
            hit = table.lookup(name)

        if hit is None:
            values: tuple[str, ...] = ()
            if inline is not None:
                values = (inline,)
            elif i < n and (not argv[i].startswith("-") or _is_negative_number(argv[i])):
                values = (argv[i],)
                i += 1
            items.append(ArgItem(None, name, values, False, tuple(argv[start:i])))
            continue

        opt, negated = hit
        spelling = _normalize_spelling(name)
        if opt.nargs == 0:
            if inline is not None:
                raise ValueError(f"option {spelling} does not take a value (got {tok!r})")
            items.append(ArgItem(opt, spelling, (), negated, (tok,)))
            continue
        got = [inline] if inline is not None else []
        need = opt.nargs - len(got)
        if i + need > n:
            what = "a value" if opt.nargs == 1 else f"{opt.nargs} values"
            raise ValueError(f"option {spelling} expects {what}")
        got += argv[i : i + need]
        i += need
        items.append(ArgItem(opt, spelling, tuple(got), False, tuple(argv[start:i])))
    return ParsedArgs(tuple(items))


# ---------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------


class EnvItem(NamedTuple):
    """One option set through the environment.

    ``var`` is the variable that supplied it; switches have no values and
    ``negated`` tells whether the variable turned the option off.
    """

    opt: Opt
    var: str
    values: tuple[str, ...]
    negated: bool = False


def env_items(environ: Mapping[str, str], table: FlagTable | None = None) -> list[EnvItem]:
    """Options llama-server would take from ``environ``, in table order.

    Mirrors arg.cpp:125-143 and 786-808:

    * boolean options: a set ``LLAMA_ARG_NO_<X>`` wins and means "off" whatever
      its value; otherwise ``LLAMA_ARG_<X>`` must be truthy or falsey
      (on/enabled/true/1, off/disabled/false/0), anything else is an error
      (ValueError naming the variable), as upstream refuses to start;
    * plain switches (no negation, e.g. ``--offline``): applied only when the
      value is truthy, silently ignored otherwise (so they are left out);
    * value options: the raw value, unvalidated;
    * two-value options are never read from the environment upstream.

    Preset-only pseudo variables (``__PRESET_*``) are not environment options.
    """
    table = table or default_table()
    out: list[EnvItem] = []
    for opt in table.options:
        if opt.env is None:
            continue
        neg_var = negated_env(opt)
        if neg_var is not None and neg_var in environ:
            var, value = neg_var, "0"
        elif opt.env in environ:
            var, value = opt.env, environ[opt.env]
        else:
            continue
        if opt.nargs == 0:
            if opt.negations:
                if is_truthy(value):
                    out.append(EnvItem(opt, var, (), False))
                elif is_falsey(value):
                    out.append(EnvItem(opt, var, (), True))
                else:
                    raise ValueError(f"environment variable {var}: invalid boolean value {value!r}")
            elif is_truthy(value):
                out.append(EnvItem(opt, var, (), False))
        elif opt.nargs == 1:
            out.append(EnvItem(opt, var, (value,), False))
    return out


# ---------------------------------------------------------------------------
# command-line validation, as llama-server does it
# ---------------------------------------------------------------------------


def first_invalid_argument(argv: list[str], table: FlagTable, own: Collection[str] = ()) -> str | None:
    """The first token llama-server would refuse as ``error: invalid argument: X``, or None.

    Mirrors arg.cpp:821-872: every token must be a known spelling (``--x_y`` read as
    ``--x-y``, with no ``--flag=value`` form and no positional arguments); a known option
    consumes exactly its number of values, whatever they look like. A missing value is
    not reported here (upstream reports it with the option's usage text). Options whose
    key is in ``own`` (llamarouter's) may also be written ``--flag=value``.
    """
    at = first_invalid_index(argv, table, own)
    return None if at is None else _normalize_spelling(argv[at])


def first_invalid_index(argv: list[str], table: FlagTable, own: Collection[str] = ()) -> int | None:
    """Where in `argv` :func:`first_invalid_argument`'s token is, or None."""
    i, n = 0, len(argv)
    while i < n:
        tok = _normalize_spelling(argv[i])
        hit = table.lookup(tok)
        if hit is None:
            if _own_inline(tok, table, own):
                i += 1
                continue
            return i
        i += 1 + hit[0].nargs
    return None


def lacks_value(argv: list[str], table: FlagTable) -> bool:
    """True when the last option of a valid command line is missing its value(s)."""
    i, n = 0, len(argv)
    while i < n:
        hit = table.lookup(argv[i])
        i += 1 + (hit[0].nargs if hit is not None else 0)
    return i > n


def _own_inline(tok: str, table: FlagTable, own: Collection[str]) -> bool:
    if "=" not in tok:
        return False
    named = table.lookup(tok.partition("=")[0])
    return named is not None and key(named[0]) in own


def split_own(argv: list[str], table: FlagTable, own: Collection[str]) -> tuple[list[str], list[str]]:
    """(llama-server's tokens, our own options' tokens) of a command line that
    :func:`first_invalid_argument` accepted; ``own`` holds option keys. Our own options
    may also be written ``--flag=value``."""
    upstream: list[str] = []
    ours: list[str] = []
    i, n = 0, len(argv)
    while i < n:
        tok = argv[i]
        hit = table.lookup(tok)
        if hit is None and _own_inline(tok, table, own):
            ours.append(tok)
            i += 1
            continue
        end = i + 1 + (hit[0].nargs if hit is not None else 0)
        (ours if hit is not None and key(hit[0]) in own else upstream).extend(argv[i:end])
        i = end
    return upstream, ours
