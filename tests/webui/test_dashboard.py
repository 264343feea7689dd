"""The operations dashboard at /dashboard/: layout at 1280 and 800 px, memory from /memory,
the 15-minute timeline, failures with their last log lines, and an axe-core scan.

Fake children (tests/fakes) stand in for llama-server; screenshots go to docs/img/.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Locator, Page, expect

from tests.conftest import Router, StartRouter
from tests.fakes.helpers import write_fake_model
from tests.webui.conftest import LOCALE, WIDTHS, T, axe_violations, shoot

pytestmark = pytest.mark.webui

LONG = "qwen2.5-coder-7b-instruct-q4_k_m"


def row(page: Page, model: str) -> Locator:
    return page.locator(f'#models tbody tr[data-model="{model}"]')


@pytest.fixture
async def csp_free_page(browser: Browser) -> AsyncIterator[Page]:
    # axe-core is injected as an inline script, which the dashboard's CSP rightly refuses.
    context = await browser.new_context(viewport={"width": 1280, "height": 900}, bypass_csp=True, **LOCALE)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        yield page
    finally:
        await context.close()
    assert not errors, errors


async def busy_router(tmp_path: Path, start_router: StartRouter) -> Router:
    d = tmp_path / "models"
    write_fake_model(d / "alpha.gguf", tokens=12)
    write_fake_model(d / f"{LONG}.gguf")
    write_fake_model(d / "broken.gguf", crash_on_start=True)
    preset = tmp_path / "preset.ini"
    preset.write_text(f"[{LONG}]\nmodel = {d / (LONG + '.gguf')}\npin = true\n")
    r = await start_router("--models-dir", str(d), "--models-preset", str(preset))
    for _ in range(3):
        status, body = await r.chat("alpha", stream=True)
        assert status == 200, body
    status, body = await r.post("/models/load", {"model": LONG})
    assert status == 200 or "already running" in str(body), body
    await r.wait_status(LONG, "loaded")
    await r.post("/models/load", {"model": "broken"})
    return r


async def no_sideways_scroll(page: Page) -> None:
    overflow = await page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    if overflow > 0:
        await page.screenshot(path="/tmp/w15/overflow.png", full_page=True)
        wide = await page.evaluate("""() => [...document.querySelectorAll('body *')]
            .filter(e => e.getBoundingClientRect().right > document.documentElement.clientWidth)
            .slice(0, 8).map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right))""")
    assert overflow <= 0, f"{overflow}px of horizontal overflow: {wide}"


async def lines_of(loc: Locator) -> int:
    """How many lines the element's own text takes (distinct line boxes)."""
    return int(await loc.evaluate(
        """el => { const r = document.createRange(); r.selectNodeContents(el.firstChild);
                   return new Set([...r.getClientRects()].map(x => Math.round(x.top))).size; }"""
    ))


async def test_dashboard_layout_memory_timeline_and_accessibility(
    tmp_path: Path, start_router: StartRouter, csp_free_page: Page, axe_source: str
) -> None:
    page = csp_free_page
    r = await busy_router(tmp_path, start_router)
    await page.goto(r.url + "/dashboard/")
    await expect(page.locator("#conn")).to_have_text("live", timeout=T)
    await expect(page.locator("#models tbody tr")).to_have_count(3, timeout=T)

    # A loaded model shows what /memory knows (its child's RSS), not "–", with a bar.
    memory = row(page, "alpha").locator("td.memory")
    await expect(memory.locator(".mem-text")).to_contain_text("RSS ", timeout=T)
    await expect(memory.locator(".bar")).to_be_visible()
    await expect(row(page, "broken").locator("td.memory .mem-text")).to_have_text("–")
    await expect(row(page, LONG).locator(".badge")).to_have_text("pinned")
    await expect(row(page, "alpha").locator(".badge")).to_be_hidden()

    # A failed load shows its error and the child's last log lines.
    broken = row(page, "broken").locator("td.status")
    await expect(broken.locator(".detail")).to_contain_text("failed", timeout=T)
    await broken.locator("details.fail summary").click()
    await expect(broken.locator("details.fail pre")).not_to_be_empty()

    # The timeline: four charts; requests drawn for alpha; its load marked.
    charts = page.locator("#charts figure")
    await expect(charts).to_have_count(4, timeout=T)
    requests = charts.nth(0)
    await expect(requests.locator("figcaption")).to_have_text("Requests per second")
    await expect(requests.locator("path.series")).not_to_have_count(0)
    await expect(requests.locator(".chart-keys")).to_contain_text("alpha")
    await expect(requests.locator("line.m-load").first).to_be_attached()
    await expect(charts.nth(2).locator("path.series")).not_to_have_count(0)  # tokens/s
    await expect(charts.nth(3).locator(".chart-keys")).to_contain_text("alpha")  # memory
    await expect(page.locator("#timeline-state")).to_contain_text("3 requests")

    for width in WIDTHS:
        await page.set_viewport_size({"width": width, "height": 900})
        await no_sideways_scroll(page)
        for model in ("alpha", LONG, "broken"):
            # Every action is on screen, and names are never broken.
            button = row(page, model).get_by_role("button", name=f"Show the log of {model}", exact=True)
            box = await button.bounding_box()
            assert box is not None and box["x"] + box["width"] <= width, (width, model, box)
            assert await lines_of(row(page, model).locator("th.id")) == 1, (width, model)
        found = await axe_violations(page, axe_source)
        assert not found, found
    await page.set_viewport_size({"width": 1280, "height": 900})
    await broken.locator("details.fail summary").click()  # closed again for the screenshot
    await shoot(page, "dashboard", height=1100)

    # Keyboard, on a fresh load: the skip link comes first and leads to the table, and the
    # row's buttons work with Enter.
    await page.reload()
    await expect(row(page, "alpha").locator("td.status .word")).to_have_text("loaded", timeout=T)
    await page.keyboard.press("Tab")
    await expect(page.get_by_role("link", name="Skip to the models")).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(page.locator("#models-h")).to_be_focused()
    unload = row(page, "alpha").get_by_role("button", name="Unload alpha", exact=True)
    await unload.focus()
    await page.keyboard.press("Enter")
    await expect(row(page, "alpha").locator("td.status .word")).to_have_text("unloaded", timeout=T)
    # The unload is marked on the timeline.
    await expect(page.locator("#charts figure").first.locator("line.m-evict").first).to_be_attached(timeout=T)
    # Pin keeps the model loaded: it is started again, shows the badge, and can be unpinned.
    await row(page, "alpha").get_by_role("button", name="Pin alpha (keep it loaded)", exact=True).click()
    await expect(row(page, "alpha").locator("td.status .word")).to_have_text("loaded", timeout=T)
    await expect(row(page, "alpha").locator("th.id .badge")).to_be_visible(timeout=T)
    await row(page, "alpha").get_by_role("button", name="Unpin alpha", exact=True).click()
    await expect(row(page, "alpha").locator("th.id .badge")).to_be_hidden(timeout=T)


