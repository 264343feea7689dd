"""The command line checked as llama-server checks it: unknown tokens from the flag table,
values by the binary itself (`ARGS --version`), and what build_config makes of -m mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamarouter.cli import build_config, check_with_server, flag_tables
from llamarouter.settings.declared import OWN_KEYS as _EXTRA_KEYS
from llamarouter.errors import CommandLineRejected, ConfigError, LlamaRouterError
from llamarouter.settings.childargs import ChildArgs
from llamarouter.settings.flags import first_invalid_argument, lacks_value, split_own
from llamarouter.settings.probe import parse_version, probe_server

CLI_TABLE = flag_tables()[0]


@pytest.mark.parametrize(
    ("argv", "bad"),
    [
        (["--models-dir", "m", "-c", "512"], None),
        (["--models-dirr", "m"], "--models-dirr"),
        (["--bogus-flag", "3"], "--bogus-flag"),
        (["-c", "512", "positional"], "positional"),
        (["--ctx-size=512"], "--ctx-size=512"),  # llama-server has no --flag=value form
        (["--ctx_size", "512"], None),  # "_" reads as "-" in long options, as upstream
        (["--bogus_flag"], "--bogus-flag"),  # named as upstream names it: normalised
        (["--seed", "-1", "-r", "--stop"], None),  # values are taken whatever they look like
        (["--max-queue=5", "--ttl", "3"], None),  # our own options may use --flag=value
        (["--jinja=true"], "--jinja=true"),
        (["-c"], None),  # a missing value is the binary's to report, with its usage text
    ],
)
def test_first_invalid_argument(argv: list[str], bad: str | None) -> None:
    assert first_invalid_argument(argv, CLI_TABLE, _EXTRA_KEYS) == bad


def test_split_own_keeps_upstream_tokens_in_order() -> None:
    argv = ["-c", "512", "--max-queue", "3", "--models-dir", "m", "--ttl=9", "--jinja", "--server-bin", "/b"]
    upstream, ours = split_own(argv, CLI_TABLE, _EXTRA_KEYS)
    assert upstream == ["-c", "512", "--models-dir", "m", "--jinja"]
    assert ours == ["--max-queue", "3", "--ttl=9", "--server-bin", "/b"]


@pytest.mark.parametrize(
    ("argv", "lacks"),
    [(["-c"], True), (["-c", "1"], False), (["--jinja"], False), ([], False),
     (["--control-vector-layer-range", "1"], True)],
)
def test_lacks_value(argv: list[str], lacks: bool) -> None:
    assert lacks_value(argv, CLI_TABLE) is lacks


def test_parse_version() -> None:
    out = "some line\nversion: 0.6.0-dev (build 0, commit unknown)\nbuilt with GNU 12.2.0 for Linux x86_64\n"
    build = parse_version(out)
    assert build is not None
    assert (build.version, build.build_info) == ("0.6.0-dev (build 0, commit unknown)", "b0-unknown")
    assert parse_version("version: 7 (build 8123, commit 1a2b3c4)\n").build_info == "b8123-1a2b3c4"  # type: ignore[union-attr]
    assert parse_version("no version here") is None


def script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "llama-server"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return str(path)


def test_probe_passes_args_then_version(tmp_path: Path) -> None:
    record = tmp_path / "argv"
    binary = script(tmp_path, f'echo "$@" > {record}\necho "version: 1.0 (build 42, commit abc)" >&2\n')
    assert probe_server(binary, ["-c", "512"], {}, 10).build_info == "b42-abc"
    assert record.read_text().split() == ["-c", "512", "--version"]
    # The last option lacks its value: run without --version, so it is not taken as one.
    with pytest.raises(CommandLineRejected):
        probe_server(binary, ["-c"], {}, 10, complete=False)
    assert record.read_text().split() == ["-c"]


def test_probe_reports_the_binarys_words_and_code(tmp_path: Path) -> None:
    binary = script(tmp_path, 'echo "error while handling argument \\"-c\\": stoi" >&2\nexit 3\n')
    with pytest.raises(CommandLineRejected) as info:
        probe_server(binary, ["-c", "x"], {}, 10)
    assert info.value.message == 'error while handling argument "-c": stoi'
    assert info.value.exit_code == 3


def test_probe_is_bounded(tmp_path: Path) -> None:
    binary = script(tmp_path, "exec sleep 30\n")
    with pytest.raises(ConfigError, match="did not answer within 0.2s"):
        probe_server(binary, [], {}, 0.2)
    with pytest.raises(ConfigError, match="no version line"):
        probe_server(script(tmp_path, "echo hello\n"), [], {}, 10)


def test_check_with_server_leaves_our_options_out(tmp_path: Path) -> None:
    record = tmp_path / "argv"
    binary = script(tmp_path, f'echo "$@" > {record}\necho "version: x (build 1, commit c)"\n')
    build = check_with_server(["--max-queue", "2", "-c", "64", "--server-bin", binary], {"PATH": "/nowhere"})
    assert build.build_info == "b1-c"
    assert record.read_text().split() == ["-c", "64", "--version"]
    with pytest.raises(ConfigError, match="--max-queue expects a value"):
        check_with_server(["--server-bin", binary, "--max-queue"], {"PATH": "/nowhere"})


def test_single_model_aliases_tags_and_no_fake_timing(tmp_path: Path) -> None:
    binary = script(tmp_path, "exit 0\n")
    env = {"PATH": "/nowhere", "LLAMA_SERVER_DEBUG_FAKE_TIMING": "1"}
    config, _, table = build_config(
        ["-m", "/m/x.gguf", "--alias", "b, a,c,,a", "--tags", "t2,t1", "--server-bin", binary], env)
    spec = config.single_model
    assert spec is not None
    assert (spec.name, spec.aliases, spec.tags) == ("a", ("b", "c"), ("t1", "t2"))
    assert not config.fake_timing  # upstream's router-mode hook never slows one model
    argv = ChildArgs(config, table).argv(spec, 1234)
    assert argv[argv.index("--alias") + 1] == "b, a,c,,a"  # as given: the child reads it alike
    assert argv[argv.index("--tags") + 1] == "t2,t1"  # passed on as given
    plain, _, table = build_config(["-m", "/m/x.gguf", "--server-bin", binary], env)
    assert plain.single_model is not None and plain.single_model.name == "x"
    assert "--alias" not in ChildArgs(plain, table).argv(plain.single_model, 1234)  # names itself
    router, _, _ = build_config(["--models-dir", str(tmp_path), "--server-bin", binary], env)
    assert router.fake_timing


def test_hosts_and_ui(tmp_path: Path) -> None:
    binary = script(tmp_path, "exit 0\n")
    config, _, _ = build_config(["--models-dir", str(tmp_path), "--host", "127.0.0.1, ::1,/run/x.sock",
                                 "--no-ui", "--server-bin", binary], {"PATH": "/nowhere"})
    assert config.hosts == ("127.0.0.1", "::1", "/run/x.sock")
    assert config.webui is False and config.reuse_port is False
    config, _, _ = build_config(["--models-dir", str(tmp_path), "--reuse-port", "--server-bin", binary],
                                {"PATH": "/nowhere"})
    assert config.reuse_port is True
    with pytest.raises(ConfigError, match="--port 0 is not supported"):
        build_config(["--models-dir", str(tmp_path), "--host", "127.0.0.1,::1", "--port", "0",
                      "--server-bin", binary], {"PATH": "/nowhere"})


def test_static_path(tmp_path: Path) -> None:
    binary = script(tmp_path, "exit 0\n")
    args = ["--models-dir", str(tmp_path), "--server-bin", binary]
    config, _, _ = build_config([*args, "--path", str(tmp_path)], {"PATH": "/nowhere"})
    assert config.static_path == tmp_path
    with pytest.raises(LlamaRouterError, match="static assets path not found") as info:
        build_config([*args, "--path", str(tmp_path / "none")], {"PATH": "/nowhere"})
    assert not isinstance(info.value, ConfigError)  # exit code 1, as llama-server
    single, _, _ = build_config(["-m", "/m/x.gguf", "--server-bin", binary, "--path", "/none"], {"PATH": "/nowhere"})
    assert single.static_path is None  # the child serves it
