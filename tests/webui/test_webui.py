"""The web UI (issue 8) in headless Chromium, against a router with fake children.

Playwright drives Debian's chromium (`make browser` installs it; LLAMAROUTER_CHROMIUM
overrides the path). Waiting is Playwright's auto-waiting `expect(...)` and
`wait_for_function`, or `wait_for` for the router's side; there are no sleeps.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from playwright.async_api import Page, expect

from tests.conftest import StartRouter
from tests.fakes.helpers import wait_for, write_fake_model
from tests.webui.conftest import T, open_ui, row, status_word

pytestmark = pytest.mark.webui

def tokens(n: int) -> str:
    return " ".join(f"tok{i}" for i in range(n))


def models_dir(tmp_path: Path, **models: dict) -> Path:
    d = tmp_path / "models"
    for name, knobs in models.items():
        write_fake_model(d / f"{name}.gguf", **knobs)
    return d


async def test_static_files_are_public_typed_and_cached(tmp_path: Path, start_router: StartRouter) -> None:
    # --ui-dir none: the dashboard is served at `/` as well, as when llama.cpp's UI is not built.
    r = await start_router("--models-dir", str(models_dir(tmp_path, a={})), "--api-key", "k", "--ui-dir", "none")
    for path, ctype in [
        ("/", "text/html"),
        ("/dashboard/", "text/html"),
        ("/dashboard/index.html", "text/html"),
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/style.css", "text/css"),
    ]:
        async with r.session.get(r.url + path) as resp:  # no key: the UI must load
            assert resp.status == 200, path
            assert resp.content_type == ctype and resp.charset == "utf-8"
            assert resp.headers["Cache-Control"] == "no-cache"
            assert resp.headers["X-Content-Type-Options"] == "nosniff"
            etag = resp.headers["ETag"]
            body = await resp.read()
        async with r.session.get(r.url + path, headers={"If-None-Match": etag}) as resp:
            assert resp.status == 304 and await resp.read() == b""
    async with r.session.get(r.url + "/") as resp:
        assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
        html = await resp.text()
    assert '<script src="/dashboard/app.js"' in html and "://" not in html  # nothing external
    assert len(body) > 0
    # Everything else still needs the key, and only the three files are served.
    assert (await r.get("/models"))[0] == 401
    assert (await r.get("/dashboard/__init__.py"))[0] == 401
    r.headers["Authorization"] = "Bearer k"
    status, got = await r.get("/dashboard/__init__.py")
    assert status == 404 and got["error"]["type"] == "not_found_error"
    assert (await r.get("/dashboard/%2e%2e/api.py"))[0] == 404


async def test_table_is_live_and_load_unload_logs_work(
    tmp_path: Path, start_router: StartRouter, page: Page
) -> None:
    d = models_dir(tmp_path, alpha={"load_secs": 2.0}, beta={})
    r = await start_router("--models-dir", str(d))
    await open_ui(page, r)
    await expect(page.locator("#models tbody tr")).to_have_count(2, timeout=T)
    await expect(status_word(page, "alpha")).to_have_text("unloaded")
    await expect(row(page, "alpha").locator("td.source")).to_have_text("models_dir")
    await expect(row(page, "alpha").locator("td.memory")).to_have_text("–")
    await expect(row(page, "alpha").locator("td.restarts")).to_have_text("0")
    await expect(row(page, "alpha").get_by_role("button", name="Unload alpha", exact=True)).to_be_disabled()

    # Load with the keyboard: focus the button, press Enter.
    await row(page, "alpha").get_by_role("button", name="Load alpha", exact=True).focus()
    await page.keyboard.press("Enter")
    await expect(status_word(page, "alpha")).to_have_text("loading", timeout=T)
    await expect(status_word(page, "alpha")).to_have_text("loaded", timeout=T)
    await expect(row(page, "alpha").get_by_role("button", name="Load alpha", exact=True)).to_be_disabled()
    assert await r.status_of("alpha") == "loaded"

    # A change made by someone else arrives through /models/sse; the page does not poll.
    status, body = await r.post("/models/load", {"model": "beta"})
    assert status == 200, body
    await expect(status_word(page, "beta")).to_have_text("loaded", timeout=T)

    await row(page, "alpha").get_by_role("button", name="Show the log of alpha", exact=True).click()
    await expect(page.locator("#logs-model")).to_have_text("alpha")
    await expect(page.locator("#logs-text")).not_to_be_empty(timeout=T)
    assert "(empty)" not in await page.locator("#logs-text").inner_text()
    await page.screenshot(path=tmp_path / "table.png", full_page=True)

    await row(page, "alpha").get_by_role("button", name="Unload alpha", exact=True).click()
    await expect(status_word(page, "alpha")).to_have_text("unloaded", timeout=T)
    await r.wait_status("alpha", "unloaded")
    await expect(row(page, "alpha").get_by_role("button", name="Load alpha", exact=True)).to_be_enabled()
    await expect(status_word(page, "beta")).to_have_text("loaded")


async def test_chat_loads_on_choice_and_streams_token_by_token(
    tmp_path: Path, start_router: StartRouter, page: Page
) -> None:
    d = models_dir(tmp_path, alpha={}, slow={"load_secs": 2.0, "tokens": 20, "tps": 25})
    r = await start_router("--models-dir", str(d))
    await open_ui(page, r)
    await expect(page.locator("#chat-model option")).to_have_count(2, timeout=T)

    # Choosing an unloaded model loads it; the SSE events drive the "loading…" state.
    await page.select_option("#chat-model", "slow")
    await expect(page.locator("#chat-status")).to_have_text("slow: loading…", timeout=T)
    await expect(page.locator("#chat-status")).to_have_text("slow: loaded", timeout=T)

    # Record every length the answer goes through while it streams.
    await page.evaluate(
        """() => {
          window.__lengths = [];
          new MutationObserver(() => {
            const c = document.querySelector('#transcript .msg.assistant:last-child .content');
            if (c) window.__lengths.push(c.textContent.length);
          }).observe(document.getElementById('transcript'),
                     {childList: true, subtree: true, characterData: true});
        }"""
    )
    await page.locator("#chat-input").fill("Say something")
    await page.locator("#chat-input").press("Enter")
    answer = page.locator("#transcript .msg.assistant").last.locator(".content")
    await expect(page.get_by_role("button", name="Stop", exact=True)).to_be_enabled(timeout=T)
    await expect(answer).to_have_text(tokens(20), timeout=T)
    await expect(page.locator("#transcript .msg.assistant").last).to_have_attribute("data-done", "true")
    lengths = await page.evaluate("window.__lengths.filter(n => n > 0)")
    assert len(set(lengths)) >= 5, lengths  # it grew in many steps, not at once
    assert lengths == sorted(lengths) and lengths[-1] == len(tokens(20))
    await expect(page.get_by_role("button", name="Stop", exact=True)).to_be_disabled()
    await expect(page.locator("#transcript")).to_have_attribute("aria-busy", "false")
    await expect(page.locator("#transcript .msg.user")).to_have_text("YouSay something")
    await page.screenshot(path=tmp_path / "chat.png", full_page=True)

    # A second turn works too (the history goes along).
    await page.locator("#chat-input").fill("Again")
    await page.get_by_role("button", name="Send", exact=True).click()
    await expect(page.locator("#transcript .msg.assistant")).to_have_count(2)
    await expect(page.locator("#transcript .msg.assistant").last.locator(".content")).to_have_text(tokens(20), timeout=T)


async def test_stop_aborts_a_long_stream(tmp_path: Path, start_router: StartRouter, page: Page) -> None:
    d = models_dir(tmp_path, long={"tokens": 5000, "tps": 40})
    r = await start_router("--models-dir", str(d))
    await open_ui(page, r)
    await expect(page.locator("#chat-model")).to_have_value("long", timeout=T)
    await page.locator("#chat-input").fill("Go on forever")
    await page.get_by_role("button", name="Send", exact=True).click()
    answer = page.locator("#transcript .msg.assistant").last
    await expect(answer.locator(".content")).to_contain_text("tok5", timeout=T)
    assert (await r.models())["long"]["in_flight"] == 1
    await page.get_by_role("button", name="Stop", exact=True).click()
    await expect(answer.locator(".note")).to_have_text("(stopped)", timeout=T)
    await expect(answer).to_have_attribute("data-done", "true")
    await expect(page.get_by_role("button", name="Stop", exact=True)).to_be_disabled()
    await expect(page.get_by_role("button", name="Send", exact=True)).to_be_enabled()
    await expect(page.locator("#chat-input")).to_be_focused()
    # The abort reached the router: the request is gone long before the 125 s stream ends.

    async def released() -> bool:
        return (await r.models())["long"]["in_flight"] == 0

    await wait_for(released, 10, message="the aborted request to be released")
    text = await answer.locator(".content").text_content()
    assert text and text.startswith("tok0 tok1") and "tok4999" not in text


async def test_api_key_is_asked_for_and_kept(tmp_path: Path, start_router: StartRouter, page: Page) -> None:
    r = await start_router("--models-dir", str(models_dir(tmp_path, alpha={})), "--api-key", "k")
    await page.goto(r.url + "/dashboard/")
    msg = page.locator("#models-msg")
    await expect(msg).to_contain_text("needs an API key", timeout=T)
    await expect(msg).to_contain_text("Invalid API Key")
    await expect(page.get_by_role("alert")).to_be_visible()
    await expect(page.locator("#models tbody tr")).to_have_count(0)
    await page.screenshot(path=tmp_path / "auth.png", full_page=True)

    await page.get_by_label("API key").fill("wrong")
    await page.get_by_role("button", name="Save key", exact=True).click()
    await expect(msg).to_contain_text("was rejected", timeout=T)

    await page.get_by_label("API key").fill("k")
    await page.get_by_label("API key").press("Enter")
    await expect(status_word(page, "alpha")).to_have_text("unloaded", timeout=T)
    await expect(msg).to_be_hidden()
    await expect(page.get_by_role("alert")).to_be_hidden()
    await expect(page.locator("#conn")).to_have_text("live", timeout=T)
    assert await page.evaluate("localStorage.getItem('llamarouter.apiKey')") == "k"
    assert await page.get_by_label("API key").input_value() == ""  # not left on screen

    # Kept across reloads; the API calls (load, chat) carry it.
    await page.reload()
    await expect(status_word(page, "alpha")).to_have_text("unloaded", timeout=T)
    await page.locator("#chat-input").fill("hi")
    await page.locator("#chat-input").press("Enter")
    await expect(page.locator("#transcript .msg.assistant .content")).to_have_text(tokens(8), timeout=T)
    await expect(status_word(page, "alpha")).to_have_text("loaded", timeout=T)

    await page.get_by_role("button", name="Forget", exact=True).click()
    assert await page.evaluate("localStorage.getItem('llamarouter.apiKey')") is None
    await expect(msg).to_contain_text("needs an API key", timeout=T)


async def test_markdown_renderer_escapes_first(tmp_path: Path, start_router: StartRouter, page: Page) -> None:
    r = await start_router("--models-dir", str(models_dir(tmp_path, alpha={})))
    await open_ui(page, r)
    cases = {
        "<img src=x onerror=alert(1)>": "&lt;img src=x onerror=alert(1)&gt;",
        "**b** and *i* and _j_ and `c <x>`": "<strong>b</strong> and <em>i</em> and <em>j</em> and <code>c &lt;x&gt;</code>",
        "`**not bold**` snake_case_name 2 * 3 * 4": "<code>**not bold**</code> snake_case_name 2 * 3 * 4",
        "a\nb": "a<br>b",
        "x\n```py\nprint('<hi>')\n```\ny": 'x<pre><code class="language-py">print(&#39;&lt;hi&gt;&#39;)</code></pre>y',
        "```\nstill streaming *x*": "<pre><code>still streaming *x*</code></pre>",
        '"quoted" & done': "&quot;quoted&quot; &amp; done",
    }
    got = await page.evaluate(
        "cases => Object.fromEntries(Object.keys(cases).map(k => [k, window.llamarouterUI.renderMarkdown(k)]))",
        cases,
    )
    assert got == cases
