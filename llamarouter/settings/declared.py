"""Every llamarouter setting, declared once.

A `Setting` says where a value comes from (its flag and LLAMAROUTER_* variable; its
preset key when a model may set its own), how it is read (kind, bounds) and where it
goes (a field of `Limits`, `Timeouts` or `RouterConfig`, and for a preset key a field of
`ModelSpec`). Its type and default are the field's. The command-line table, the config
build (build.py), the preset keys (discovery.py), --help and the tables of
docs/command-line.md (bin/gen-settings-docs) come from `DECLARED`;
tests/unit/test_declared.py checks the dataclasses and docs/presets.md against it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from .config import ModelSpec, RouterConfig
from .flags import PRESET_ONLY, Opt

T = TypeVar("T")


class Group(enum.StrEnum):
    """Which dataclass holds a setting's router-wide value."""

    ROUTER = "router"
    LIMITS = "limits"
    TIMEOUTS = "timeouts"
    MODEL = "model"  # none: a preset key of a model's own (ModelSpec only)


class Kind(enum.StrEnum):
    """How a value is read from its flag or variable (build.py) and its preset key
    (discovery.py)."""

    STR = "str"
    PATH = "path"
    CSV = "csv"  # comma-separated, as a tuple
    INT = "int"
    FLOAT = "float"
    OPTINT = "optint"  # `none` = no limit, where the default has one
    OPTFLOAT = "optfloat"
    SIZE = "size"  # 24GiB, 512MB or bytes
    BOOL = "bool"


class Table(enum.StrEnum):
    """The docs/command-line.md section whose table lists a setting (its heading)."""

    OWN = "llamarouter's own options"
    MODEL_LIFE = "Keep-cache, tiered idle, default model, watching and canary (llamarouter)"


ROUTER, LIMITS, TIMEOUTS, MODEL = Group.ROUTER, Group.LIMITS, Group.TIMEOUTS, Group.MODEL
STR, PATH, CSV, SIZE, BOOL = Kind.STR, Kind.PATH, Kind.CSV, Kind.SIZE, Kind.BOOL
INT, FLOAT, OPTINT, OPTFLOAT = Kind.INT, Kind.FLOAT, Kind.OPTINT, Kind.OPTFLOAT

