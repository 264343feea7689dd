#!/usr/bin/env python3
"""A small, deterministic stand-in for llama.cpp's ``llama-server``.

Run it exactly like the real binary (the router starts it as a subprocess)::

    python tests/fakes/fake_llama_server.py --host 127.0.0.1 --port 8081 \
        --alias mymodel -m /models/x.gguf -c 8192 -ngl 99 --jinja ...

Every llama-server flag is accepted; the ones that matter are parsed
(``--host --port -a/--alias -m/--model -c/--ctx-size -np/--parallel
--api-key --mmproj --no-log-prefix --no-log-timestamps``), the rest are
skipped (an unknown ``--flag`` swallows the next token when that token does
not start with ``-`` or is a negative number; ``--flag=value`` also works).

Behaviour is controlled by *knobs*, from three sources in increasing
precedence: environment ``FAKE_LLAMA_<KNOB>`` (e.g. ``FAKE_LLAMA_LOAD_SECS``),
a JSON sidecar ``<model path>.fake.json`` (so models of one router can behave
differently), and CLI flags ``--fake-<knob> VALUE`` (``--fake-load-secs 0.5``,
``--fake-hang``, ``--fake-hang=false``).  An unknown knob name in any source is
a configuration error: the fake prints it and exits with code 2.

Knobs (see ``KNOBS``):

``load_secs``  float, 0    every endpoint answers 503 "Loading model" until
                           this long after process start (``/fake/*`` excepted)
``crash_after`` int, 0     after N *completed* inference requests the process
                           dies with ``os._exit(exit_code)`` (0 = never)
``exit_code``  int, 1      exit status for crash_after / crash_on_start
``crash_on_start`` bool    print model-load errors and exit with exit_code; if
                           load_secs > 0 it binds and "loads" (503) first
``hang``       bool        once ready, accept connections but never answer
``hang_after`` int, 0      hang after N completed inference requests
``inference_fails`` bool   inference requests answer 500 while /health and the
                           other monitoring endpoints still answer 200
``inference_fails_after`` int, 0  the same once N inference requests have been
                           received (0 = never): the first N are served
``inference_reset`` bool   a failing inference request (either knob above) gets
                           its connection reset before any response head,
                           instead of a 500
``ignore_sigterm`` bool    SIGTERM is ignored (only SIGKILL stops it)
``term_waits_for_clients`` bool  on SIGTERM, streams stop producing tokens but
                           stay open, and the process exits only once their
                           clients have closed them (as llama-server does)
``tokens``     int, 8      tokens per completion ("tok0 tok1 ...")
``tps``        float, 0    generation speed in tokens/s (0 = unlimited); it
                           paces streaming *and* non-streaming generation
``silent``     bool        no log output at all until ready (fatal E-lines on
                           exit are still printed)
``log_interval`` float, 0.25  period of the progress lines while loading
``bind_fail``  bool        log "couldn't bind HTTP server socket" and exit 1
                           (a real bind failure does the same)
``spawn_grandchild`` bool  start ``sleep 300`` in the same process group
                           (stdio to /dev/null) to test process-group kill
``keepalive_secs`` float, 0  close idle keep-alive connections after this long
                           (0 = aiohttp's default, 75 s; llama-server's is 5 s)
``http_threads`` int, 0    serve at most N connections at once, like
                           llama-server's fixed HTTP worker threads: further
                           connections are accepted but left unread until a
                           served one closes (0 = no limit)

"Inference requests" are /v1/chat/completions, /chat/completions,
/completion(s), /v1/completions, /v1/embeddings, /embedding(s).  With one slot
(``-np``, default 1) concurrent inference requests queue like llama-server's
deferred requests.

Debug endpoint ``GET /fake/stats`` (always answers, even while loading or
hung; not counted, not recorded): request counts by path, ``open_streams``,
``cancelled_streams`` (client went away mid-stream), ``cancelled_requests``
(same for non-streaming), ``completed_inference``, ``last_headers`` (lower-case
header dict of the last request other than /fake/* and the monitoring GETs
/health /v1/health /metrics /slots /props), ``last_request`` (method, path,
query, headers, json body of that request), ``headers_by_path`` (last headers
seen per path, monitoring paths included), ``pid``, ``grandchild_pid``,
``uptime``, ``ready``, ``hanging``, ``knobs``, ``connections`` (``open``,
``max_open``, ``waiting`` / ``max_waiting`` (accepted, not yet served), ``total``,
``closed_by_client``, ``closed_by_server`` (idle keep-alive expiry), and the
last request path of each closed connection in ``closed_by_*_paths``)...

Streams: chat sends a role-only chunk first (``delta: {"role": "assistant",
"content": null}``, as llama-server does), then one chunk per token, a final
chunk with ``finish_reason`` (and ``usage`` if ``stream_options.include_usage``),
then ``data: [DONE]``.  /v1/completions streams the same way; native
/completion streams have no ``[DONE]`` (last event has ``"stop": true``).

Signals: SIGTERM/SIGINT -> "cleaning up before exit..." log line, in-flight
streams stop pacing and send their remaining tokens at once, hung requests
are dropped, exit 0.  A SIGTERM that arrives while the script is still
starting is remembered and handled as soon as the loop runs (only one during
the interpreter's own start-up, ~0.1 s, still kills with -15).

Also like llama-server: ``--api-key K[,K2]`` (Bearer or X-Api-Key; /health and
/models stay public), ``LLAMA_ARG_HOST/PORT/MODEL/ALIAS/CTX_SIZE/N_PARALLEL``
and ``LLAMA_API_KEY`` env defaults, a bind failure logs ``couldn't bind HTTP
server socket`` and exits 1, and ``--port 0`` logs the port actually bound.
Logs go to stderr only, llama-server style (``0.00.004.789 I <message>``); old
style lines are included too (``main: HTTP server is listening, hostname: ...``
*before* loading; ``main: server is listening on http://H:P - starting the
main loop`` and ``srv  update_slots: all slots are idle`` once ready).

Deliberate differences from the real server: responses echo the request's
``model`` field; the model id is the alias or the model file's basename;
/metrics and /v1/embeddings work without ``--metrics`` / ``--embeddings``.

This file must stay standalone: it must not import llamarouter.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

START = time.monotonic()

# name -> (type, default)
KNOBS: dict[str, tuple[type, object]] = {
    "load_secs": (float, 0.0),
    "crash_after": (int, 0),
    "exit_code": (int, 1),
    "crash_on_start": (bool, False),
    "hang": (bool, False),
    "hang_after": (int, 0),
    "inference_fails": (bool, False),
    "inference_fails_after": (int, 0),
    "inference_reset": (bool, False),
    "ignore_sigterm": (bool, False),
    "term_waits_for_clients": (bool, False),
    "tokens": (int, 8),
    "tps": (float, 0.0),
    "silent": (bool, False),
    "log_interval": (float, 0.25),
    "bind_fail": (bool, False),
    "spawn_grandchild": (bool, False),
    "models_delay": (float, 0.0),
    "keepalive_secs": (float, 0.0),
    "http_threads": (int, 0),
}

ENV_PREFIX = "FAKE_LLAMA_"
SIDECAR_SUFFIX = ".fake.json"

_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}

# llama-server flags that take a value and that the fake uses.
_VALUE_FLAGS = {
    "--host": "host",
    "--port": "port",
    "-a": "alias",
    "--alias": "alias",
    "-m": "model",
    "--model": "model",
    "-c": "ctx_size",
    "--ctx-size": "ctx_size",
    "-np": "parallel",
    "--parallel": "parallel",
    "--api-key": "api_key",
    "-mm": "mmproj",
    "--mmproj": "mmproj",
}
# llama-server switches the fake cares about.
_SWITCHES = {
    "--metrics": ("metrics", True),
    "--no-log-prefix": ("log_prefix", False),
    "--log-prefix": ("log_prefix", True),
    "--no-log-timestamps": ("log_timestamps", False),
    "--log-timestamps": ("log_timestamps", True),
}
# Known value-less llama-server flags: never swallow the next token.
_BOOL_FLAGS = {
    "--jinja", "--no-jinja", "--webui", "--no-webui", "--slots", "--no-slots",
    "--props", "--embedding", "--embeddings", "--reranking", "--rerank",
    "-cb", "--cont-batching", "-nocb", "--no-cont-batching", "--mlock",
    "--no-mmap", "--mmap", "-v", "--verbose", "--log-disable", "--no-warmup",
    "--check-tensors", "-kvu", "--kv-unified", "-nkvo", "--no-kv-offload",
    "--offline", "--context-shift", "--no-context-shift", "--swa-full",
    "--no-perf", "--special", "-sp", "--escape", "--no-escape", "-e",
    "--cache-prompt", "--no-cache-prompt", "--no-mmproj", "--no-mmproj-offload",
    "-h", "--help", "--version", "--completion-bash", "--list-devices",
}


# What `--version` reports, in llama-server's format (build number, commit).
FAKE_VERSION = "0.0.0-fake (build 7, commit fake)"


class ConfigError(Exception):
    pass


def _is_value_token(tok: str) -> bool:
    """A token that can be a flag's value: not a flag, or a negative number."""
    if not tok.startswith("-"):
        return True
    try:
        float(tok)
        return True
    except ValueError:
        return False