async def test_dashboard_at_root_says_how_to_build_the_chat_ui(
    tmp_path: Path, start_router: StartRouter, page: Page
) -> None:
    d = tmp_path / "models"
    write_fake_model(d / "alpha.gguf")
    r = await start_router("--models-dir", str(d), "--ui-dir", "none")
    await page.goto(r.url + "/")
    await expect(page.locator("#ui-note")).to_be_visible(timeout=T)
    await expect(page.locator("#ui-note")).to_contain_text("make webui")
    await expect(page.locator("#chat-nav")).to_be_hidden()
    await page.goto(r.url + "/dashboard/")
    await expect(page.locator("#conn")).to_have_text("live", timeout=T)
    await expect(page.locator("#ui-note")).to_be_hidden()
    await expect(page.get_by_role("link", name="Chat (llama.cpp web UI)")).to_have_attribute("href", "/")


async def test_ui_endpoints_answer_like_upstream_and_history_is_recorded(
    tmp_path: Path, start_router: StartRouter
) -> None:
    d = tmp_path / "models"
    write_fake_model(d / "alpha.gguf", tokens=10)
    r = await start_router("--models-dir", str(d), "--ui-dir", "none")
    # What llama.cpp's UI probes, answered as upstream's router does without tools, MCP
    # proxy or known resumable streams.
    disabled = {"error": {"message": "this feature is disabled", "type": "feature_disabled"}}
    assert await r.get("/tools") == (403, disabled)
    assert await r.post("/tools", {}) == (403, disabled)
    assert await r.get("/cors-proxy") == (403, disabled)
    assert await r.post("/v1/streams/lookup", {"conversation_ids": ["c1"]}) == (200, [])
    assert (await r.get("/v1/stream?conv_id=c1"))[0] == 404
    assert (await r.get("/v1/stream"))[0] == 400
    async with r.session.delete(r.url + "/v1/stream?conv_id=c1") as resp:
        assert resp.status == 204
    async with r.session.get(r.url + "/sw.js") as resp:  # no UI: a worker that removes itself
        assert resp.status == 200 and "unregister()" in await resp.text()

    status, body = await r.chat("alpha", stream=True)
    assert status == 200, body
    status, body = await r.chat("alpha")
    assert status == 200, body
    status, hist = await r.get("/dashboard/history")
    assert status == 200
    assert hist["span"] == 900 and hist["step"] == 5
    alpha = [b["models"]["alpha"] for b in hist["buckets"] if "alpha" in b["models"]]
    assert sum(m["requests"] for m in alpha) == 2
    assert sum(m["errors"] for m in alpha) == 0
    # Tokens as the child reports them at the end of each answer, streamed or not.
    assert sum(m["tokens"] for m in alpha) == 20
    assert all(m["ttft_p95"] >= m["ttft_p50"] > 0 for m in alpha if "ttft_p50" in m)
    assert any("memory_bytes" in m for m in alpha)  # sampled by this very read
    kinds = [(m["model"], m["kind"]) for m in hist["marks"]]
    assert kinds[:2] == [("alpha", "load"), ("alpha", "loaded")], kinds


async def test_a_name_too_long_for_the_table_turns_it_into_cards(
    tmp_path: Path, start_router: StartRouter, page: Page
) -> None:
    very_long = "mistral-small-3.2-24b-instruct-2506-ud-q4_k_xl-with-a-long-finetune-suffix-v2"
    d = tmp_path / "models"
    write_fake_model(d / "alpha.gguf")
    write_fake_model(d / f"{very_long}.gguf")
    r = await start_router("--models-dir", str(d))
    await page.set_viewport_size({"width": 1280, "height": 900})
    await page.goto(r.url + "/dashboard/")
    await expect(page.locator("#models tbody tr")).to_have_count(2, timeout=T)
    await expect(page.locator(".table-wrap")).to_have_class(re.compile(r"\bcards\b"))
    await no_sideways_scroll(page)
    button = row(page, very_long).get_by_role("button", name=f"Show the log of {very_long}", exact=True)
    box = await button.bounding_box()
    assert box is not None and box["x"] + box["width"] <= 1280
    # On a wide enough screen it is a table again.
    await page.set_viewport_size({"width": 2400, "height": 900})
    await expect(page.locator(".table-wrap")).not_to_have_class(re.compile(r"\bcards\b"), timeout=T)
