"""bench.gpu_check's multi-GPU section in simulation: the real CPU llama-server under the
simulated NVML (two unequal devices), the same checks a host with several NVIDIA GPUs runs:
best fit, eviction on the needed device, manual placement, a split, a refusal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]


def test_multi_gpu_section_passes_in_simulation(llama_server_bin: Path, tmp_path: Path) -> None:
    report = tmp_path / "gpu-check.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMAROUTER_")}
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu_check", "--simulate", "24GiB,12GiB", "--server-bin", str(llama_server_bin),
         "--json", str(report), "--markdown", str(tmp_path / "multi.md")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=100,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    data = json.loads(report.read_text())
    assert not data["failed"]
    names = [r["check"] for r in data["results"] if r["ok"]]
    for wanted in ("best fit put a and b on different devices", "d evicts on the device it needs",
                   "manual placement: devices =", "split with --tensor-split",
                   "refused with 503 naming each device", "nothing left running", "no VRAM held"):
        assert any(wanted in n for n in names), (wanted, names)
    multi = data["figures"]["multi_gpu"]
    # Scaled so the smallest simulated device is 32 MiB, proportions kept.
    assert multi["nvml_totals_mib"] == [64.0, 32.0]
    assert multi["loads"]["huge"]["status"] == 503
    assert {"place: before", "place: after d", "split: after large"} <= set(multi["snapshots"])
    assert "| large | 200 |" in (tmp_path / "multi.md").read_text()