def convert_knob(name: str, raw: object, source: str) -> object:
    if name not in KNOBS:
        raise ConfigError(
            f"unknown knob {name!r} from {source}; known knobs: {', '.join(KNOBS)}"
        )
    typ = KNOBS[name][0]
    try:
        if typ is bool:
            if isinstance(raw, bool):
                return raw
            if isinstance(raw, (int, float)) and raw in (0, 1):
                return bool(raw)
            s = str(raw).strip().lower()
            if s in _TRUE:
                return True
            if s in _FALSE:
                return False
            raise ValueError(raw)
        if isinstance(raw, bool):
            raise ValueError(raw)
        if typ is int:
            if isinstance(raw, float):
                if not raw.is_integer():
                    raise ValueError(raw)
                return int(raw)
            return int(str(raw).strip())
        return float(str(raw).strip()) if not isinstance(raw, (int, float)) else float(raw)
    except (TypeError, ValueError):
        raise ConfigError(
            f"bad value {raw!r} for knob {name!r} ({typ.__name__}) from {source}"
        ) from None


# llama-server also reads these environment variables (CLI flags win).
_LLAMA_ENV = {
    "LLAMA_ARG_HOST": "host",
    "LLAMA_ARG_PORT": "port",
    "LLAMA_ARG_ALIAS": "alias",
    "LLAMA_ARG_MODEL": "model",
    "LLAMA_ARG_CTX_SIZE": "ctx_size",
    "LLAMA_ARG_N_PARALLEL": "parallel",
    "LLAMA_API_KEY": "api_key",
    "LLAMA_ARG_MMPROJ": "mmproj",
}


def parse_args(argv: list[str], environ=os.environ) -> tuple[dict, dict]:
    """Return (options, cli_knobs).  Tolerates any llama-server flag."""
    opts: dict = {
        "host": "127.0.0.1",
        "port": "8080",
        "alias": None,
        "model": None,
        "ctx_size": "4096",
        "parallel": "1",
        "api_key": None,
        "mmproj": None,
        "metrics": False,
        "log_prefix": True,
        "log_timestamps": True,
    }
    for env_name, key in _LLAMA_ENV.items():
        if environ.get(env_name):
            opts[key] = environ[env_name]
    knobs: dict = {}
    i, n = 0, len(argv)
    while i < n:
        tok = argv[i]
        i += 1
        if _is_value_token(tok):
            continue  # stray positional: ignore
        flag, eq, inline = tok.partition("=")
        if flag.startswith("--fake-"):
            name = flag[len("--fake-"):].replace("-", "_")
            if name not in KNOBS:
                raise ConfigError(f"unknown fake flag {flag!r}; known knobs: {', '.join(KNOBS)}")
            if eq:
                raw: object = inline
            elif KNOBS[name][0] is bool:
                if i < n and argv[i].strip().lower() in (_TRUE | _FALSE) - {""}:
                    raw = argv[i]
                    i += 1
                else:
                    raw = True
            else:
                if i >= n:
                    raise ConfigError(f"flag {flag!r} needs a value")
                raw = argv[i]
                i += 1
            knobs[name] = convert_knob(name, raw, f"CLI {flag}")
            continue
        if flag in _VALUE_FLAGS:
            if eq:
                value = inline
            else:
                if i >= n:
                    raise ConfigError(f"flag {flag!r} needs a value")
                value = argv[i]
                i += 1
            opts[_VALUE_FLAGS[flag]] = value
            continue
        if flag in _SWITCHES:
            key, val = _SWITCHES[flag]
            opts[key] = val
            continue
        if eq or flag in _BOOL_FLAGS:
            continue
        # Unknown flag: a following non-flag token is its value.
        if i < n and _is_value_token(argv[i]):
            i += 1
    for key in ("port", "ctx_size", "parallel"):
        try:
            opts[key] = int(opts[key])
        except ValueError:
            raise ConfigError(f"bad integer for {key}: {opts[key]!r}") from None
    if opts["parallel"] <= 0:  # -1 = auto in llama-server
        opts["parallel"] = 1
    if opts["ctx_size"] <= 0:  # 0 = from model
        opts["ctx_size"] = 2048
    return opts, knobs


