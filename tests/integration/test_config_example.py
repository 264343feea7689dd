"""config.ini.example, as shipped, is a preset file the router loads and serves from.

Only its model paths change: ``/models/...`` points at generated GGUF files of the same
names, since the example's real models are gigabytes. Everything else (keys, spellings,
comments, the Hugging Face section) is read as a user would get it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llamarouter.devtools.tinymodel import write_model
from tests.conftest import ROOT, StartRouter

pytestmark = pytest.mark.integration

EXAMPLE = ROOT / "config.ini.example"
#: Real loads of tiny models take well under a second; a busy 2-core CI box needs margin.
LOAD_S = 60.0


def _args(item: dict[str, object]) -> list[str]:
    args = item["status"]["args"]  # type: ignore[index]  # JSON from GET /models
    assert isinstance(args, list)
    return [str(a) for a in args]


def _flag(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


@pytest.mark.timeout(180)
async def test_config_example_is_loaded_and_served(
    tmp_path: Path, start_router: StartRouter, llama_server_bin: Path
) -> None:
    text = EXAMPLE.read_text()
    assert text.count("= /models/") == 3  # the paths this test rewrites, and no others
    models = tmp_path / "models"
    write_model(models / "qwen2.5-7b-instruct-q4_k_m.gguf", seed=1)
    write_model(models / "llama-3.3-70b" / "Llama-3.3-70B-Instruct-Q4_K_M.gguf", seed=2, n_shards=2)
    write_model(models / "nomic-embed-text-v1.5.f16.gguf", seed=3)
    models_dir = tmp_path / "models-dir"
    write_model(models_dir / "tiny-a.gguf", seed=4)
    preset = tmp_path / "config.ini"
    preset.write_text(text.replace("= /models/", f"= {models}/"))

    router = await start_router(
        "--models-preset", str(preset), "--models-dir", str(models_dir),
        server_bin=llama_server_bin,
    )
    listed = await router.models()
    assert set(listed) == {
        "qwen2.5-7b-instruct", "llama-3.3-70b-instruct", "nomic-embed",
        "ggml-org/gemma-3-4b-it-GGUF:Q4_K_M", "tiny-a",
    }

    qwen = listed["qwen2.5-7b-instruct"]
    assert sorted(qwen["aliases"]) == ["default", "qwen"]
    assert sorted(qwen["tags"]) == ["7b", "chat"]
    qwen_args = _args(qwen)
    assert _flag(qwen_args, "--ctx-size") == "32768"  # the section beats [*]
    assert _flag(qwen_args, "--n-gpu-layers") == "99"  # from [*]
    assert "--jinja" in qwen_args
    big = _args(listed["llama-3.3-70b-instruct"])
    assert _flag(big, "--model").endswith("-00001-of-00002.gguf")
    assert _flag(big, "--n-gpu-layers") == "40"
    tiny = _args(listed["tiny-a"])
    assert _flag(tiny, "--ctx-size") == "2048" and _flag(tiny, "--temperature") == "0.7"  # written `temp`
    assert "--embeddings" in _args(listed["nomic-embed"])
    assert listed["nomic-embed"]["pinned"] is True

    # load-on-startup and pin: both start with the router.
    await router.wait_status("qwen2.5-7b-instruct", "loaded", LOAD_S)
    await router.wait_status("nomic-embed", "loaded", LOAD_S)

    status, body = await router.chat("qwen", max_tokens=4)  # by alias
    assert status == 200, body
    assert body["object"] == "chat.completion"
    status, body = await router.chat("tiny-a", max_tokens=4)  # a models-dir model the file tunes
    assert status == 200, body
    # The generated embedding model sets no pooling type, so ask the native endpoint.
    status, body = await router.post("/embedding", {"model": "nomic-embed", "content": "hello"})
    assert status == 200, body
    assert isinstance(body, list) and body and "embedding" in body[0]
