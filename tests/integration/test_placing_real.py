"""Placement on several GPUs through the router, with the real (CPU) llama-server and the
simulated NVML on the router's PYTHONPATH: two unequal devices, models placed by best fit,
eviction on the device the new model needs, a split with --tensor-split, manual placement
(the preset key `devices` and the model's own -ts), and a model too large for any of it
refused with the devices' free memory. What each child was told is read from its own
/proc environment and command line; the simulated NVML says what each device holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llamarouter.core.gguf_info import RunSettings, estimate, read_facts
from llamarouter.devtools.nvmlsim import sim_env
from llamarouter.devtools.tinymodel import shape_for_size, write_model
from tests.conftest import Router, StartRouter

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

OPTS = {"-c": "256", "-np": "1"}
# File sizes: a small model's estimate is F; the medium one's about 2 F, the large one's
# about 3.8 F, the huge one's well over both devices together (4.7 F).
SIZES = {"a": 4_000_000, "b": 4_000_000, "c": 4_000_000, "d": 16_000_000, "large": 40_000_000, "huge": 80_000_000}


def _estimate(path: Path) -> int:
    return estimate(read_facts(path), RunSettings.from_options(OPTS), gpu=True).total


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("placing-models")
    for seed, (name, size) in enumerate(SIZES.items()):
        write_model(d / f"{name}.gguf", shape_for_size(size), seed=seed)
    return d


def _devices(models: Path) -> tuple[int, int]:
    """Device 0 holds three small models (3.2 F), device 1 one and a half (1.5 F): the
    medium one fits device 0 only, once one small model there is gone."""
    f = _estimate(models / "a.gguf")
    assert 1.7 * f < _estimate(models / "d.gguf") <= 2.2 * f
    assert 3.2 * f < _estimate(models / "large.gguf") < 4.6 * f
    assert _estimate(models / "huge.gguf") > 4.7 * f
    return int(3.2 * f), int(1.5 * f)


async def _router(start_router: StartRouter, models: Path, server: Path, sizes: tuple[int, int],
                  preset: Path | None = None) -> Router:
    text = ",".join(str(n) for n in sizes)
    env = sim_env(text, {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {})
    args = ["--models-dir", str(models), "--models-max", "0", "--memory-budget", text, "--no-watch",
            "-c", OPTS["-c"], "-np", OPTS["-np"]]
    if preset is not None:
        args += ["--models-preset", str(preset)]
    return await start_router(*args, env=env, server_bin=server)


def _child(router: Router, model: str) -> Any:
    """The running llama-server of `model` (psutil), found by its model file."""
    found = [p for p in router.children() if f"{model}.gguf" in " ".join(p.cmdline())]
    assert len(found) == 1, (model, [p.cmdline() for p in router.children()])
    return found[0]


def _sim_use(sizes: tuple[int, int]) -> list[dict[int, int]]:
    """Each simulated device's processes and their bytes, as NVML lists them."""
    probe = (
        "import json, pynvml; pynvml.nvmlInit(); print(json.dumps([{p.pid: p.usedGpuMemory for p in "
        "pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i))} "
        "for i in range(pynvml.nvmlDeviceGetCount())]))"
    )
    env = sim_env(",".join(str(n) for n in sizes), dict(os.environ))
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return [{int(k): v for k, v in d.items()} for d in json.loads(done.stdout)]


async def _loaded(router: Router) -> list[str]:
    return sorted(m for m, item in (await router.models()).items() if item["status"]["value"] == "loaded")


