"""The simulated NVML (llamarouter/devtools/nvmlsim/pynvml.py), as a process sees it: imported
as `pynvml` from PYTHONPATH, with stand-in "llama-server" processes whose command lines and
CUDA_VISIBLE_DEVICES say which devices they were given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamarouter.devtools.nvmlsim import SIM_DIR, sim_env

MIB = 1024**2
G = 1024**3

# Reports what the router's probe and pynvml see, from a process of its own.
PROBE = textwrap.dedent("""
    import json, sys
    import pynvml
    out = {"file": pynvml.__file__}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        print(json.dumps({"file": pynvml.__file__, "init_error": str(exc), "value": exc.value}))
        sys.exit(0)
    n = pynvml.nvmlDeviceGetCount()
    out["devices"] = []
    for i in range(n):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        procs = {p.pid: p.usedGpuMemory for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h)}
        out["devices"].append({"name": pynvml.nvmlDeviceGetName(h), "total": mem.total, "free": mem.free,
                               "used": mem.used, "procs": procs})
    try:
        pynvml.nvmlDeviceGetHandleByIndex(n)
    except pynvml.NVMLError as exc:
        out["bad_index"] = exc.value
    from llamarouter.core.memory import DeviceProbe, MemoryManager
    probe = DeviceProbe()
    out["probe_gpu"] = probe.gpu
    out["probe_devices"] = [d.__dict__ for d in probe.devices()]
    out["probe_pids"] = {pid: probe.process_bytes(int(pid)) for pid in sys.argv[1:]}
    m = MemoryManager.from_setting("auto", 1024**3, 1.0, 0.1, probe)
    out["budget"] = m.budget
    out["per_device"] = [(b.index, b.total, b.margin) for b in m.devices]
    pynvml.nvmlShutdown()
    print(json.dumps(out))