def load_knobs(opts: dict, cli_knobs: dict, environ=os.environ) -> dict:
    knobs = {name: default for name, (_t, default) in KNOBS.items()}
    for key, raw in environ.items():
        if key.startswith(ENV_PREFIX):
            name = key[len(ENV_PREFIX):].lower()
            knobs[name] = convert_knob(name, raw, f"env {key}")
    model = opts.get("model")
    if model:
        sidecar = model + SIDECAR_SUFFIX
        try:
            with open(sidecar, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            text = None
        except OSError as e:
            raise ConfigError(f"cannot read sidecar {sidecar}: {e}") from None
        if text is not None:
            try:
                data = json.loads(text)
            except ValueError as e:
                raise ConfigError(f"sidecar {sidecar} is not valid JSON: {e}") from None
            if not isinstance(data, dict):
                raise ConfigError(f"sidecar {sidecar} must hold a JSON object")
            for name, raw in data.items():
                knobs[name] = convert_knob(name, raw, f"sidecar {sidecar}")
    knobs.update(cli_knobs)
    return knobs


class Log:
    """llama-server style stderr logger: ``M.SS.mmm.uuu L message``."""

    def __init__(self, prefix: bool = True, timestamps: bool = True) -> None:
        self.prefix = prefix
        self.timestamps = timestamps
        self.quiet = False

    def _emit(self, level: str, msg: str) -> None:
        head = ""
        if self.timestamps:
            t_us = int((time.monotonic() - START) * 1e6)
            head += "%d.%02d.%03d.%03d " % (
                t_us // 60_000_000, (t_us // 1_000_000) % 60, (t_us // 1000) % 1000, t_us % 1000
            )
        if self.prefix:
            head += level + " "
        try:
            sys.stderr.write(head + msg + "\n")
            sys.stderr.flush()
        except (OSError, ValueError):
            pass  # stderr closed: nobody is listening

    def info(self, msg: str) -> None:
        if not self.quiet:
            self._emit("I", msg)

    def warn(self, msg: str) -> None:
        if not self.quiet:
            self._emit("W", msg)

    def error(self, msg: str) -> None:
        self._emit("E", msg)  # fatal lines are printed even when silent


def _die(log: Log, code: int) -> None:
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os._exit(code)


def _model_load_failure(log: Log, model: str, code: int) -> None:
    log.error(f"llama_model_load: error loading model: fake crash_on_start for '{model}'")
    log.error("llama_model_load_from_file_impl: failed to load model")
    log.error(f"cmn  common_init_: failed to load model '{model}'")
    log.error(f"srv    load_model: failed to load model, '{model}'")
    log.info("srv    operator(): operator(): cleaning up before exit...")
    log.error("srv  llama_server: exiting due to model loading error")
    _die(log, code)


# --------------------------------------------------------------------------
# HTTP server (aiohttp is imported lazily so that early exits are instant)
# --------------------------------------------------------------------------

MONITORING_PATHS = {"/health", "/v1/health", "/metrics", "/slots", "/props"}
INFERENCE_PATHS = {
    "/v1/chat/completions", "/chat/completions", "/completion", "/completions",
    "/v1/completions", "/v1/embeddings", "/embeddings", "/embedding",
}
PUBLIC_PATHS = {"/health", "/v1/health", "/models", "/v1/models", "/api/tags", "/"}
EMBD_DIM = 8


def _reset(request) -> None:
    """Drop the request's connection with a TCP reset (SO_LINGER 0), before any byte of
    a response: what a crashing worker thread or a broken proxy in between looks like."""
    import socket
    import struct

    transport = request.transport
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    transport.abort()


def _err(code: int, message: str, typ: str) -> dict:
    return {"error": {"code": code, "message": message, "type": typ}}


def _rand_id(prefix: str) -> str:
    return prefix + os.urandom(16).hex()


def _token_piece(i: int) -> str:
    return f"tok{i}" if i == 0 else f" tok{i}"


def _text_of(content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") if isinstance(p, dict) else str(p) for p in content
        )
    return str(content)


def _apply_template(messages: list) -> str:
    out = []
    for m in messages:
        if isinstance(m, dict):
            out.append(f"<|im_start|>{m.get('role', 'user')}\n{_text_of(m.get('content'))}<|im_end|>\n")
    out.append("<|im_start|>assistant\n")
    return "".join(out)


def _prompt_len(prompt: object) -> int:
    if isinstance(prompt, str):
        return len(prompt.encode())
    if isinstance(prompt, list):
        if all(isinstance(x, int) for x in prompt):
            return len(prompt)
        return sum(_prompt_len(x) for x in prompt)
    return 0


def _embedding(text: str) -> list[float]:
    import hashlib

    digest = hashlib.sha256(text.encode()).digest()
    vec = [(b - 127.5) / 127.5 for b in digest[:EMBD_DIM]]
    norm = sum(v * v for v in vec) ** 0.5 or 1.0
    return [v / norm for v in vec]


class State:
    def __init__(
        self, opts: dict, knobs: dict, log: Log, argv: list[str], grandchild_pid: int | None = None
    ) -> None:
        import asyncio

        self.opts = opts
        self.knobs = knobs
        self.log = log
        self.argv = argv
        self.port = opts["port"]
        model = opts["model"] or ""
        self.model_path = model
        self.model_id = opts["alias"] or (os.path.basename(model) if model else "fake-model")
        self.n_ctx = opts["ctx_size"]
        self.n_slots = opts["parallel"]
        self.created = int(time.time())
        self.ready = False
        self.hanging = False
        self.shutting_down = False
        self.shutdown_event = asyncio.Event()
        self.streams_idle = asyncio.Event()
        self.streams_idle.set()
        self.slots = asyncio.Semaphore(self.n_slots)
        self.processing = 0
        self.deferred = 0
        self.task_id = 0
        self.requests: dict[str, int] = {}
        self.open_streams = 0
        self.cancelled_streams = 0
        self.cancelled_requests = 0
        self.completed_inference = 0
        self.received_inference = 0
        self.failed_inference = 0
        self.tokens_predicted_total = 0
        self.prompt_tokens_total = 0
        self.last_headers: dict | None = None
        self.last_request: dict | None = None
        self.headers_by_path: dict[str, dict] = {}
        self.hung_tasks: set = set()
        self.grandchild_pid = grandchild_pid
        self.connections = {
            "open": 0, "max_open": 0, "waiting": 0, "max_waiting": 0, "total": 0,
            "closed_by_client": 0, "closed_by_server": 0,
            # the last request path of each closed connection
            "closed_by_client_paths": [], "closed_by_server_paths": [],
        }

    # -- lifecycle ---------------------------------------------------------
    def request_shutdown(self) -> None:
        if not self.shutdown_event.is_set():
            self.shutting_down = True
            self.shutdown_event.set()

    async def load(self) -> None:
        import asyncio

        log, k = self.log, self.knobs
        model = self.model_path or "(none)"
        log.info("main: loading model")
        log.info(f"srv    load_model: loading model '{model}'")
        log.info(
            f"llama_model_loader: loaded meta data with 24 key-value pairs and 12 tensors "
            f"from {model} (version GGUF V3 (latest))"
        )
        deadline = START + float(k["load_secs"])
        interval = max(float(k["log_interval"]), 0.01)
        step = 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.sleep(min(interval, remaining))
            step += 1
            pct = min(99, int(100 * (1 - max(deadline - time.monotonic(), 0) / max(k["load_secs"], 1e-9))))
            log.info(f"load_tensors: loading model tensors, this can take a while... ({pct}%, step {step})")
        if k["crash_on_start"]:
            _model_load_failure(log, model, int(k["exit_code"]))
        log.info("load_tensors:   CPU_Mapped model buffer size =     1.23 MiB")
        log.info(f"llama_context: n_ctx         = {self.n_ctx}")
        log.info(
            f"srv    load_model: initializing, n_slots = {self.n_slots}, "
            f"n_ctx_slot = {self.n_ctx // self.n_slots}, kv_unified = 'false'"
        )
        log.info("srv  llama_server: model loaded")
        log.info("main: model loaded")
        host = self.opts["host"]
        log.quiet = False  # silent only covers the loading phase
        log.info(f"srv  llama_server: listening on http://{host}:{self.port}")
        log.info(f"main: server is listening on http://{host}:{self.port} - starting the main loop")
        log.info("srv  update_slots: all slots are idle")
        self.ready = True
        if k["hang"]:
            self.hanging = True

    def stats(self) -> dict:
        return {
            "pid": os.getpid(),
            "uptime": time.monotonic() - START,
            "port": self.port,
            "model": self.model_path,
            "model_id": self.model_id,
            "argv": self.argv,
            "knobs": self.knobs,
            "ready": self.ready,
            "hanging": self.hanging,
            "shutting_down": self.shutting_down,
            "requests": dict(self.requests),
            "requests_total": sum(self.requests.values()),
            "open_streams": self.open_streams,
            "cancelled_streams": self.cancelled_streams,
            "cancelled_requests": self.cancelled_requests,
            "completed_inference": self.completed_inference,
            "received_inference": self.received_inference,
            "failed_inference": self.failed_inference,
            "processing": self.processing,
            "deferred": self.deferred,
            "last_headers": self.last_headers,
            "last_request": self.last_request,
            "headers_by_path": self.headers_by_path,
            "grandchild_pid": self.grandchild_pid,
            "connections": json.loads(json.dumps(self.connections)),
        }

    # -- generation helpers --------------------------------------------------
    def n_predict(self, body: dict, keys: tuple[str, ...]) -> tuple[int, bool]:
        """Tokens to generate and whether the limit truncated the output."""
        full = max(int(self.knobs["tokens"]), 0)
        for key in keys:
            v = body.get(key)
            if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
                return min(full, v), v < full
        return full, False

    async def pace(self, t0: float, i: int) -> None:
        """Wait until token ``i`` is due (tps pacing); returns at once on shutdown."""
        import asyncio

        if self.shutting_down and self.knobs["term_waits_for_clients"]:
            await asyncio.Event().wait()  # until the client goes away (handler cancelled)
        tps = float(self.knobs["tps"])
        if tps <= 0 or self.shutting_down:
            await asyncio.sleep(0)
            return
        delay = t0 + (i + 1) / tps - time.monotonic()
        if delay <= 0:
            await asyncio.sleep(0)
            return
        try:
            await asyncio.wait_for(self.shutdown_event.wait(), delay)
        except TimeoutError:
            pass

    def timings(self, prompt_n: int, predicted_n: int, secs: float) -> dict:
        ms = max(secs * 1000.0, 0.001)
        return {
            "cache_n": 0,
            "prompt_n": prompt_n,
            "prompt_ms": 0.1,
            "prompt_per_token_ms": 0.1 / max(prompt_n, 1),
            "prompt_per_second": prompt_n / 0.0001,
            "predicted_n": predicted_n,
            "predicted_ms": ms,
            "predicted_per_token_ms": ms / max(predicted_n, 1),
            "predicted_per_second": predicted_n / (ms / 1000.0),
        }

    async def after_inference(self, request) -> None:
        """Account a completed inference request; crash/hang when due."""
        import asyncio

        self.completed_inference += 1
        k = self.knobs
        if k["hang_after"] > 0 and self.completed_inference >= k["hang_after"]:
            if not self.hanging:
                self.log.warn(f"fake: hanging after {self.completed_inference} inference requests")
            self.hanging = True
        if k["crash_after"] > 0 and self.completed_inference >= k["crash_after"]:
            # Let the finished response leave the process before dying.
            transport = request.transport
            deadline = time.monotonic() + 1.0
            while (
                transport is not None
                and not transport.is_closing()
                and transport.get_write_buffer_size() > 0
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.005)
            self.log.error(
                f"fake: simulated crash after {self.completed_inference} inference requests"
            )
            self.log.error("/llama.cpp/ggml/src/ggml.c:1234: GGML_ASSERT(fake crash) failed")
            _die(self.log, int(k["exit_code"]))


class _Slot:
    """Async context manager for one inference slot (queueing = 'deferred')."""

    def __init__(self, state: State, prompt_n: int) -> None:
        self.state = state
        self.prompt_n = prompt_n
        self.task = 0
        self.n_out = 0

    async def __aenter__(self):
        st = self.state
        st.deferred += 1
        try:
            await st.slots.acquire()
        finally:
            st.deferred -= 1
        st.processing += 1
        st.task_id += 1
        self.task = st.task_id
        st.log.info(f"slot launch_slot_: id  0 | task {self.task} | processing task, is_child = 0")
        return self

    async def __aexit__(self, *exc):
        st = self.state
        st.processing -= 1
        st.slots.release()
        st.prompt_tokens_total += self.prompt_n
        st.tokens_predicted_total += self.n_out
        st.log.info(
            f"slot      release: id  0 | task {self.task} | stop processing: "
            f"n_tokens = {self.prompt_n + self.n_out}, truncated = 0"
        )
        return False


def make_app(state: State):
    import asyncio

    from aiohttp import web

    class BadRequest(Exception):
        pass

    def dumps(obj: object) -> str:
        return json.dumps(obj, separators=(",", ":"))

    def jresp(data: object, status: int = 200):
        return web.json_response(data, status=status, dumps=dumps)

    def not_found():
        return jresp({"error": {"message": "File Not Found", "type": "not_found_error", "code": 404}}, 404)

    async def read_json(request) -> dict:
        raw = await request.read()
        try:
            body = json.loads(raw.decode("utf-8") if raw else "")
        except (ValueError, UnicodeDecodeError) as e:
            raise BadRequest(f"[json.exception.parse_error.101] parse error: {e}") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return body

    # -- middleware ---------------------------------------------------------
    @web.middleware
    async def middleware(request, handler):
        path = request.path
        if path.startswith("/fake/"):
            return await handler(request)
        state.requests[path] = state.requests.get(path, 0) + 1
        headers: dict[str, str] = {}
        for key, val in request.headers.items():
            lk = key.lower()
            headers[lk] = f"{headers[lk]}, {val}" if lk in headers else val
        state.headers_by_path[path] = headers
        if not (request.method == "GET" and path in MONITORING_PATHS):
            body: object = None
            if request.body_exists:
                raw = await request.read()
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = raw.decode("utf-8", "replace")
            state.last_headers = headers
            state.last_request = {
                "method": request.method,
                "path": path,
                "query": request.query_string,
                "headers": headers,
                "json": body,
            }
        api_key = state.opts["api_key"]
        if api_key and path not in PUBLIC_PATHS:
            auth = request.headers.get("Authorization", "")
            given = auth[7:] if auth.startswith("Bearer ") else request.headers.get("X-Api-Key")
            if given not in api_key.split(","):
                return jresp(_err(401, "Invalid API Key", "authentication_error"), 401)
        if not state.ready:
            return jresp(_err(503, "Loading model", "unavailable_error"), 503)
        if state.hanging:
            task = asyncio.current_task()
            state.hung_tasks.add(task)
            try:
                await asyncio.get_running_loop().create_future()  # never resolves
            finally:
                state.hung_tasks.discard(task)
        if path in INFERENCE_PATHS:
            state.received_inference += 1
            k = state.knobs
            after = k["inference_fails_after"]
            if k["inference_fails"] or (after > 0 and state.received_inference > after):
                state.failed_inference += 1
                if k["inference_reset"]:
                    _reset(request)
                    return web.Response(status=500)  # never sent: the connection is gone
                return jresp(_err(500, "fake: inference fails", "server_error"), 500)
        try:
            return await handler(request)
        except BadRequest as e:
            return jresp(_err(400, str(e), "invalid_request_error"), 400)
        except (web.HTTPNotFound, web.HTTPMethodNotAllowed):
            return not_found()

    async def on_prepare(request, response):
        response.headers["Server"] = "llama.cpp"

    # -- monitoring -----------------------------------------------------------
    async def health(request):
        return jresp({"status": "ok"})

    async def models(request):
        if state.knobs["models_delay"] > 0:
            # A slow /v1/models: the router fetches it right after /health says ready.
            import asyncio

            await asyncio.sleep(state.knobs["models_delay"])
        return jresp({
            "models": [{
                "name": state.model_id, "model": state.model_id, "modified_at": "",
                "size": "", "digest": "", "type": "model", "description": "",
                "tags": [""], "capabilities": ["completion"], "parameters": "",
                "details": {"parent_model": "", "format": "gguf", "family": "", "families": [""],
                            "parameter_size": "", "quantization_level": ""},
            }],
            "object": "list",
            "data": [{
                "id": state.model_id,
                "aliases": [state.model_id],
                "tags": [],
                "object": "model",
                "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                "created": state.created,
                "owned_by": "llamacpp",
                "meta": {
                    "vocab_type": 1, "n_vocab": 263, "n_ctx": state.n_ctx, "n_ctx_train": 2048,
                    "n_embd": 64, "n_params": 123, "size": 456, "ftype": "fake",
                },
            }],
        })

    async def props(request):
        return jresp({
            "default_generation_settings": {
                "params": {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
                           "n_predict": -1, "max_tokens": -1, "seed": 4294967295,
                           "stream": False, "samplers": ["top_k", "top_p", "min_p", "temperature"]},
                "n_ctx": state.n_ctx,
            },
            "total_slots": state.n_slots,
            "model_alias": state.model_id,
            "model_path": state.model_path,
            "modalities": {"vision": bool(state.opts["mmproj"]), "video": False, "audio": False},
            "endpoint_slots": True,
            "endpoint_props": False,
            "endpoint_metrics": bool(state.opts["metrics"]),
            "chat_template": CHAT_TEMPLATE,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "build_info": "fake",
            "is_sleeping": False,
        })

    async def slots(request):
        return jresp([
            {"id": i, "n_ctx": state.n_ctx // state.n_slots, "speculative": False,
             "is_processing": i < state.processing}
            for i in range(state.n_slots)
        ])

    async def metrics(request):
        def m(name: str, typ: str, help_: str, value: object) -> str:
            return f"# HELP llamacpp:{name} {help_}\n# TYPE llamacpp:{name} {typ}\nllamacpp:{name} {value}\n"

        kv_tokens = 16 * state.processing
        text = "".join([
            m("prompt_tokens_total", "counter", "Number of prompt tokens processed.", state.prompt_tokens_total),
            m("tokens_predicted_total", "counter", "Number of generation tokens processed.", state.tokens_predicted_total),
            m("n_decode_total", "counter", "Total number of llama_decode() calls", state.tokens_predicted_total),
            m("prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s.", 0),
            m("predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s.", 0),
            m("kv_cache_usage_ratio", "gauge", "KV-cache usage. 1 means 100 percent usage.", round(kv_tokens / max(state.n_ctx, 1), 6)),
            m("kv_cache_tokens", "gauge", "KV-cache tokens.", kv_tokens),
            m("requests_processing", "gauge", "Number of requests processing.", state.processing),
            m("requests_deferred", "gauge", "Number of requests deferred.", state.deferred),
        ])
        return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4"})

    async def index(request):
        return web.Response(text="<html><body>fake llama-server</body></html>", content_type="text/html")

    async def fake_stats(request):
        return jresp(state.stats())

    # -- inference plumbing ------------------------------------------------------
    async def write_sse(resp, obj: object) -> None:
        data = obj if isinstance(obj, str) else dumps(obj)
        await resp.write(f"data: {data}\n\n".encode())

    async def send_final(request, payload: object):
        # Send the whole response before accounting, so crash_after dies
        # only after the client has its answer.
        resp = jresp(payload)
        await resp.prepare(request)
        await resp.write_eof()
        await state.after_inference(request)
        return resp

    async def stream(request, slot: _Slot, n: int, head, make_chunk, make_final, done: bool):
        resp = web.StreamResponse(
            status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await resp.prepare(request)
        state.open_streams += 1
        state.streams_idle.clear()
        try:
            if head is not None:
                await write_sse(resp, head)
            t0 = time.monotonic()
            for i in range(n):
                await state.pace(t0, i)
                slot.n_out = i + 1
                await write_sse(resp, make_chunk(i))
            await write_sse(resp, make_final(time.monotonic() - t0))
            if done:
                await write_sse(resp, "[DONE]")
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            state.cancelled_streams += 1
            state.log.info(
                f"srv  cancel_tasks: client disconnected, cancelling stream after {slot.n_out}/{n} tokens"
            )
            raise
        finally:
            state.open_streams -= 1
            if state.open_streams == 0:
                state.streams_idle.set()
        return resp

    async def generate(slot: _Slot, n: int) -> float:
        """Non-streaming generation, paced like streaming; returns its duration."""
        t0 = time.monotonic()
        try:
            for i in range(n):
                await state.pace(t0, i)
                slot.n_out = i + 1
        except asyncio.CancelledError:
            state.cancelled_requests += 1
            state.log.info("srv  cancel_tasks: client disconnected, cancelling request")
            raise
        return time.monotonic() - t0

    def text_of(n: int) -> str:
        return "".join(_token_piece(i) for i in range(n))

    # -- inference endpoints -------------------------------------------------------
    async def chat(request):
        body = await read_json(request)
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise BadRequest("'messages' is required and must be an array")
        model = body.get("model") or state.model_id
        prompt_n = max(_prompt_len(_apply_template(messages)), 1)
        n, truncated = state.n_predict(body, ("max_completion_tokens", "max_tokens", "n_predict"))
        finish = "length" if truncated else "stop"
        cid = _rand_id("chatcmpl-")
        created = int(time.time())
        usage = {"completion_tokens": n, "prompt_tokens": prompt_n, "total_tokens": n + prompt_n,
                 "prompt_tokens_details": {"cached_tokens": 0}}
        base = {"created": created, "id": cid, "model": model,
                "system_fingerprint": "b0-fake", "object": "chat.completion.chunk"}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(i: int) -> dict:
            return {"choices": [{"finish_reason": None, "index": 0,
                                 "delta": {"content": _token_piece(i)}}], **base}

        def final(secs: float) -> dict:
            obj = {"choices": [{"finish_reason": finish, "index": 0, "delta": {}}], **base,
                   "timings": state.timings(prompt_n, n, secs)}
            if include_usage:
                obj["usage"] = usage
            return obj

        async with _Slot(state, prompt_n) as slot:
            if body.get("stream"):
                # Like llama-server: a role-only chunk (content null) comes first.
                head = {"choices": [{"finish_reason": None, "index": 0,
                                     "delta": {"role": "assistant", "content": None}}], **base}
                resp = await stream(request, slot, n, head, chunk, final, True)
            else:
                secs = await generate(slot, n)
                resp = None
        if resp is not None:
            await state.after_inference(request)
            return resp
        return await send_final(request, {
            "choices": [{"finish_reason": finish, "index": 0,
                         "message": {"role": "assistant", "content": text_of(n)}}],
            "created": created, "model": model, "system_fingerprint": "b0-fake",
            "object": "chat.completion", "usage": usage, "id": cid,
            "timings": state.timings(prompt_n, n, secs),
        })

    async def oai_completion(request):
        body = await read_json(request)
        if "prompt" not in body:
            raise BadRequest("'prompt' is required")
        model = body.get("model") or state.model_id
        prompt_n = max(_prompt_len(body["prompt"]), 1)
        n, truncated = state.n_predict(body, ("max_tokens", "n_predict"))
        finish = "length" if truncated else "stop"
        cid = _rand_id("cmpl-")
        created = int(time.time())
        usage = {"completion_tokens": n, "prompt_tokens": prompt_n, "total_tokens": n + prompt_n,
                 "prompt_tokens_details": {"cached_tokens": 0}}
        base = {"created": created, "model": model, "system_fingerprint": "b0-fake",
                "object": "text_completion", "id": cid}

        def chunk(i: int) -> dict:
            return {"choices": [{"text": _token_piece(i), "index": 0, "logprobs": None,
                                 "finish_reason": None}], **base}

        def final(secs: float) -> dict:
            return {"choices": [{"text": "", "index": 0, "logprobs": None, "finish_reason": finish}],
                    **base, "usage": usage, "timings": state.timings(prompt_n, n, secs)}

        async with _Slot(state, prompt_n) as slot:
            if body.get("stream"):
                resp = await stream(request, slot, n, None, chunk, final, True)
            else:
                secs = await generate(slot, n)
                resp = None
        if resp is not None:
            await state.after_inference(request)
            return resp
        return await send_final(request, {
            "choices": [{"text": text_of(n), "index": 0, "logprobs": None, "finish_reason": finish}],
            **base, "usage": usage, "timings": state.timings(prompt_n, n, secs),
        })

    async def native_completion(request):
        body = await read_json(request)
        prompt = body.get("prompt", body.get("content"))
        if prompt is None:
            raise BadRequest("'prompt' is required")
        model = body.get("model") or state.model_id
        prompt_n = max(_prompt_len(prompt), 1)
        n, truncated = state.n_predict(body, ("n_predict", "max_tokens"))
        stop_type = "limit" if truncated else "eos"

        def full(content: str, secs: float, stream_flag: bool) -> dict:
            return {
                "index": 0, "content": content, "tokens": [], "id_slot": 0, "stop": True,
                "model": model, "tokens_predicted": n, "tokens_evaluated": prompt_n,
                "generation_settings": {"n_predict": n, "stream": stream_flag, "n_ctx": state.n_ctx},
                "prompt": prompt if isinstance(prompt, str) else "", "has_new_line": False,
                "truncated": False, "stop_type": stop_type, "stopping_word": "",
                "tokens_cached": prompt_n + n, "timings": state.timings(prompt_n, n, secs),
            }

        def chunk(i: int) -> dict:
            return {"index": 0, "content": _token_piece(i), "tokens": [1000 + i], "stop": False,
                    "id_slot": -1, "tokens_predicted": i + 1, "tokens_evaluated": prompt_n}

        async with _Slot(state, prompt_n) as slot:
            if body.get("stream"):
                # native streaming: no [DONE] sentinel, last event has stop=true
                resp = await stream(request, slot, n, None, chunk,
                                    lambda secs: full("", secs, True), False)
            else:
                secs = await generate(slot, n)
                resp = None
        if resp is not None:
            await state.after_inference(request)
            return resp
        return await send_final(request, full(text_of(n), secs, False))

    def embedding_inputs(body: dict) -> list[str]:
        inp = body.get("input", body.get("content"))
        if inp is None:
            raise BadRequest("'input' or 'content' is required")
        items = inp if isinstance(inp, list) and not all(isinstance(x, int) for x in inp) else [inp]
        return [x if isinstance(x, str) else dumps(x) for x in items]

    async def oai_embeddings(request):
        body = await read_json(request)
        texts = embedding_inputs(body)
        prompt_n = sum(max(_prompt_len(t), 1) for t in texts)
        async with _Slot(state, prompt_n):
            data = [{"embedding": _embedding(t), "index": i, "object": "embedding"}
                    for i, t in enumerate(texts)]
        return await send_final(request, {
            "model": body.get("model") or state.model_id, "object": "list",
            "usage": {"prompt_tokens": prompt_n, "total_tokens": prompt_n}, "data": data,
        })

    async def native_embedding(request):
        body = await read_json(request)
        texts = embedding_inputs(body)
        prompt_n = sum(max(_prompt_len(t), 1) for t in texts)
        async with _Slot(state, prompt_n):
            data = [{"index": i, "embedding": [_embedding(t)]} for i, t in enumerate(texts)]
        return await send_final(request, data)

    # -- utility endpoints ---------------------------------------------------------
    async def tokenize(request):
        body = await read_json(request)
        content = _text_of(body.get("content", ""))
        ids = list(content.encode())
        if body.get("with_pieces"):
            return jresp({"tokens": [{"id": b, "piece": chr(b) if b < 128 else [b]} for b in ids]})
        return jresp({"tokens": ids})

    async def detokenize(request):
        body = await read_json(request)
        toks = body.get("tokens") or []
        if not isinstance(toks, list):
            raise BadRequest("'tokens' must be an array")
        raw = bytes(t for t in toks if isinstance(t, int) and 0 <= t < 256)
        return jresp({"content": raw.decode("utf-8", "replace")})

    async def apply_template(request):
        body = await read_json(request)
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise BadRequest("'messages' is required and must be an array")
        return jresp({"prompt": _apply_template(messages)})

    async def lora_get(request):
        return jresp([])

    async def transcriptions(request):
        # Multipart upload, as OpenAI's audio API: echo what arrived so tests can check the
        # router forwarded the original body untouched.
        import email.parser  # noqa: PLC0415  (kept off the fake's start-up path)
        import email.policy  # noqa: PLC0415

        # The recording middleware has already read the body, so parse the cached bytes.
        raw = await request.read()
        head = f"Content-Type: {request.headers.get('Content-Type', '')}\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + raw)
        fields = {}
        for part in message.iter_parts():
            fields[part.get_param("name", header="content-disposition")] = part.get_payload(decode=True)
        model = fields.get("model")
        return jresp({
            "text": "fake transcript",
            "model": model.decode() if model is not None else None,
            "file_bytes": len(fields.get("file") or b""),
        })

    async def lora_post(request):
        await read_json(request)
        return jresp({"success": True})

    async def post_props(request):
        return jresp(_err(403, "This server does not support changing global properties. "
                               "Start it with `--props`", "permission_error"), 403)

    app = web.Application(middlewares=[middleware], client_max_size=64 * 1024 * 1024)
    app.on_response_prepare.append(on_prepare)
    r = app.router
    r.add_get("/fake/stats", fake_stats)
    r.add_get("/", index)
    for p in ("/health", "/v1/health"):
        r.add_get(p, health)
    for p in ("/models", "/v1/models", "/api/tags"):
        r.add_get(p, models)
    r.add_get("/props", props)
    r.add_post("/props", post_props)
    r.add_get("/slots", slots)
    r.add_get("/metrics", metrics)
    for p in ("/v1/chat/completions", "/chat/completions"):
        r.add_post(p, chat)
    for p in ("/v1/completions", "/completions"):
        r.add_post(p, oai_completion)
    r.add_post("/completion", native_completion)
    for p in ("/v1/embeddings", "/embeddings"):
        r.add_post(p, oai_embeddings)
    r.add_post("/embedding", native_embedding)
    r.add_post("/tokenize", tokenize)
    r.add_post("/detokenize", detokenize)
    r.add_post("/apply-template", apply_template)
    r.add_get("/lora-adapters", lora_get)
    for p in ("/v1/audio/transcriptions", "/audio/transcriptions"):
        r.add_post(p, transcriptions)
    r.add_post("/lora-adapters", lora_post)
    return app


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{% endfor %}<|im_start|>assistant\n"
)


class _Gate:
    """Protocol factory in front of aiohttp's: counts connections and, with
    ``http_threads``, serves only that many at once (the rest wait unread)."""

    def __init__(self, factory, limit: int, stats: dict) -> None:
        self.factory = factory
        self.limit = limit
        self.stats = stats
        self.serving = 0
        self.queue: list = []

    def __call__(self):
        return _GatedConnection(self)

    def start_next(self) -> None:
        while self.queue and (not self.limit or self.serving < self.limit):
            conn = self.queue.pop(0)
            self.stats["waiting"] -= 1
            if not conn.transport.is_closing():
                conn.start()


class _GatedConnection:
    def __init__(self, gate: _Gate) -> None:
        self.gate = gate
        self.inner = None
        self.transport = None
        self.peer_closed = False
        self.last_path = ""

    def connection_made(self, transport) -> None:
        self.transport = transport
        st = self.gate.stats
        st["open"] += 1
        st["total"] += 1
        st["max_open"] = max(st["max_open"], st["open"])
        if self.gate.limit and self.gate.serving >= self.gate.limit:
            transport.pause_reading()
            self.gate.queue.append(self)
            st["waiting"] += 1
            st["max_waiting"] = max(st["max_waiting"], st["waiting"])
        else:
            self.start()

    def start(self) -> None:
        self.gate.serving += 1
        self.inner = self.gate.factory()
        self.inner.connection_made(self.transport)
        self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if data[:4] in (b"GET ", b"POST"):
            self.last_path = data.split(b" ", 2)[1].split(b"?")[0].decode("latin-1")
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self):
        self.peer_closed = True
        return self.inner.eof_received() if self.inner is not None else None

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc) -> None:
        st = self.gate.stats
        st["open"] -= 1
        # A reset counts as the client's doing; a clean close without the client's FIN
        # first is the server's (idle keep-alive expiry).
        if self.peer_closed or exc is not None:
            st["closed_by_client"] += 1
            st["closed_by_client_paths"].append(self.last_path)
        else:
            st["closed_by_server"] += 1
            st["closed_by_server_paths"].append(self.last_path)
        if self.inner is None:
            if self in self.gate.queue:
                self.gate.queue.remove(self)
                st["waiting"] -= 1
            return
        self.gate.serving -= 1
        self.inner.connection_lost(exc)
        self.gate.start_next()


