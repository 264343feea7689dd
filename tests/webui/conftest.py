"""Shared fixtures of the web UI tier: Debian's chromium driven by Playwright.

Playwright's own browser download is not used (`make browser` installs chromium with
apt-get; LLAMAROUTER_CHROMIUM overrides the path).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

CHROMIUM = os.environ.get("LLAMAROUTER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
T = 15_000  # ms, for Playwright's auto-waiting


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (or set LLAMAROUTER_CHROMIUM)")
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def page(browser: Browser) -> AsyncIterator[Page]:
    """A fresh profile per test; fails the test on a script error or a CSP violation."""
    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    pg = await context.new_page()
    problems: list[str] = []
    pg.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type == "error" and "Content Security Policy" in msg.text:
            problems.append(f"console: {msg.text}")

    pg.on("console", on_console)
    try:
        yield pg
    finally:
        await context.close()
    assert not problems, problems




DOCS_IMG = Path(__file__).resolve().parents[2] / "docs" / "img"
WIDTHS = (1280, 800)


async def shoot(page: Page, name: str, height: int = 900) -> None:
    """Screenshots of the page at both documented widths, for docs/webui.md."""
    old = page.viewport_size
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    for width in WIDTHS:
        await page.set_viewport_size({"width": width, "height": height})
        await page.screenshot(path=DOCS_IMG / f"{name}-{width}.png")
    if old is not None:
        await page.set_viewport_size(old)
