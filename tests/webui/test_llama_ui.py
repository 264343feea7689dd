"""llama.cpp's own web UI, built by bin/build-webui, driven against llamarouter.

The router runs the real llama-server with two generated models. The test does what a user
does: pick a model, send a message, read the streamed answer, switch to the other model
mid-conversation, and see it load and answer; and Stop a long answer (a slow fake child).
Screenshots of the UI go to docs/img/.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from playwright.async_api import Locator, Page, Request, expect

from llamarouter.devtools.tinymodel import write_model
from tests.conftest import ROOT, StartRouter
from tests.fakes.helpers import wait_for, write_fake_model
from tests.integration.conftest import llama_server_bin  # noqa: F401 - a fixture, used by name
from tests.webui.conftest import shoot

pytestmark = pytest.mark.webui

UI_DIR = ROOT / ".webui" / "dist"
# The real model loads and answers within seconds; the margin is for 2 busy CI cores.
T = 60_000


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ui-models")
    write_model(root / "alpha.gguf", seed=1)
    write_model(root / "beta.gguf", seed=2)
    return root


@pytest.fixture
def ui_dir() -> Path:
    if not (UI_DIR / "index.html").is_file():
        pytest.fail(f"llama.cpp's web UI is not built in {UI_DIR}: run `make webui`")
    return UI_DIR


async def send(page: Page, box: Locator, text: str) -> int:
    """Send a message; return the number of tokens the child says it generated, after
    checking that the answer came as a stream of several events."""
    await box.fill(text)
    async with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions"), timeout=T) as info:
        await box.press("Enter")
    resp = await info.value
    events = [line[6:] for line in (await resp.text()).splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c.get("choices")]
    assert sum(1 for p in pieces if p) >= 3, chunks  # token by token, not one block
    return int(next(c["timings"]["predicted_n"] for c in reversed(chunks) if "timings" in c))


async def test_static_files_like_upstream(start_router: StartRouter, two_models: Path, ui_dir: Path) -> None:
    r = await start_router("--models-dir", str(two_models), "--ui-dir", str(ui_dir), "--api-key", "k")
    async with r.session.get(r.url + "/") as resp:  # public, like upstream's embedded UI
        assert resp.status == 200 and resp.content_type == "text/html"
        assert resp.headers["Cache-Control"] == "no-cache"
        assert resp.headers["Cross-Origin-Opener-Policy"] == "same-origin"
        assert resp.headers["Cross-Origin-Embedder-Policy"] == "require-corp"
        etag = resp.headers["ETag"]
        html = await resp.text()
    assert html == (ui_dir / "index.html").read_text()
    async with r.session.get(r.url + "/", headers={"If-None-Match": etag}) as resp:
        assert resp.status == 304
    bundle = next((ui_dir / "_app" / "immutable").glob("bundle.*.js")).name
    async with r.session.get(f"{r.url}/_app/immutable/{bundle}") as resp:
        assert resp.status == 200 and resp.content_type == "text/javascript"
        assert resp.headers["Cache-Control"] == "public, max-age=31536000, immutable"
    async with r.session.get(r.url + "/sw.js") as resp:
        assert resp.status == 200 and resp.headers["Cache-Control"] == "no-cache"
    # The dashboard moved aside; the API still needs the key.
    async with r.session.get(r.url + "/dashboard/") as resp:
        assert resp.status == 200 and "/dashboard/app.js" in await resp.text()
    assert (await r.get("/v1/models"))[0] == 401
    assert (await r.get("/_app/nothing.js"))[0] == 401  # not a file of the UI: not public
    r.headers["Authorization"] = "Bearer k"
    status, body = await r.get("/_app/nothing.js")
    assert status == 404 and body["error"]["message"] == "File Not Found"


async def test_conversation_across_two_models(
    start_router: StartRouter,
    two_models: Path,
    ui_dir: Path,
    llama_server_bin: Path,  # noqa: F811 - the imported fixture
    page: Page,
) -> None:
    r = await start_router(
        "--models-dir", str(two_models), "--ui-dir", str(ui_dir), "-c", "512", "-n", "24", "--seed", "7",
        server_bin=llama_server_bin,
    )
    chats: list[Request] = []
    page.on("request", lambda req: chats.append(req) if req.url.endswith("/v1/chat/completions") else None)
    await page.goto(r.url + "/")
    main = page.get_by_role("main")
    composer_model = main.get_by_role("button", name="alpha", exact=True).last
    await expect(composer_model).to_be_visible(timeout=T)  # the first model is preselected

    # Pick alpha from the composer's model menu (the router's /v1/models): it loads at once.
    await composer_model.click()
    menu = page.get_by_role("menu").last
    await menu.get_by_role("button", name="alpha", exact=True).click()
    await expect(page.get_by_text("Model loaded: alpha")).to_be_visible(timeout=T)  # from /models/sse
    assert await r.status_of("alpha") == "loaded"

    # Turn 1 with alpha.
    box = main.get_by_role("textbox", name="Type a message...")
    answers = main.get_by_role("group", name="Assistant message with actions")
    predicted = alpha_tokens = await send(page, box, "Hello, alpha")
    first = answers.nth(0)
    # The UI shows the child's own count of generated tokens once the stream has ended.
    await expect(first.get_by_role("button", name=f"{predicted} tokens", exact=True)).to_be_visible(timeout=T)
    await expect(first.get_by_role("button", name="alpha", exact=True)).to_be_visible()
    assert (await first.locator("p").first.inner_text()).strip()
    assert await r.status_of("alpha") == "loaded"

    # Switch to beta in the composer: the menu lists both, from the router's /v1/models.
    await main.get_by_role("button", name="alpha", exact=True).last.click()
    menu = page.get_by_role("menu").last
    await expect(menu.get_by_role("option", name="beta", exact=False)).to_be_visible(timeout=T)
    await menu.get_by_role("button", name="beta", exact=True).click()
    await expect(main.get_by_role("button", name="beta", exact=True).last).to_be_visible(timeout=T)
    await expect(page.get_by_text("Model loaded: beta")).to_be_visible(timeout=T)
    await r.wait_status("beta", "loaded")  # loaded on choosing it, before any message

    # Turn 2 with beta: it loads and answers; the conversation keeps turn 1.
    predicted = await send(page, box, "And now you, beta")
    await expect(answers).to_have_count(2, timeout=T)
    second = answers.nth(1)
    await expect(second.get_by_role("button", name=f"{predicted} tokens", exact=True)).to_be_visible(timeout=T)
    await expect(second.get_by_role("button", name="beta", exact=True)).to_be_visible()
    assert (await second.locator("p").first.inner_text()).strip()
    assert await r.status_of("beta") == "loaded"

    # Both turns went through the router as streamed chat completions for the chosen model,
    # the second one with the whole conversation.
    bodies = [json.loads(req.post_data or "{}") for req in chats]
    assert [b.get("model") for b in bodies] == ["alpha", "beta"], bodies
    assert all(b.get("stream") is True for b in bodies)
    assert [m["role"] for m in bodies[1]["messages"]][-3:] == ["user", "assistant", "user"]
    for req in chats:
        resp = await req.response()
        assert resp is not None and resp.status == 200
        assert (await resp.header_value("content-type") or "").startswith("text/event-stream")
    await shoot(page, "llama-ui-chat")

    # The dashboard's timeline counted the streamed tokens as llama-server did.
    status, hist = await r.get("/dashboard/history")
    assert status == 200
    counted = {
        name: sum(b["models"][name]["tokens"] for b in hist["buckets"] if name in b["models"])
        for name in ("alpha", "beta")
    }
    assert counted == {"alpha": alpha_tokens, "beta": predicted}, counted


async def test_stop_ends_the_request_at_the_router(
    tmp_path: Path, start_router: StartRouter, ui_dir: Path, page: Page
) -> None:
    # A fake child that streams 5000 tokens at 40 per second: two minutes unless stopped.
    d = tmp_path / "models"
    write_fake_model(d / "long.gguf", tokens=5000, tps=40)
    r = await start_router("--models-dir", str(d), "--ui-dir", str(ui_dir))
    await page.goto(r.url + "/")
    main = page.get_by_role("main")
    box = main.get_by_role("textbox", name="Type a message...")
    await box.fill("Go on forever")
    await box.press("Enter")
    answer = main.get_by_role("group", name="Assistant message with actions").locator("p").first
    await expect(answer).to_contain_text("tok5 ", timeout=T)
    assert (await r.models())["long"]["in_flight"] == 1
    await main.get_by_role("button", name="Stop", exact=True).click()
    await expect(main.get_by_role("button", name="Stop", exact=True)).to_be_hidden(timeout=T)

    async def released() -> bool:
        return (await r.models())["long"]["in_flight"] == 0

    await wait_for(released, 10, message="the stopped request to be released by the router")
    assert "tok4999" not in await answer.inner_text()
