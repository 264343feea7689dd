"""The memory estimate against what the real llama-server reports, and budget-driven
eviction with real children."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from pathlib import Path

import aiohttp
import pytest

from llamarouter.devtools.tinymodel import ModelShape, shape_for_size, write_model
from llamarouter.core.gguf_info import RunSettings, estimate, parse_buffer_line, read_facts
from llamarouter.core.memory import DeviceProbe
from tests.conftest import StartRouter
from tests.fakes.helpers import free_port

pytestmark = pytest.mark.integration

SHAPES = [
    (ModelShape(n_embd=64, n_layer=2, n_head=4, n_head_kv=4, n_ff=128), {"-c": "512", "-np": "1"}),
    (ModelShape(n_embd=256, n_layer=4, n_head=8, n_head_kv=2, n_ff=512, n_ctx_train=4096), {}),
    (ModelShape(n_embd=256, n_layer=4, n_head=8, n_head_kv=2, n_ff=512), {"-c": "2000", "-np": "3", "-ctk": "q8_0", "-ctv": "q4_0", "-fa": "on"}),
    (shape_for_size(40_000_000), {"-c": "4096", "-np": "2"}),
]


async def _reported_sizes(binary: Path, model: Path, opts: dict[str, str]) -> dict[str, int]:
    """Start llama-server at verbosity 4 (which prints the buffer sizes), read them, stop it."""
    port = free_port()
    args = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-lv", "4"]
    for k, v in opts.items():
        args += [k, v]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    sizes: dict[str, int] = {}
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            while line := await proc.stdout.readline():
                found = parse_buffer_line(line.decode(errors="replace"))
                if found is not None:
                    sizes[found[1]] = sizes.get(found[1], 0) + found[2]
                if b"server is listening" in line or b"listening on" in line:
                    break
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        await proc.wait()
    return sizes


@pytest.mark.parametrize(("shape", "opts"), SHAPES)
async def test_estimate_within_10_percent_of_what_llama_server_reports(
    tmp_path: Path, llama_server_bin: Path, shape: ModelShape, opts: dict[str, str]
) -> None:
    model = write_model(tmp_path / "m.gguf", shape)[0]
    reported = await _reported_sizes(llama_server_bin, model, opts)
    assert "model" in reported and "kv" in reported, reported
    est = estimate(read_facts(model), RunSettings.from_options(opts), gpu=False)
    # The stated accuracy: weights and KV cache each within 10 % (compute is an allowance).
    assert abs(est.weights - reported["model"]) <= 0.10 * reported["model"], (est, reported)
    assert abs(est.kv - reported["kv"]) <= 0.10 * reported["kv"], (est, reported)


@pytest.fixture
def three_models(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    shape = shape_for_size(25_000_000)
    for i, name in enumerate(("m1", "m2", "m3")):
        write_model(d / f"{name}.gguf", shape, seed=i)
    write_model(d / "huge.gguf", shape_for_size(120_000_000), seed=9)
    return d


async def test_budget_evicts_lru_idle_skips_busy_and_refuses_too_large(
    three_models: Path, llama_server_bin: Path, start_router: StartRouter
) -> None:
    if DeviceProbe().gpu:
        pytest.skip(
            "on a GPU host a loaded model counts the VRAM NVML sees (device context included), "
            "so this budget's arithmetic does not hold; python -m bench.gpu_check covers that case"
        )
    opts = {"-c": "512", "-np": "1"}
    one = estimate(read_facts(three_models / "m1.gguf"), RunSettings.from_options(opts), gpu=False).total
    budget = int(2.5 * one)  # room for two of the three
    r = await start_router(
        "--models-dir", str(three_models), "--models-max", "0", "--memory-budget", str(budget),
        "-c", "512", "-np", "1", server_bin=llama_server_bin,
    )

    async def loaded() -> list[str]:
        return sorted(m for m, item in (await r.models()).items() if item["status"]["value"] == "loaded")

    assert (await r.chat("m1", max_tokens=1))[0] == 200
    assert (await r.chat("m2", max_tokens=1))[0] == 200
    item = (await r.models())["m1"]
    assert item["estimated_bytes"] == one
    # m3 needs room: m1 is the least recently used idle model.
    assert (await r.chat("m3", max_tokens=1))[0] == 200
    assert await loaded() == ["m2", "m3"]
    assert (await r.models())["m1"]["status"]["stop_reason"] == "evicted"

    # A busy model is skipped: keep m2 streaming (older than m3) and ask for m1.
    body = {"model": "m2", "stream": True, "max_tokens": 100000, "messages": [{"role": "user", "content": "x"}]}
    async with aiohttp.ClientSession() as s, s.post(r.url + "/v1/chat/completions", json=body) as resp:
        await resp.content.readuntil(b"\n\n")
        assert (await r.chat("m1", max_tokens=1))[0] == 200
        assert await loaded() == ["m1", "m2"]

    # Too large for the budget on its own: refused at once, nothing evicted.
    before = await loaded()
    status, err = await r.chat("huge", max_tokens=1)
    assert status == 503 and "memory budget" in err["error"]["message"]
    assert "estimated" in err["error"]["message"]
    assert await loaded() == before
    status, mem = await r.get("/memory")
    assert status == 200 and mem["budget"] == budget and 0 < mem["used"] <= budget
    assert mem["models"]["huge"]["estimated_bytes"] > budget
    assert mem["models"]["m1"]["rss_bytes"] > 0 and "rss_bytes" not in mem["models"]["m3"]


async def test_measured_bytes_from_the_load_report(
    three_models: Path, llama_server_bin: Path, start_router: StartRouter
) -> None:
    r = await start_router(
        "--models-dir", str(three_models), "--memory-budget", "auto", "-c", "512", "-np", "1",
        "-lv", "4", server_bin=llama_server_bin,
    )
    assert (await r.chat("m1", max_tokens=1))[0] == 200
    item = (await r.models())["m1"]
    assert item["measured_bytes"] > 0
    est = item["estimate"]
    # The measurement includes the model and KV buffers the estimate predicts.
    assert item["measured_bytes"] >= 0.9 * (est["weights"] + est["kv"])