async def serve(
    opts: dict, knobs: dict, log: Log, argv: list[str], grandchild_pid: int | None = None
) -> int:
    import asyncio

    from aiohttp import web

    loop = asyncio.get_running_loop()
    state = State(opts, knobs, log, argv, grandchild_pid)
    if not knobs["ignore_sigterm"]:
        loop.add_signal_handler(signal.SIGTERM, state.request_shutdown)
    loop.add_signal_handler(signal.SIGINT, state.request_shutdown)
    if _early_signals:  # arrived during start-up, before the loop handlers
        state.request_shutdown()
    app = make_app(state)
    extra = {"keepalive_timeout": knobs["keepalive_secs"]} if knobs["keepalive_secs"] > 0 else {}
    runner = web.AppRunner(
        app, handle_signals=False, access_log=None, handler_cancellation=True, shutdown_timeout=1.0,
        **extra,
    )
    await runner.setup()
    host, port = opts["host"], opts["port"]
    log.info("main: binding port with default address family")
    gate = _Gate(runner.server, knobs["http_threads"], state.connections)
    try:
        server = await loop.create_server(gate, host, port, reuse_address=True)
    except OSError as e:
        log.error(f"srv         start: couldn't bind HTTP server socket, hostname: {host}, port: {port} ({e})")
        log.info("srv    operator(): operator(): cleaning up before exit...")
        log.error("srv  llama_server: exiting due to HTTP server error")
        await runner.cleanup()
        return 1
    if port == 0 and server.sockets:
        state.port = server.sockets[0].getsockname()[1]
    log.info(f"main: HTTP server is listening, hostname: {host}, port: {state.port}, http threads: 1")

    load_task = asyncio.create_task(state.load())
    await state.shutdown_event.wait()

    log.quiet = False
    log.info("srv    operator(): operator(): cleaning up before exit...")
    load_task.cancel()
    # In-flight streams stop pacing and finish at once; give them a moment (or, like
    # llama-server, wait for their clients to close them).
    try:
        await asyncio.wait_for(state.streams_idle.wait(), None if knobs["term_waits_for_clients"] else 2.0)
    except TimeoutError:
        log.warn("fake: streams still open at shutdown, dropping them")
    for task in list(state.hung_tasks):
        task.cancel()
    server.close()
    await runner.cleanup()
    return 0


