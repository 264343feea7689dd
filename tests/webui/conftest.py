"""Shared fixtures of the web UI tier: Debian's chromium driven by Playwright.

Playwright's own browser download is not used (`make browser` installs chromium with
apt-get; LLAMAROUTER_CHROMIUM overrides the path).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, ConsoleMessage, Locator, Page, async_playwright, expect

from tests.conftest import Router

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
LOCALE = {"locale": "en-US", "timezone_id": "UTC"}


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
    # A fixed locale and time zone keep screenshots and formatted times alike across hosts.
    context = await browser.new_context(viewport={"width": 1400, "height": 900}, **LOCALE)
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


# axe-core, the accessibility checker, comes from the npm registry at a pinned version into
# the git-ignored .webui/ folder, once; nothing of it is committed.
AXE_VERSION = "4.10.3"
AXE_DIR = Path(__file__).resolve().parents[2] / ".webui" / "test-tools"
NPM_INSTALL_TIMEOUT = 300


@pytest.fixture(scope="session")
def axe_source() -> str:
    js = AXE_DIR / "node_modules" / "axe-core" / "axe.min.js"
    if not js.is_file():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is missing: the accessibility scan installs axe-core with it")
        subprocess.run(
            [npm, "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(AXE_DIR),
             f"axe-core@{AXE_VERSION}"],
            check=True, timeout=NPM_INSTALL_TIMEOUT,
        )
    return js.read_text(encoding="utf-8")


async def axe_violations(page: Page, axe_js: str) -> list[dict[str, object]]:
    """Serious and critical axe-core violations on the page (the context must bypass CSP,
    since axe is injected as an inline script)."""
    await page.add_script_tag(content=axe_js)
    found: list[dict[str, object]] = await page.evaluate(
        """async () => (await axe.run(document, {resultTypes: ['violations']})).violations
             .filter(v => v.impact === 'serious' || v.impact === 'critical')
             .map(v => ({id: v.id, impact: v.impact, help: v.help,
                         nodes: v.nodes.map(n => n.target.join(' '))}))"""
    )
    return found


def row(page: Page, model: str) -> Locator:
    return page.locator(f'#models tbody tr[data-model="{model}"]')


def status_word(page: Page, model: str) -> Locator:
    return row(page, model).locator("td.status .word")


async def open_ui(page: Page, router: Router) -> None:
    await page.goto(router.url + "/dashboard/")
    await expect(page.locator("#conn")).to_have_text("live", timeout=T)
