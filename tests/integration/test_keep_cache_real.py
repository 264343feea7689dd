"""Keep-cache with the real llama-server: a long conversation survives its model's unload.

The proof of the feature: prefill a long prompt, stop the model (unload or eviction), then
send the same prompt extended by a short suffix. With keep-cache the router saved the slot
before the stop and restored it after the load, so the child prefills only the suffix
(`timings.prompt_n`); without it the whole prompt is prefilled again.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from llamarouter.devtools.tinymodel import ModelShape, write_model
from tests.conftest import Router, StartRouter
from tests.fakes.helpers import wait_for

pytestmark = pytest.mark.integration

# Byte-fallback vocabulary: an ASCII character is at least one token.
PROMPT_CHARS = 4000
SUFFIX = " and then what happened next?"
CTX = 8192


@pytest.fixture(scope="module")
def long_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("long-models")
    shape = ModelShape(n_ctx_train=CTX)
    write_model(root / "long.gguf", shape, seed=11)
    write_model(root / "other.gguf", shape, seed=12)
    return root


def long_prompt() -> str:
    rng = random.Random(7)
    words = ["alpha", "river", "stone", "cloud", "ember", "north", "quiet", "lamp"]
    text = ""
    while len(text) < PROMPT_CHARS:
        text += rng.choice(words) + " "
    return text[:PROMPT_CHARS]


async def complete(router: Router, prompt: str, model: str = "long") -> dict[str, Any]:
    status, body = await router.post(
        "/completion",
        {"model": model, "prompt": prompt, "n_predict": 1, "cache_prompt": True, "temperature": 0},
    )
    assert status == 200, body
    timings: dict[str, Any] = body["timings"]
    return timings


async def stop_model(router: Router, how: str, model: str = "long") -> None:
    if how == "unload":
        status, body = await router.post("/models/unload", {"model": model})
        assert status == 200, body
    else:  # evicted: --models-max 1 and another model is asked for
        status, body = await router.post(
            "/completion", {"model": "other", "prompt": "hi", "n_predict": 1}
        )
        assert status == 200, body
    await router.wait_status(model, "unloaded", timeout=60)


async def start(start_router: StartRouter, llama_server_bin: Path, models: Path, tmp_path: Path,
                *extra: str) -> Router:
    return await start_router(
        "--models-dir", str(models), "-c", str(CTX), "-np", "1", "--models-max", "1",
        "--keep-cache-dir", str(tmp_path / "kv"), "--no-watch", *extra,
        server_bin=llama_server_bin,
    )


@pytest.mark.parametrize(("keep", "how"), [(True, "unload"), (True, "evict"), (False, "unload")])
async def test_follow_up_prefills_only_the_suffix_with_keep_cache(
    start_router: StartRouter, llama_server_bin: Path, long_models: Path, tmp_path: Path,
    keep: bool, how: str,
) -> None:
    router = await start(
        start_router, llama_server_bin, long_models, tmp_path,
        "--keep-cache" if keep else "--no-keep-cache",
    )
    prompt = long_prompt()
    first = await complete(router, prompt)
    assert first["prompt_n"] >= PROMPT_CHARS  # the whole prompt, prefilled once

    await stop_model(router, how)
    item = (await router.models())["long"]
    if keep:
        saved = item["saved_caches"]
        assert [s["slot"] for s in saved] == [0]
        assert saved[0]["tokens"] >= PROMPT_CHARS and saved[0]["bytes"] > 0
    else:
        assert "saved_caches" not in item

    follow = await complete(router, prompt + SUFFIX)
    if keep:
        # The whole first prompt came from the restored cache (llama-server may evaluate
        # its last token again); only the suffix was prefilled.
        assert follow["cache_n"] >= first["prompt_n"] - 1, follow
        assert follow["prompt_n"] < first["prompt_n"] // 10, follow
        assert "keep-cache: restored slot 0" in router.log()
    else:
        assert follow["cache_n"] == 0, follow
        assert follow["prompt_n"] > first["prompt_n"], follow


async def test_failed_restore_is_skipped_and_the_request_served(
    start_router: StartRouter, llama_server_bin: Path, long_models: Path, tmp_path: Path,
) -> None:
    router = await start(start_router, llama_server_bin, long_models, tmp_path, "--keep-cache")
    prompt = long_prompt()
    await complete(router, prompt)
    await stop_model(router, "unload")
    files = list((tmp_path / "kv").glob("*/slot-0.slot"))
    assert len(files) == 1
    files[0].write_bytes(b"not a slot file")  # the child refuses to restore it

    follow = await complete(router, prompt + SUFFIX)
    assert follow["prompt_n"] >= PROMPT_CHARS  # prefilled again, but served
    assert "keep-cache: slot 0 not restored" in router.log()
    assert not files[0].exists()  # not tried again at the next load


async def test_slow_save_is_skipped_and_the_unload_completes(
    start_router: StartRouter, llama_server_bin: Path, long_models: Path, tmp_path: Path,
) -> None:
    # A limit no save can meet: every save times out, and the stop goes on regardless.
    router = await start(
        start_router, llama_server_bin, long_models, tmp_path,
        "--keep-cache", "--keep-cache-timeout", "0.000001",
    )
    await complete(router, long_prompt())
    await stop_model(router, "unload")
    assert "saved_caches" not in (await router.models())["long"]
    assert "keep-cache: cannot list slots, nothing saved: timed out" in router.log()


async def test_disk_budget_deletes_the_oldest_cache(
    start_router: StartRouter, llama_server_bin: Path, long_models: Path, tmp_path: Path,
) -> None:
    # One long conversation saves about 3 MB here: the budget holds one, not two.
    router = await start(
        start_router, llama_server_bin, long_models, tmp_path,
        "--keep-cache", "--keep-cache-budget", "4MiB",
    )
    await complete(router, long_prompt(), "long")
    await stop_model(router, "unload", "long")
    await complete(router, long_prompt(), "other")
    await stop_model(router, "unload", "other")
    models = await router.models()
    assert "saved_caches" not in models["long"]  # the older one went
    assert models["other"]["saved_caches"][0]["tokens"] >= PROMPT_CHARS
    assert "to stay within the 4194304-byte budget" in router.log()
    assert not list((tmp_path / "kv").glob("long-*/slot-0.slot"))
    assert list((tmp_path / "kv").glob("other-*/slot-0.slot"))


async def test_a_cache_larger_than_the_budget_is_not_kept(
    start_router: StartRouter, llama_server_bin: Path, long_models: Path, tmp_path: Path,
) -> None:
    router = await start(
        start_router, llama_server_bin, long_models, tmp_path,
        "--keep-cache", "--keep-cache-budget", "1MiB",
    )
    await complete(router, long_prompt())
    await stop_model(router, "unload")
    assert "saved_caches" not in (await router.models())["long"]
    assert not list((tmp_path / "kv").glob("*/slot-0.slot"))


async def test_saved_caches_show_in_metrics(
    start_router: StartRouter, llama_server_bin: Path, long_models: Path, tmp_path: Path,
) -> None:
    router = await start(start_router, llama_server_bin, long_models, tmp_path, "--keep-cache")
    await complete(router, long_prompt())
    await stop_model(router, "unload")

    async def scraped() -> str | None:
        status, text = await router.get("/metrics")
        assert status == 200
        return text if 'llamarouter_saved_cache_tokens{model="long",slot="0"}' in text else None

    text = await wait_for(scraped, 10, interval=0.05)
    assert 'llamarouter_keep_cache_operations_total{operation="save"} 1.0' in text


async def test_saved_caches_survive_a_router_restart(
    start_router: StartRouter, llama_server_bin: Path, long_models: Path, tmp_path: Path,
) -> None:
    first = await start(start_router, llama_server_bin, long_models, tmp_path, "--keep-cache")
    prompt = long_prompt()
    before = await complete(first, prompt)
    await stop_model(first, "unload")
    assert await first.stop() == 0

    second = await start(start_router, llama_server_bin, long_models, tmp_path, "--keep-cache")
    saved = (await second.models())["long"]["saved_caches"]
    assert saved[0]["tokens"] >= PROMPT_CHARS
    follow = await complete(second, prompt + SUFFIX)
    assert follow["cache_n"] >= before["prompt_n"] - 1, follow


async def test_a_changed_model_setup_drops_the_saved_cache(
    start_router: StartRouter, llama_server_bin: Path, long_models: Path, tmp_path: Path,
) -> None:
    first = await start(start_router, llama_server_bin, long_models, tmp_path, "--keep-cache")
    prompt = long_prompt()
    await complete(first, prompt)
    await stop_model(first, "unload")
    assert await first.stop() == 0

    # Another sampling default changes nothing in the KV cache, but the router cannot tell
    # which options matter, so any change of the child's options counts.
    second = await start(start_router, llama_server_bin, long_models, tmp_path, "--keep-cache", "--temp", "0.5")
    follow = await complete(second, prompt + SUFFIX)
    assert follow["cache_n"] == 0, follow
    assert "keep-cache: slot 0 was saved from another setup; dropped" in second.log()
    assert "saved_caches" not in (await second.models())["long"]
