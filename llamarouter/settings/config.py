"""Frozen settings, validated once in build.py and passed down explicitly.

Nothing here reads the environment or the filesystem: build.py turns argv + environ into a
RouterConfig, discovery.py turns it into ModelSpecs. Every limit the router enforces is a
named field here (no hard-coded timeouts elsewhere); how a field is set by a flag or a
preset key is declared in declared.py, which tests/unit/test_declared.py holds these to.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Timeouts:
    # Upstream's default stop-timeout (server-models.cpp): exit command, then SIGKILL.
    stop: float = 10.0
    # A loading child that prints nothing and answers nothing for this long is failed.
    # Any log line or /health answer restarts the clock, so a slow 100 GB load survives.
    load_stall: float = 120.0
    # /health poll interval while loading. Log lines that announce readiness trigger an
    # immediate probe, so this only bounds how late we notice a quiet child.
    ready_poll: float = 0.02
    # After a readiness line, probe every `hint_poll` for up to `hint_window` seconds.
    hint_poll: float = 0.002
    hint_window: float = 0.5
    # Liveness of READY children: probe every `health_interval`, each probe may take
    # `health_timeout`; `health_failures` consecutive misses kill and replace the child.
    health_interval: float = 5.0
    health_timeout: float = 3.0
    health_failures: int = 3
    # Proxy connect/read timeout (llama-server -to/--timeout, default 3600). 0 = none,
    # unlike upstream where 0 makes every proxied call fail at once (llama.cpp #25396).
    proxy: float = 3600.0
    # Idle pooled connections to a child (proxied requests, health probes, metrics scrapes)
    # are reused for this long only: well inside llama-server's keep-alive (5 s, fixed in
    # cpp-httplib), so a request never goes out on a connection the child is closing.
    proxy_idle: float = 2.0
    # Graceful shutdown: how long in-flight responses may run after SIGTERM.
    shutdown_grace: float = 30.0
    # Restart backoff after an unexpected exit: initial delay, doubled per failure, capped.
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    # Housekeeping period while requests wait or a child loads, stops or backs off (the
    # state-dir record of a child spawned mid-load; what waiters wait for may change
    # without an event). At rest there is no tick: TTLs and deadlines have their own timers.
    tick: float = 1.0
    # Before a load, how long to wait for device memory freed by evicted children to show up
    # as free (VRAM is released late), and how often to look.
    memory_recovery: float = 5.0
    memory_poll: float = 0.1
    # One NVML call (GPU memory, a child's VRAM) may take this long; a driver that does not
    # answer leaves the figures unknown instead of blocking the event loop for good. 0 = none.
    device_probe: float = 2.0
    # Starting NVML (only with a memory budget, at startup) may take this long: without the
    # persistence daemon the driver initialises every GPU then. Not started in time: the
    # router refuses to start rather than budget a GPU host as a CPU host. 0 = none.
    device_start: float = 30.0
    # GET /metrics fetches each --metrics child's own /metrics for the Inference Extension
    # gauges; a slow child costs the scrape at most this long and is then left out.
    metrics_scrape: float = 1.0
    # A client connection must deliver complete request headers within this many seconds
    # of connecting (or of its previous response); idle keep-alive connections are closed
    # after the same time. Drops slowloris clients (aiohttp's keepalive_timeout, which
    # runs from the accept and is not reset by partial header bytes). 0 = never.
    header_read: float = 60.0
    # Bounds on the supervision core's own waits, so no lifecycle step can hang:
    # spawning a child (fork + exec), reaping it after SIGKILL, draining its output pipe
    # once it is gone, and fetching its /v1/models entry once it is ready.
    spawn: float = 30.0
    reap: float = 5.0
    drain: float = 3.0
    info: float = 3.0
    # A wait of a child's life (a probe, a canary, a keep-cache restore, the wait for freed
    # memory) cancelled because a stop came first gets this long to end before the life
    # goes on; one that ignores cancellation is left to end on its own, observed.
    settle_cancelled: float = 1.0
    # A ready child's log lines wait in its output pipe for up to this long between reads,
    # so a burst of requests costs the router one wakeup for their log lines rather than
    # one per line (a loading child's lines are read at once). 0 = read every line at once.
    output_hold: float = 0.1
    # After the shutdown grace, in-flight handlers are cancelled and get this long to end.
    shutdown_cancel: float = 1.0
    # A second SIGINT/SIGTERM exits within this long, whatever is still running.
    force_exit: float = 2.0
    # Keep-cache: one slot save (before a stop) or restore (after a load) may take this long;
    # a slower or failed one is skipped and logged, never holding up the stop or the request.
    keep_cache: float = 30.0
    # Watching --models-dir and the preset file: changes are applied this long after the
    # last one seen (a model copied in writes for a while), and without inotify the
    # sources are rescanned every `watch_poll` seconds.
    watch_debounce: float = 1.0
    watch_poll: float = 2.0
    # Canary completion (`max_tokens: 1`) of an idle READY model: every `canary_interval`
    # seconds (None = off; the preset key `canary-interval` overrides), each may take
    # `canary_timeout`; `health_failures` failed ones in a row replace the child.
    canary_interval: float | None = None
    canary_timeout: float = 10.0
    # At startup, `llama-server ARGS --version` validates the command line and names the
    # build; a binary that does not answer within this many seconds is a startup error.
    version_probe: float = 30.0
    # Downloads (POST /models): a download child that reports no progress and writes no
    # log line for `download_stall` seconds is cancelled and fails; POST /models waits up
    # to `download_start` seconds for the download to begin (or to fail, answered with
    # the child's reason) before answering that it runs.
    download_stall: float = 120.0
    download_start: float = 30.0
    # A download child asked to exit (done, cancelled, stalled) gets this long before it is
    # killed; its partial files are removed by the router either way.
    download_exit: float = 2.0
    # Resumable streams: a lookup or stop forwarded to the child that owns a conversation
    # may take this long (upstream's router allows 0.25 s; a busy CI host needs more).
    stream_lookup: float = 2.0


@dataclass(frozen=True)
class Limits:
    # Upstream --models-max: loading + loaded children; 0 = unlimited.
    models_max: int = 4
    # Admission queue bounds; None keeps upstream's behaviour (wait forever).
    max_queue: int | None = None
    max_wait: float | None = None
    # Contention: a request that has waited this long for a slot drains the model that
    # must give way (new requests for it queue, its requests in flight finish, then it is
    # evicted). None: never drain a busy model and start waiting models in order of
    # arrival (upstream's rules exactly). The default is from the scheduling benchmark
    # (docs/design.md): at 0.5 s a request behind streaming clients is served in 0.7-1.0 s;
    # at 1 s the thrash serves more but that request waited up to 1.96 s.
    drain_after: float | None = 0.5
    # Cost-aware eviction: each second a model takes to load counts as this many seconds
    # of recency when choosing whom to evict (0 = plain least recently used, upstream).
    evict_cost: float = 0.0
    # CPU turns: children computing on the host's CPUs take turns so that their threads
    # together stay within this many ("auto": the CPUs the router may run on; "0": no
    # turns, as upstream). See core/cpushare.py.
    cpu_budget: str = "auto"
    # A child on the CPU budget that is loading holds other children's requests this long
    # at most (its load and warm-up compute; a long load from disk mostly waits).
    cpu_load_wait: float = 0.5
    # Crash loop: after `restart_max` unexpected exits within `restart_window` seconds the
    # model becomes FAILED and requests get a fast 503.
    restart_max: int = 3
    restart_window: float = 60.0
    # How long a FAILED model refuses requests before a request may try it again.
    failed_holdoff: float = 30.0
    # Health from live traffic: this many requests in a row that a READY child fails by
    # its own doing (a 5xx other than 501 and 503, or no response head: refused, reset,
    # closed, or nothing within the proxy timeout), all within `request_failure_window`
    # seconds, take it out of routing and replace it like a crash. Any other answer, 4xx
    # included, starts the count again. 0 = off. Above what one bad prompt makes: the
    # OpenAI SDKs send a request that got a 5xx three times in all.
    request_failures: int = 5
    request_failure_window: float = 60.0
    # A child that lost its port to another process before binding it is respawned on a
    # fresh port this many times before the load counts as failed.
    bind_retries: int = 5
    # Lines of each child's output kept in memory for /models/logs and failure reports.
    log_lines: int = 1000
    # Children run this much nicer than the router (0-19; 0 = as the router, as upstream).
    # Children always stay in the router's session (as upstream's do), so under autogroup
    # the router's thread and theirs are ranked together; a nicer child then also ranks
    # below the router's thread, and a child alone still gets all the CPU. Off by default:
    # where nothing groups CPU time by session or cgroup, nicer children also yield to
    # every other busy process (docs/performance.md). The systemd unit raises the router
    # instead (Nice=-5 with --child-nice 5).
    child_nice: int = 0
    # Request bodies larger than this get 413 (audio uploads need room).
    max_body_bytes: int = 256 * 1024 * 1024
    # Connections to a child are limited to its HTTP worker threads minus this many, left
    # for the router's own health probes and metrics scrapes.
    child_http_reserve: int = 1
    # Resumable streams: conversation ids (X-Conversation-Id) remembered with the model
    # that served them; the oldest are forgotten past this many.
    stream_conversations: int = 10000
    # Per-subscriber queue of /models/sse events; a slower client is dropped, not buffered.
    sse_queue: int = 1000
    # Default idle TTL for every model (seconds, None = never); the preset key `ttl` overrides.
    ttl: float | None = None
    # A model's extra replicas (preset key `replicas`) stop after this long idle; the
    # preset key `replica-ttl` overrides it per model (None = never).
    replica_ttl: float | None = 60.0
    # --memory-budget auto: device memory minus this margin (bytes).
    memory_margin: int = 1024 * 1024 * 1024
    # Keep-cache default for every model (the preset key `keep-cache` overrides) and the
    # disk the saved slot caches may take together; the oldest are deleted first.
    keep_cache: bool = False
    keep_cache_budget: int = 10 * 1024 * 1024 * 1024
    # llama-server's own --sleep-idle-seconds for every model (None = not set; the preset
    # key `sleep-idle` overrides): weights freed after this idle time, process kept.
    sleep_idle: float | None = None
    # Vertex AI predict route: most instances one request may carry (llama-server's limit).
    predict_instances: int = 128
    # The dashboard's timeline (GET /dashboard/history): seconds kept, and bucket width.
    history_span: float = 900.0
    history_step: float = 5.0


@dataclass(frozen=True)
class CorsPolicy:
    # llama-server's defaults (common.h); --tools / MCP servers without an explicit
    # --cors-origins turn "*" into "localhost" (arg.cpp, after parsing).
    origins: str = "*"
    methods: str = "GET, POST, DELETE, OPTIONS"
    headers: str = "*"
    credentials: bool = True


@dataclass(frozen=True)
class ModelSpec:
    """One routable model: where it comes from and how its child is started."""

    name: str
    source: str  # "models_dir" | "cache" | "preset" | "cli" (upstream words + our -m mode)
    # Options from the model's own sources ([*] and its preset section merged over what
    # discovery found; router flags are applied later): (option key, value) as upstream
    # stores preset values (switches as "true"/"false"), sorted by key.
    options: tuple[tuple[str, str], ...] = ()
    aliases: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    load_on_startup: bool = False
    stop_timeout: float | None = None  # None = Timeouts.stop
    ttl: float | None = None  # None = Limits.ttl
    pin: bool = False
    # Preset key `devices = 0,1` (NVML ids; `none`: the CPU): manual placement on several
    # GPUs; None = placed automatically. Read by core/placement.py's parse_devices.
    devices: str | None = None
    hidden: bool = False
    model_path: str | None = None  # the main GGUF, when known (memory estimates, dedup)
    input_modalities: tuple[str, ...] = ("text",)
    keep_cache: bool | None = None  # None = Limits.keep_cache
    sleep_idle: float | None = None  # None = Limits.sleep_idle
    canary_interval: float | None = None  # None = Timeouts.canary_interval
    default: bool = False  # preset key `default-model = true`
    replicas: int = 1  # preset key `replicas`: children of this model at most
    replica_ttl: float | None = None  # None = Limits.replica_ttl

    def with_changes(self, **changes: object) -> ModelSpec:
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]  # field names are the caller's, checked by dataclasses


@dataclass(frozen=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    api_keys: tuple[str, ...] = ()
    # --admin-api-key: when set, only these keys may load, unload, reload and read logs;
    # they are accepted on every other endpoint too.
    admin_api_keys: tuple[str, ...] = ()
    # llama-server's CORS settings, answered by the router exactly as llama-server does
    # (server-http.cpp, pre-routing handler): "*" with credentials echoes any Origin,
    # "localhost" echoes localhost origins only, anything else is sent as it is.
    cors: CorsPolicy = field(default_factory=CorsPolicy)
    # --api-prefix: every route is served under this path (no trailing slash); the children
    # do not get it and see unprefixed paths.
    api_prefix: str = ""
    # --path DIR: static files served at / in place of the web UI (router mode).
    static_path: Path | None = None
    # --reuse-port: SO_REUSEPORT on the listening sockets, as llama-server sets it.
    reuse_port: bool = False
    # --ui/--no-ui (--webui/--no-webui): whether GET / serves the web UI.
    webui: bool = True
    # --ui-config JSON / --ui-config-file PATH: /props ui_settings in router mode (JSON text).
    ui_settings: str = "{}"
    server_bin: str = "llama-server"
    models_dir: Path | None = None
    models_preset: Path | None = None
    models_autoload: bool = True
    # llama-server flags given to the router that every child inherits: known options as
    # (option key, value) like preset values; unknown or two-value flags verbatim.
    child_options: tuple[tuple[str, str], ...] = ()
    child_extra: tuple[str, ...] = ()
    # -m / -hf mode: the one model, loaded at start and never evicted.
    single_model: ModelSpec | None = None
    # Cache of HF-hub-layout models (None = do not scan).
    cache_dir: Path | None = None
    state_dir: Path | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    # LLAMA_SERVER_DEBUG_FAKE_TIMING: upstream's test hook (sleep 2 s around loads and
    # requests) so its own test-suite can observe queues through us too.
    # Memory budget: None = count models only (upstream); "auto" or a size such as 20GiB.
    memory_budget: str | None = None
    fake_timing: bool = False
    fake_timing_secs: float = 2.0
    # Environment given to children (the router's, minus router-only LLAMA_ARG_* names).
    child_env: tuple[tuple[str, str], ...] = ()
    build_info: str = ""
    # The devices the llama-server build computes on (`--list-devices`, asked at startup):
    # () = CPU only; None = not asked.
    server_devices: tuple[str, ...] | None = None
    # --default-model: the model a request that names none goes to (None: the model whose
    # preset says `default-model = true`, else none and upstream's error).
    default_model: str | None = None
    # Where saved slot caches live (--keep-cache-dir; default: <state-dir>/kv-cache).
    keep_cache_dir: Path | None = None
    # Watch --models-dir and the preset file and reload on change (--no-watch turns it off).
    watch: bool = True
    # Google Cloud Vertex AI compatibility (AIP_MODE=PREDICTION, as llama-server): the
    # predict route and an optional extra health route; None = off.
    gcp_predict_route: str | None = None
    gcp_health_route: str | None = None

    @property
    def hosts(self) -> tuple[str, ...]:
        """--host as llama-server reads it: comma-separated addresses (or .sock paths)."""
        return tuple(h.strip() for h in self.host.split(",") if h.strip())
    # Built llama.cpp web UI (bin/build-webui) served at `/`; None = serve the dashboard there.
    ui_dir: Path | None = None