async def test_best_fit_eviction_on_the_device_split_and_refusal(
    models: Path, llama_server_bin: Path, start_router: StartRouter,
) -> None:
    sizes = _devices(models)
    r = await _router(start_router, models, llama_server_bin, sizes)

    # a: the tightest fit is device 1; b and c then fit device 0 only.
    for name in ("a", "b", "c"):
        assert (await r.chat(name, max_tokens=1))[0] == 200
    listed = await r.models()
    where = {n: listed[n]["placement"]["placement"]["devices"] for n in ("a", "b", "c")}
    assert where == {"a": [1], "b": [0], "c": [0]}, where
    assert listed["a"]["placement"]["action"] == "place" and "tightest fit" in listed["a"]["placement"]["reason"]
    assert _child(r, "a").environ()["CUDA_VISIBLE_DEVICES"] == "1"
    assert _child(r, "b").environ()["CUDA_VISIBLE_DEVICES"] == "0"
    use = _sim_use(sizes)
    assert set(use[1]) == {_child(r, "a").pid}
    assert set(use[0]) == {_child(r, "b").pid, _child(r, "c").pid}

    # d fits device 0 only: b, the least recently used there, goes; a (the least recently
    # used of all, on device 1) stays.
    assert (await r.chat("d", max_tokens=1))[0] == 200
    assert await _loaded(r) == ["a", "c", "d"]
    listed = await r.models()
    assert listed["b"]["status"]["stop_reason"] == "evicted"
    assert listed["d"]["placement"]["placement"]["devices"] == [0]
    assert _child(r, "d").environ()["CUDA_VISIBLE_DEVICES"] == "0"
    assert set(_sim_use(sizes)[0]) == {_child(r, "c").pid, _child(r, "d").pid}

    # large fits no device whole: the idle models go and it is split over both.
    assert (await r.chat("large", max_tokens=1))[0] == 200
    assert await _loaded(r) == ["large"]
    item = (await r.models())["large"]
    placed = item["placement"]["placement"]
    assert placed["devices"] == [0, 1] and item["placement"]["action"] == "split"
    share = placed["tensor_split"]
    assert share[0] > share[1] > 0 and abs(sum(share) - 1) < 1e-3
    args = item["status"]["args"]
    assert args[args.index("--tensor-split") + 1] == ",".join(f"{x:.4f}".rstrip("0").rstrip(".") for x in share)
    assert args[args.index("--main-gpu") + 1] == "0"
    child = _child(r, "large")
    assert child.environ()["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert "--tensor-split" in child.cmdline()
    use = _sim_use(sizes)
    size = (models / "large.gguf").stat().st_size
    for i in (0, 1):
        assert use[i][child.pid] == pytest.approx(size * share[i], rel=1e-3)

    # huge fits nothing even with every model stopped: 503 naming the devices, nothing stops.
    status, err = await r.chat("huge", max_tokens=1)
    assert status == 503, err
    message = err["error"]["message"]
    assert "cuda:0" in message and "cuda:1" in message and "MiB free of" in message, message
    assert await _loaded(r) == ["large"]
    status, mem = await r.get("/memory")
    assert status == 200
    assert mem["decisions"]["huge"]["action"] == "refuse"
    assert mem["models"]["large"]["placement"]["placement"]["devices"] == [0, 1]
    per = {d["index"]: d for d in mem["per_device"]}
    assert set(per[0]["models"]) == set(per[1]["models"]) == {"large"}
    assert "huge" not in mem["placements"]


async def test_manual_placement_is_respected(
    models: Path, llama_server_bin: Path, start_router: StartRouter, tmp_path: Path,
) -> None:
    sizes = _devices(models)
    preset = tmp_path / "models.ini"
    # a would go to device 1 by best fit; `devices = 0` keeps it on 0. b gives its own
    # -ts: its flags are kept and it spans both devices in its proportions.
    preset.write_text("[a]\ndevices = 0\n\n[b]\ntensor-split = 1,3\n")
    r = await _router(start_router, models, llama_server_bin, sizes, preset)

    assert (await r.chat("a", max_tokens=1))[0] == 200
    item = (await r.models())["a"]
    assert item["placement"]["placement"] == {
        "devices": [0], "tensor_split": None, "bytes": item["placement"]["placement"]["bytes"], "source": "preset",
    }
    assert "(manual)" in item["placement"]["reason"]
    assert _child(r, "a").environ()["CUDA_VISIBLE_DEVICES"] == "0"

    assert (await r.chat("b", max_tokens=1))[0] == 200
    item = (await r.models())["b"]
    placed = item["placement"]["placement"]
    assert placed["devices"] == [0, 1] and placed["tensor_split"] == [0.25, 0.75] and placed["source"] == "args"
    child = _child(r, "b")
    env = child.environ()
    assert "CUDA_VISIBLE_DEVICES" not in env and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    cmd = child.cmdline()
    assert cmd[cmd.index("--tensor-split") + 1] == "1,3" and "--main-gpu" not in cmd
    use = _sim_use(sizes)
    size = (models / "b.gguf").stat().st_size
    assert use[0][child.pid] == pytest.approx(size * 0.25, rel=1e-3)
    assert use[1][child.pid] == pytest.approx(size * 0.75, rel=1e-3)
    assert set(use[0]) == {_child(r, "a").pid, child.pid}
