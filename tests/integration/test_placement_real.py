"""The real (CPU) llama-server started as a placement over two GPUs would start it: it
accepts CUDA_VISIBLE_DEVICES, --main-gpu and --tensor-split, answers, and the simulated
NVML charges it on the devices it was given."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from llamarouter.core.placement import DeviceState, ModelToPlace, child_launch, place
from llamarouter.devtools.nvmlsim import sim_env
from llamarouter.devtools.tinymodel import ModelShape, write_model
from tests.fakes.helpers import free_port

G = 1024**3


@pytest.mark.timeout(120)
def test_a_split_placement_starts_the_cpu_build_and_counts_on_both_devices(
    tmp_path: Path, llama_server_bin: Path,
) -> None:
    model = write_model(tmp_path / "m.gguf", ModelShape(n_embd=64, n_layer=2, n_head=4, n_ff=128))[0]
    size = model.stat().st_size
    # Devices sized so that the model fits neither whole: it is split 3:2 over GPUs 2 and 1.
    devices = [DeviceState(0, size // 10), DeviceState(1, size * 2 // 5 + 4096), DeviceState(2, size * 3 // 5 + 4096)]
    decision = place(devices, ModelToPlace("m", size))
    assert decision.action == "split" and decision.placement is not None
    env_add, args = child_launch(decision.placement)
    assert env_add["CUDA_VISIBLE_DEVICES"] == "1,2" and args[:2] == ["--main-gpu", "0"]

    env = sim_env(",".join(str(d.total) for d in devices), dict(os.environ), overhead="1MiB")
    port = free_port()
    argv = [str(llama_server_bin), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-c", "256", "-np", "1", *args]
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        child = subprocess.Popen(argv, env={**env, **env_add}, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert child.poll() is None, f"llama-server exited {child.returncode}: {log.read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "llama-server did not become healthy"
            time.sleep(0.2)
        req = urllib.request.Request(url + "/completion", data=json.dumps({"prompt": "hi", "n_predict": 2}).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.status == 200 and json.load(r)["tokens_predicted"] >= 1

        probe = (
            "import json, pynvml; pynvml.nvmlInit(); print(json.dumps([{p.pid: p.usedGpuMemory for p in "
            "pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(i))} "
            "for i in range(pynvml.nvmlDeviceGetCount())]))"
        )
        done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        per = [{int(k): v for k, v in d.items()} for d in json.loads(done.stdout)]
        split = decision.placement.split
        assert split is not None
        assert child.pid not in per[0]
        for i, share in zip((1, 2), split, strict=True):
            assert per[i][child.pid] == pytest.approx(2**20 + size * share, rel=1e-3)
        # The CPU build says the flags do nothing, and runs.
        assert "Setting a tensor split has no effect" in log.read_text()
    finally:
        child.kill()
        child.wait()
