"""Command line: llama-server's own, plus llamarouter's settings. The only sys.exit.

`llamarouter --models-dir ./models --models-max 4 -c 8192 -ngl 99` behaves like
`llama-server` with the same arguments: router flags are consumed, every other flag is
passed to each child. `llamarouter dev ...` holds developer tools (model generator).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from . import __version__, lean  # noqa: F401  # lean for its effect: the first import of aiohttp
from .core.downloads import fetch_remote_preset, preset_path
from .core.launcher import OsLauncher
from .core.memory import parse_bytes
from .errors import CommandLineRejected, ConfigError, LlamaRouterError
from .sdnotify import Notifier
from .server import exit_within, run, serve
from .settings import build
from .settings.build import K_HF, find_server_bin, flag_tables
from .settings.config import ModelSpec, RouterConfig, Timeouts
from .settings.declared import OWN_KEYS, SETTINGS
from .settings.discovery import Discovery, cache_dir_from_env
from .settings.flags import (
    FlagTable,
    env_names,
    first_invalid_argument,
    first_invalid_index,
    is_truthy,
    lacks_value,
    split_argv,
    split_own,
)
from .settings.probe import ServerBuild, list_devices, probe_server

# SETTINGS, find_server_bin and flag_tables are re-exported: tests read them here.
__all__ = ["SETTINGS", "build_config", "check_with_server", "find_server_bin", "flag_tables", "main"]

log = logging.getLogger("llamarouter")


def build_config(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[RouterConfig, Discovery, FlagTable]:
    """settings/build.py's build, with the memory manager's size parser (settings do not
    import core)."""
    return build.build_config(argv, environ, parse_bytes)


def _remote_preset(config: RouterConfig) -> Path | None:
    """`-hf REPO` whose repo holds a `preset.ini`: that file, fetched by the binary (see
    downloads.fetch_remote_preset), or with --offline the cached one; None for a model
    repo, `-m` or router mode."""
    single = config.single_model
    repo = dict(single.options).get(K_HF) if single is not None else None
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
    hf = cli_table.by_key(K_HF)
    assert hf is not None
    rest = split_argv(list(args), cli_table).without({K_HF}).to_argv()
    env = {k: v for k, v in environ.items() if k not in env_names(hf)}
    return [*rest, "--models-preset", str(preset)], env


def check_with_server(args: Sequence[str], environ: Mapping[str, str]) -> ServerBuild:
    """Let the llama-server binary parse the command line (less our own options) and its
    environment as a real start would: a bad value is refused at startup with its own
    message and exit code, instead of failing every model on first use. Also names the
    build."""
    cli_table, _ = flag_tables()
    upstream, ours = split_own(list(args), cli_table, OWN_KEYS)
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
    at = first_invalid_index(args, cli_table, OWN_KEYS)
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
        _echo(f"error: invalid argument: {first_invalid_argument(args, cli_table, OWN_KEYS)}", err=True)
        sys.exit(1)
    try:
        build = check_with_server(args, environ)
        config, discovery, table = build_config(args, environ)
        preset = _remote_preset(config)
        if preset is not None:
            # llama-server -hf on a preset repo runs as a router with the preset's models.
            args, environ = _with_preset(args, environ, preset)
            config, discovery, table = build_config(args, environ)
        # CPU turns need to know whether children compute on the CPU: ask the build once.
        devices = None if config.limits.cpu_budget == "0" else list_devices(
            config.server_bin, environ, config.timeouts.version_probe,
        )
        config = dataclasses.replace(config, build_info=build.build_info, server_devices=devices)
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