NUMBERS = frozenset({INT, FLOAT, OPTINT, OPTFLOAT})
# The kinds a preset key may have (discovery.py reads a switch or seconds; a STR key's
# text is its reader's, such as `devices`'s list of GPUs).
PRESET_KINDS = frozenset({BOOL, FLOAT, OPTFLOAT, INT, STR})
_METAVARS = {FLOAT: "S", OPTFLOAT: "S", INT: "N", OPTINT: "N", SIZE: "SIZE", PATH: "PATH"}


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One setting. T is the type of its value (the field's); code that reads a per-model
    setting names it through `effective`, which returns a T."""

    flag: str  # "" for a preset key of a model's own
    group: Group
    name: str  # the field of the group's dataclass
    kind: Kind
    help: str = ""  # its --help line
    doc: str = ""  # its Meaning cell in docs/command-line.md
    metavar: str = ""  # after the flag in the docs; "" = the kind's
    negation: str = ""  # BOOL: the spelling that turns it off
    maximum: float | None = None  # numbers: the largest accepted (the smallest is 0)
    shown: str = ""  # the docs' Default cell, where the field's default does not say it
    table: Table = Table.OWN
    preset: str = ""  # the preset key a model overrides it with ("" = none)
    spec_field: str = ""  # the key's ModelSpec field, when it is not `name`

    @property
    def env(self) -> str:
        """Its environment variable: LLAMAROUTER_ and the flag, so never declared apart."""
        return "LLAMAROUTER_" + self.flag.removeprefix("--").upper().replace("-", "_") if self.flag else ""

    @property
    def target(self) -> str:
        return f"{self.group}.{self.name}"

    @property
    def model_field(self) -> str:
        return self.spec_field or self.name

    def holder(self, config: RouterConfig) -> object:
        """The dataclass in `config` whose field `name` holds the router-wide value."""
        if self.group is ROUTER:
            return config
        if self.group is LIMITS:
            return config.limits
        if self.group is TIMEOUTS:
            return config.timeouts
        raise ValueError(f"preset key {self.preset!r} has no router-wide value")

    def default(self) -> object:
        return getattr(self.holder(RouterConfig()), self.name)


def effective(spec: ModelSpec, config: RouterConfig, setting: Setting[T]) -> T:
    """A per-model setting for `spec`: its preset key when the model sets it, else the
    router's flag (or the flag's default)."""
    value = getattr(spec, setting.model_field)
    if value is None:
        value = getattr(setting.holder(config), setting.name)
    # The field's type is T: tests/unit/test_declared.py checks both fields against it.
    return cast(T, value)


# --------------------------------------------------------------------------- settings
# Per-model settings are named: code reads them with effective(spec, config, SETTING).
TTL: Setting[float | None] = Setting("--ttl", LIMITS, "ttl", OPTFLOAT,
        help="unload a model idle this many seconds (preset key `ttl` overrides; default: never)",
        doc=(
            "unload a model after it has been idle this long; the preset key `ttl` overrides it "
            "per model"
        ),
        shown="never", preset="ttl")

REPLICA_TTL: Setting[float | None] = Setting("--replica-ttl", LIMITS, "replica_ttl", OPTFLOAT,
        help=(
            "stop a model's extra replicas (preset key `replicas`) after this many idle seconds "
            "(preset key `replica-ttl` overrides; `none`: never)"
        ),
        doc=(
            "a model with `replicas = N` starts extra children when its requests queue; each extra "
            "one stops after it has been idle this long. The preset key `replica-ttl` overrides it "
            "per model"
        ),
        preset="replica-ttl")

STOP_TIMEOUT: Setting[float] = Setting("--stop-timeout", TIMEOUTS, "stop", FLOAT,
        help="default seconds between asking a child to exit and killing it",
        doc=(
            "time between SIGTERM and SIGKILL when stopping a child; the preset key `stop-timeout` "
            "overrides it per model"
        ),
        preset="stop-timeout", spec_field="stop_timeout")

KEEP_CACHE: Setting[bool] = Setting("--keep-cache", LIMITS, "keep_cache", BOOL,
        help=(
            "save each model's slot caches before it is stopped and restore them when it loads "
            "again (preset key `keep-cache` overrides)"
        ),
        doc=(
            "save each model's slot caches before it is stopped for eviction, TTL or unload, and "
            "restore them when it loads again; the preset key `keep-cache` overrides it per model"
        ),
        negation="--no-keep-cache", table=Table.MODEL_LIFE, preset="keep-cache")

SLEEP_IDLE: Setting[float | None] = Setting("--sleep-idle", LIMITS, "sleep_idle", OPTFLOAT,
        help=(
            "llama-server's --sleep-idle-seconds for every model: free the weights after this idle "
            "time, keep the process (preset key `sleep-idle` overrides)"
        ),
        doc=(
            "llama-server's `--sleep-idle-seconds` for every model; the preset key `sleep-idle` "
            "overrides it per model"
        ),
        shown="not set", table=Table.MODEL_LIFE, preset="sleep-idle")

CANARY_INTERVAL: Setting[float | None] = Setting("--canary-interval", TIMEOUTS, "canary_interval", OPTFLOAT,
        help=(
            "seconds between one-token canary completions of an idle model (preset key "
            "`canary-interval` overrides; default: off)"
        ),
        doc=(
            "seconds between one-token canary completions of an idle, awake, loaded model; the "
            "preset key `canary-interval` overrides it per model"
        ),
        shown="off", table=Table.MODEL_LIFE, preset="canary-interval")


DECLARED: tuple[Setting[Any], ...] = (
    Setting("--server-bin", ROUTER, "server_bin", STR,
            help="llama-server binary to run for each model",
            doc="`llama-server` binary to run for each model",
            metavar="PATH", shown="looked up (below)"),
    Setting("--state-dir", ROUTER, "state_dir", PATH,
            help="instance lock + record of children, to stop leftovers of a crashed router",
            doc=(
                "instance lock and record of running children, used to kill leftovers of a router "
                "that died (see design.md)"
            ),
            shown="off"),
    Setting("--max-queue", LIMITS, "max_queue", OPTINT,
            help="requests that may wait for a model before 503 + Retry-After (default: no limit)",
            doc=(
                "requests that may wait for a model at once; one more gets 503 + `Retry-After` "
                "(`0` rejects every request whose model is not ready, so nothing is autoloaded)"
            ),
            shown="no limit"),
    Setting("--max-wait", LIMITS, "max_wait", OPTFLOAT,
            help=(
                "seconds a request may wait for its model before 503 + Retry-After (default: no "
                "limit)"
            ),
            doc="seconds a request may wait for its model (queue + load); then 503 + `Retry-After`",
            shown="no limit"),
    Setting("--drain-after", LIMITS, "drain_after", OPTFLOAT,
            help=(
                "seconds a request may wait for a slot before the model that must give way is "
                "drained: its new requests queue, its requests in flight finish, then it is "
                "swapped out (default 0.5; none = never, upstream's order)"
            ),
            doc=(
                "seconds a request may wait for a slot before the model that must give way is "
                "drained: its new requests queue behind the swap, its requests in flight finish, "
                "then it is unloaded and the waiting model loads (a model is drained only after it "
                "has been loaded this long). `none` keeps upstream's rules exactly: a busy model "
                "keeps its slot until an idle instant, waiting models load in order of arrival. "
                "See design.md, \"Scheduling under contention\""
            )),
    Setting("--evict-cost", LIMITS, "evict_cost", FLOAT,
            help=(
                "seconds of recency each second of a model's load time is worth when choosing whom "
                "to evict, so slow-loading models stay (default 0: least recently used)"
            ),
            doc=(
                "cost-aware eviction: each second a model took to load (measured; before its first "
                "load, its file size at 1 GiB/s) counts as K seconds of recency when choosing whom "
                "to evict or drain, so a model that loads in a minute is not evicted for one that "
                "loads in two seconds. `0` is plain least recently used, as upstream"
            ),
            metavar="K"),
    Setting("--cpu-budget", LIMITS, "cpu_budget", STR,
            help=(
                "CPU threads children may compute with at once: children computing on the CPU "
                "take turns to stay within it (auto = the CPUs the router may use; 0 = no turns)"
            ),
            doc=(
                "CPU threads the children may compute with at once. A child that computes on the "
                "CPU (a llama-server build without GPU devices, or `-ngl 0`) spins a thread per "
                "core; two at once on the same cores slow each other down many times over. A "
                "request to such a child, or its load, waits while others compute and their "
                "threads and its own would exceed this; turns pass in order of waiting. `auto` is "
                "the CPUs the router "
                "may run on (its CPU affinity, lowered to a container's CPU quota), `0` lets every child compute at once, as upstream. See design.md, "
                "\"CPU turns\""
            ),
            metavar="N|auto", shown="`auto`"),
    Setting("--cpu-load-wait", LIMITS, "cpu_load_wait", FLOAT,
            help=(
                "seconds a child loading on the CPU budget may hold requests to other children "
                "on it (its load and warm-up compute too)"
            ),
            doc=(
                "a child loading on the CPU budget computes too (its load and its warm-up run): "
                "requests to other children on the budget wait for it at most this long, then "
                "compute beside it (a long load from disk mostly waits for the disk)"
            )),
    TTL,
    REPLICA_TTL,
    Setting("--restart-max", LIMITS, "restart_max", INT,
            help="failures within --restart-window before a model is marked failed",
            doc="failures within `--restart-window` before a model becomes *failed*"),
    Setting("--restart-window", LIMITS, "restart_window", FLOAT,
            help="seconds over which failures are counted",
            doc="window in which failures are counted"),
    Setting("--failed-holdoff", LIMITS, "failed_holdoff", FLOAT,
            help="seconds a failed model answers 503 before a request may try it again",
            doc=(
                "how long a failed model answers 503 before a request may try it again; a reload "
                "(SIGHUP, `?reload=1`, the watcher) that finds its GGUF file changed (size, mtime "
                "or inode) ends the hold-off at once"
            )),
    Setting("--request-failures", LIMITS, "request_failures", INT,
            help=(
                "requests in a row a loaded child fails by its own doing (5xx other than 501/503, "
                "reset or closed before answering) before it is replaced (0 = off)"
            ),
            doc=(
                "live requests in a row that a loaded child fails by its own doing (a 5xx other "
                "than 501 and 503, or no response at all: refused, reset, closed, or silent past "
                "`-to`) before it is taken out of routing and replaced like a crash; any other "
                "answer, 4xx included, starts the count again, and a client that goes away never "
                "counts. `0` = off. The default is above what one bad prompt makes when a client "
                "retries it (the OpenAI SDKs send a request that got a 5xx three times). See "
                "reliability.md"
            )),
    Setting("--request-failure-window", LIMITS, "request_failure_window", FLOAT,
            help="seconds within which those failures must fall to count together",
            doc="those failures count together only within this many seconds"),
    Setting("--log-lines", LIMITS, "log_lines", INT,
            help="lines of each child's output kept for /models/logs",
            doc="output lines kept per child for `/models/logs`"),
    Setting("--child-nice", LIMITS, "child_nice", INT,
            help=(
                "how much nicer (lower CPU priority, 0-19) children run than the router, so it "
                "stays responsive on busy cores (default 0)"
            ),
            doc=(
                "children run this much nicer (lower CPU priority, 0-19) than the router. Children "
                "always stay in the router's session (in a process group of their own), as "
                "upstream's router keeps them, so where Linux shares CPU time between sessions "
                "first (autogroup) the router's thread and the children's threads are ranked "
                "together; a nicer child also ranks below the router's thread, and a child alone "
                "still gets all the CPU. Where nothing groups CPU time (no autogroup, no cgroup "
                "per service) nicer children also yield to every other busy process; the systemd "
                "unit uses `Nice=-5` with `--child-nice 5`, which puts the children back at normal "
                "priority. Measurements: performance.md"
            ),
            maximum=19),
    Setting("--max-body-bytes", LIMITS, "max_body_bytes", INT,
            help="largest request body accepted (413 above)",
            doc="largest request body; larger proxied bodies get 413",
            shown="`268435456` (256 MiB)"),
    Setting("--load-timeout", TIMEOUTS, "load_stall", FLOAT,
            help="fail a load that shows no progress (no output, no answer) for this many seconds",
            doc=(
                "a load that shows no progress for this long is killed and counted as a failure; "
                "every output line or `/health` 503 answer counts as progress"
            )),
    Setting("--download-timeout", TIMEOUTS, "download_stall", FLOAT,
            help=(
                "cancel a model download (POST /models) that shows no progress for this many "
                "seconds"
            ),
            doc=(
                "a model download (`POST /models`) that shows no progress for this long is "
                "cancelled and fails; its partial files are removed"
            )),
    Setting("--health-interval", TIMEOUTS, "health_interval", FLOAT,
            help="seconds between liveness probes of a loaded model",
            doc="time between liveness probes of a ready model"),
    Setting("--health-timeout", TIMEOUTS, "health_timeout", FLOAT,
            help="seconds a liveness probe may take",
            doc="time limit of one probe"),
    Setting("--health-failures", TIMEOUTS, "health_failures", INT,
            help="consecutive failed probes before the child is killed and replaced",
            doc="consecutive failed probes before the child is killed and replaced"),
    STOP_TIMEOUT,
    Setting("--memory-budget", ROUTER, "memory_budget", STR,
            help=(
                "evict idle models to keep estimated memory under this (auto = device memory minus "
                "--memory-margin, or a size like 20GiB; default: count models only)"
            ),
            doc=(
                "also keep the estimated memory of loading and loaded models under this budget, "
                "evicting idle models to make room (memory.md)"
            ),
            metavar="SIZE|auto", shown="off (count models only)"),
    Setting("--memory-margin", LIMITS, "memory_margin", SIZE,
            help="memory left free by --memory-budget auto",
            doc="memory left free by `--memory-budget auto`",
            shown="`1GiB`"),
    Setting("--memory-recovery-wait", TIMEOUTS, "memory_recovery", FLOAT,
            help="seconds a load waits for freed device memory to show up before it starts",
            doc="how long a load waits for memory freed by evicted children to show up as free"),
    Setting("--device-probe-timeout", TIMEOUTS, "device_probe", FLOAT,
            help=(
                "seconds one NVML call (GPU memory, a child's VRAM) may take before its figure "
                "counts as unknown"
            ),
            doc=(
                "how long one NVML call (GPU memory, a child's VRAM) may take; a driver that does "
                "not answer leaves the figure unknown instead of blocking the router; `0` = no "
                "limit"
            )),
    Setting("--shutdown-grace", TIMEOUTS, "shutdown_grace", FLOAT,
            help="seconds in-flight responses may run after SIGTERM",
            doc="time in-flight responses may run after the first SIGTERM/SIGINT"),
    Setting("--metrics-scrape-timeout", TIMEOUTS, "metrics_scrape", FLOAT,
            help=(
                "seconds GET /metrics waits for each child's own /metrics (queue and KV-cache "
                "gauges)"
            ),
            doc=(
                "how long `GET /metrics` waits for each `--metrics` child's own `/metrics`; a "
                "slower child is left out of that scrape"
            )),
    Setting("--proxy-idle-timeout", TIMEOUTS, "proxy_idle", FLOAT,
            help=(
                "seconds an idle pooled connection to a child is kept for reuse (below the child's "
                "5 s keep-alive)"
            ),
            doc=(
                "how long an idle pooled connection to a child (proxied requests, "
                "metrics scrapes) may be reused; keep it below llama-server's 5 s keep-alive"
            )),
    Setting("--header-timeout", TIMEOUTS, "header_read", FLOAT,
            help=(
                "seconds a connection may take to send its request headers (slowloris guard; also "
                "closes idle keep-alive connections; 0 = never)"
            ),
            doc=(
                "a connection must deliver its complete request headers within this long of "
                "connecting (or of its previous response), else it is closed without an answer "
                "(slowloris guard); idle keep-alive connections are closed after the same time; "
                "`0` = never"
            )),
    Setting("--admin-api-key", ROUTER, "admin_api_keys", CSV,
            help=(
                "key(s), comma-separated, required for /models/load, /models/unload, POST and "
                "DELETE /models, /models?reload=1 and /models/logs (also accepted everywhere else)"
            ),
            doc=(
                "when set, only these keys may call `POST /models/load`, `POST /models/unload`, "
                "`POST /models` (download), `DELETE /models`, `GET /models?reload=1` and `GET "
                "/models/logs`; they are accepted on every other endpoint too. Not given to the "
                "children"
            ),
            metavar="KEY[,KEY...]", shown="none"),
    KEEP_CACHE,
    Setting("--keep-cache-dir", ROUTER, "keep_cache_dir", PATH,
            help="where saved slot caches live (default: kv-cache/ in --state-dir)",
            doc=(
                "where saved slot caches live, one directory per model. Caches survive a router "
                "restart and are restored only into a child started with the same options and "
                "model file"
            ),
            shown="`kv-cache/` in `--state-dir`", table=Table.MODEL_LIFE),
    Setting("--keep-cache-budget", LIMITS, "keep_cache_budget", SIZE,
            help="disk the saved slot caches may use together; the oldest go first (default 10GiB)",
            doc=(
                "disk all saved caches may use together; after each save the oldest are deleted "
                "until they fit (a single cache larger than the budget is not kept)"
            ),
            shown="`10GiB`", table=Table.MODEL_LIFE),
    Setting("--keep-cache-timeout", TIMEOUTS, "keep_cache", FLOAT,
            help="seconds one slot save or restore may take before it is skipped",
            doc=(
                "time one slot save or restore may take. A slower or failed one is skipped and "
                "logged: the stop or the request goes on without it"
            ),
            table=Table.MODEL_LIFE),
    SLEEP_IDLE,
    Setting("--default-model", ROUTER, "default_model", STR,
            help="model used by requests that name none (and by GET /props without ?model=)",
            doc="the model used by requests that name none, and by `GET /props` without `?model=`",
            metavar="NAME", shown="none", table=Table.MODEL_LIFE),
    Setting("--watch", ROUTER, "watch", BOOL,
            help="reload when files in --models-dir or the preset file change (default on)",
            doc=(
                "reload when files in `--models-dir` or the preset file change (inotify when "
                "available, else polling every 2 s). Off in `-m`/`-hf` mode"
            ),
            negation="--no-watch", table=Table.MODEL_LIFE),
    Setting("--watch-debounce", TIMEOUTS, "watch_debounce", FLOAT,
            help="seconds without further changes before a watched change is applied",
            doc=(
                "a change is applied once the watched files have not changed for this long, so a "
                "model still being copied in is picked up once, complete"
            ),
            table=Table.MODEL_LIFE),
    CANARY_INTERVAL,
    Setting("--canary-timeout", TIMEOUTS, "canary_timeout", FLOAT,
            help=(
                "seconds a canary completion may take before it counts as failed "
                "(--health-failures failed canaries in a row replace the child)"
            ),
            doc=(
                "time a canary may take before it counts as failed; after `--health-failures` "
                "failed canaries in a row the child is replaced"
            ),
            table=Table.MODEL_LIFE),
    Setting("--ui-dir", ROUTER, "ui_dir", PATH,
            help=(
                "built llama.cpp web UI to serve at / (default: .webui/dist of the checkout, made "
                "by bin/build-webui; without a build, or with `none`, the dashboard is served "
                "there)"
            ),
            doc=(
                "llama.cpp's built web UI to serve at `/` (made by `make webui`); without one the "
                "dashboard is served at `/`. `--path DIR` serves that directory instead, and "
                "`--no-ui` no UI at all. See webui.md"
            ),
            metavar="DIR", shown="`.webui/dist` of the checkout, when built"),
    # Preset keys of a model's own, with no router-wide flag (the first is upstream's).
    Setting("", MODEL, "load_on_startup", BOOL, preset="load-on-startup"),
    Setting("", MODEL, "pin", BOOL, preset="pin"),
    Setting("", MODEL, "devices", STR, preset="devices"),
    Setting("", MODEL, "default", BOOL, preset="default-model"),
    Setting("", MODEL, "replicas", INT, preset="replicas", maximum=64),
)

# Derived tables.
SETTINGS: tuple[Setting[Any], ...] = tuple(s for s in DECLARED if s.flag)
PER_MODEL: tuple[Setting[Any], ...] = tuple(s for s in DECLARED if s.preset)
OWN_KEYS = frozenset(s.flag for s in SETTINGS)
# Our flags as rows of the command-line table (nothing else reads them).
EXTRA_OPTIONS: tuple[Opt, ...] = tuple(
    Opt((s.flag,), (s.negation,) if s.negation else (), s.env, 0 if s.kind is BOOL else 1) for s in SETTINGS
)
# Preset-only keys we add to upstream's (flags.PRESET_ONLY), such as idle TTL and pinning,
# which upstream lacks (llama.cpp #18189, #18153). Their `__PRESET_*` names only identify
# them in the flag table; no such variable is read.
_UPSTREAM_PRESET_KEYS = frozenset(key for opt in PRESET_ONLY for key in opt.spellings)
EXTRA_PRESET_ONLY: tuple[Opt, ...] = tuple(
    Opt((s.preset,), (), "__PRESET_" + s.preset.upper().replace("-", "_"), 1)
    for s in PER_MODEL
    if s.preset not in _UPSTREAM_PRESET_KEYS
)


# --------------------------------------------------------------------------- docs
def doc_rows(table: Table) -> list[str]:
    """The rows (after the header) of the docs/command-line.md table for `table`."""
    return [_doc_row(s) for s in SETTINGS if s.table is table]


def _doc_row(s: Setting[Any]) -> str:
    if s.kind is BOOL:
        flag = f"`{s.flag}` / `{s.negation}`"
    else:
        metavar = (s.metavar or _METAVARS[s.kind]).replace("|", "\\|")
        flag = f"`{s.flag} {metavar}`" + (" (int)" if s.kind in (INT, OPTINT) else "")
    return f"| {flag} | `{s.env}` | {s.shown or _shown_default(s)} | {s.doc} |"


def _shown_default(s: Setting[Any]) -> str:
    value = s.default()
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return f"`{value}`"
    if isinstance(value, float):
        return f"`{value:g}`"
    raise ValueError(f"{s.flag}: its default {value!r} needs `shown` text for the docs")