_early_signals: list[int] = []


def _early_signal(signum: int, frame: object) -> None:
    _early_signals.append(signum)


def fake_download() -> int:
    """llama-server's download mode (POST /models through a router) with no hub to reach:
    the downloader's words for it on stderr, then the result llama.cpp reports when it
    found nothing (finished), and the wait for the router's exit command."""
    sys.stderr.write("get_repo_commit: error: HTTPLIB failed: fake llama-server has no hub\n")
    sys.stderr.flush()
    report = {"state": "downloading", "payload": {"result": "download_finished"}}
    sys.stdout.write("cmd_child_to_router:state:" + json.dumps(report) + "\n")
    sys.stdout.flush()
    sys.stdin.readline()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--version" in argv:
        # As llama-server: the version on stderr, exit 0, nothing loaded.
        sys.stderr.write(f"version: {FAKE_VERSION}\nbuilt with python for fake-llama-server\n")
        return 0
    if "--list-devices" in argv:
        # As llama-server prints them. A fake computes nowhere; it says it has one device
        # unless FAKE_BUILD_DEVICES names others ("" = a CPU-only build, so CPU turns apply).
        names = os.environ.get("FAKE_BUILD_DEVICES", "FAKE0").split(",")
        sys.stdout.write("Available devices:\n")
        listed = [n for n in names if n]
        for name in listed:
            sys.stdout.write(f"  {name}: fake device (0 MiB, 0 MiB free)\n")
        if not listed:
            sys.stdout.write("  (none)\n")
        return 0
    if os.environ.get("LLAMA_SERVER_ROUTER_PORT") and os.environ.get("LLAMA_SERVER_CHILD_MODE") == "download":
        return fake_download()
    try:
        opts, cli_knobs = parse_args(argv)
        knobs = load_knobs(opts, cli_knobs)
    except ConfigError as e:
        sys.stderr.write(f"fake-llama-server: error: {e}\n")
        sys.stderr.flush()
        return 2
    # From here on SIGTERM never kills the process with the default action:
    # it is ignored (knob) or remembered until the event loop handles it.
    if knobs["ignore_sigterm"]:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        while signal.SIGTERM in _early_signals:
            _early_signals.remove(signal.SIGTERM)
    else:
        signal.signal(signal.SIGTERM, _early_signal)
    signal.signal(signal.SIGINT, _early_signal)

    log = Log(prefix=opts["log_prefix"], timestamps=opts["log_timestamps"])
    log.quiet = bool(knobs["silent"])
    model = opts["model"] or "(none)"
    log.info("srv  llama_server: initializing ...")
    log.info("build: 0 (fake) with python for fake-llama-server")
    log.info(f"system info: n_threads = 1, n_threads_batch = 1, total_threads = {os.cpu_count()}")

    if knobs["crash_on_start"] and float(knobs["load_secs"]) <= 0:
        log.info(f"srv    load_model: loading model '{model}'")
        _model_load_failure(log, model, int(knobs["exit_code"]))
    if knobs["bind_fail"]:
        log.info("main: binding port with default address family")
        log.error(
            f"srv         start: couldn't bind HTTP server socket, "
            f"hostname: {opts['host']}, port: {opts['port']}"
        )
        log.info("srv    operator(): operator(): cleaning up before exit...")
        log.error("srv  llama_server: exiting due to HTTP server error")
        _die(log, 1)

    grandchild = None
    if knobs["spawn_grandchild"]:
        import subprocess

        grandchild = subprocess.Popen(
            ["sleep", "300"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        log.info(f"fake: spawned grandchild pid {grandchild.pid} (same process group)")

    import asyncio

    code = asyncio.run(serve(opts, knobs, log, argv, grandchild.pid if grandchild else None))
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    return code


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _early_signal)  # as early as possible, see main()
    signal.signal(signal.SIGINT, _early_signal)
    # The fake never speaks TLS: skip importing ssl (and aiohttp building its
    # default SSL contexts), which is a large part of aiohttp's import time.
    sys.modules.setdefault("ssl", None)  # type: ignore[arg-type]
    sys.exit(main())