""")


def run_probe(env: dict[str, str], *pids: int) -> dict[str, object]:
    repo = Path(__file__).resolve().parents[2]
    env = {**env, "PYTHONPATH": f"{env['PYTHONPATH']}:{repo}"} if "PYTHONPATH" in env else {**env, "PYTHONPATH": str(repo)}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, pids)], env=env, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


# The stand-ins' name, and the only processes the simulation counts here: a real
# llama-server that another test (or anything else on the machine) runs is not ours.
STAND_IN = "llama-server-nvmlsim-test"


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMAROUTER_NVMLSIM") and k != "PYTHONPATH"}
    return {**env, "LLAMAROUTER_NVMLSIM_MATCH": STAND_IN}


@pytest.fixture
def fake_server(tmp_path: Path) -> Iterator[Path]:
    """A program named llama-server that only sleeps: the simulation reads nothing but its
    command line and environment."""
    script = tmp_path / STAND_IN
    script.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(60)\n")
    script.chmod(0o755)
    yield script


def start(server: Path, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([str(server), *args], env=env)
    # Its /proc entry carries the final command line once exec is done.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{proc.pid}/cmdline").read_bytes().startswith(str(sys.executable).encode()):
                break
        except OSError:
            pass
        time.sleep(0.02)
    return proc


def model_file(path: Path, size: int) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
    return path


def test_without_devices_configured_it_is_a_host_without_the_driver() -> None:
    out = run_probe(sim_env("", base_env()))
    assert out["file"] == str(SIM_DIR / "pynvml.py")
    assert out["init_error"] == "Driver Not Loaded" and out["value"] == 9


def test_devices_of_the_configured_sizes() -> None:
    out = run_probe(sim_env("24GiB,12GiB", base_env(), used="0,1GiB"))
    devices = out["devices"]
    assert isinstance(devices, list)
    assert [(d["total"], d["free"]) for d in devices] == [(24 * G, 24 * G), (12 * G, 11 * G)]
    assert devices[0]["name"] == "Simulated GPU 24576 MiB"
    assert out["bad_index"] == 2
    # The router's own probe reads them, and `auto` budgets each device less the margin.
    assert out["probe_gpu"] is True
    assert out["probe_devices"] == [
        {"name": "cuda:0", "total": 24 * G, "free": 24 * G}, {"name": "cuda:1", "total": 12 * G, "free": 11 * G},
    ]
    assert out["per_device"] == [[0, 24 * G, G], [1, 12 * G, G]]
    assert out["budget"] == 34 * G


def test_each_process_counts_on_the_devices_it_was_given(tmp_path: Path, fake_server: Path) -> None:
    model = model_file(tmp_path / "m.gguf", 1000 * MIB)
    env = sim_env("24GiB,12GiB,8GiB", base_env(), overhead="100MiB")
    procs = [
        # All devices visible, split 0.6/0.4 over its first two: NVML 0 and 1.
        start(fake_server, ["-m", str(model), "--tensor-split", "0.6,0.4", "--main-gpu", "0"], env),
        # CUDA_VISIBLE_DEVICES renumbers: its 0 is NVML 2, its 1 is NVML 1.
        start(fake_server, ["-m", str(model), "-ts", "1,3"], {**env, "CUDA_VISIBLE_DEVICES": "2,1"}),
        # One device, whole.
        start(fake_server, ["--model", str(model)], {**env, "CUDA_VISIBLE_DEVICES": "1"}),
        # -dev none: the CPU only; and a process that is no llama-server.
        start(fake_server, ["-m", str(model), "-dev", "none"], env),
    ]
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", str(model)], env=env)
    try:
        out = run_probe(env, *(p.pid for p in procs), other.pid)
    finally:
        for p in [*procs, other]:
            p.kill()
            p.wait()
    devices = out["devices"]
    assert isinstance(devices, list)
    per = [{int(pid): n for pid, n in d["procs"].items()} for d in devices]
    a, b, c, cpu = (p.pid for p in procs)
    o = 100 * MIB
    assert per[0] == {a: o + 600 * MIB}
    assert per[1] == {a: o + 400 * MIB, b: o + 750 * MIB, c: o + 1000 * MIB}
    assert per[2] == {b: o + 250 * MIB}
    assert devices[1]["used"] == 3 * o + 2150 * MIB
    assert devices[1]["free"] == 12 * G - devices[1]["used"]
    # DeviceProbe.process_bytes sums a child over every device, as for real NVML.
    assert out["probe_pids"] == {
        str(a): 2 * o + 1000 * MIB, str(b): 2 * o + 1000 * MIB, str(c): o + 1000 * MIB, str(cpu): None,
        str(other.pid): None,
    }


def test_split_models_count_every_shard_and_rss_can_be_charged_instead(tmp_path: Path, fake_server: Path) -> None:
    for k in (1, 2):
        model_file(tmp_path / f"s-0000{k}-of-00002.gguf", 300 * MIB)
    env = sim_env("8GiB", base_env())
    p = start(fake_server, ["-m", str(tmp_path / "s-00001-of-00002.gguf")], env)
    try:
        assert run_probe(env, p.pid)["probe_pids"] == {str(p.pid): 600 * MIB}
        rss = run_probe({**env, "LLAMAROUTER_NVMLSIM_CHARGE": "rss"}, p.pid)["probe_pids"]
        assert isinstance(rss, dict) and 0 < rss[str(p.pid)] < 600 * MIB  # a sleeping Python
    finally:
        p.kill()
        p.wait()


def test_split_mode_none_and_device_names(tmp_path: Path) -> None:
    # The rules alone, in this process: under its package name, so no `pynvml` is imported here.
    from llamarouter.devtools.nvmlsim import pynvml as sim

    model = model_file(tmp_path / "m.gguf", 100 * MIB)
    sizes = [8 * G, 8 * G, 16 * G]
    m = ["-m", str(model)]
    assert sim.charge([*m, "-sm", "none", "-mg", "2"], {}, sizes) == {2: 100 * MIB}
    assert sim.charge([*m, "-dev", "CUDA1"], {"CUDA_VISIBLE_DEVICES": "2,0"}, sizes) == {0: 100 * MIB}
    # No -ts: by the devices' sizes, as a stand-in for llama.cpp's split by free memory.
    assert sim.charge(m, {"CUDA_VISIBLE_DEVICES": "0,2"}, sizes) == {0: 100 * MIB // 3, 2: 200 * MIB // 3}
    # CUDA ends the list at the first entry that is no device.
    assert sim.visible({"CUDA_VISIBLE_DEVICES": "1,7,0"}, 3) == [1]
    assert sim.visible({"CUDA_VISIBLE_DEVICES": ""}, 3) == []
    assert sim.charge(m, {"CUDA_VISIBLE_DEVICES": "GPU-x"}, sizes) == {}
