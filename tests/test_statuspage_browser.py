"""The status page in a real headless Chromium against the real daemon.

Debian's ``chromium`` package driven by Playwright for Python (``executable_path``; Playwright's
own browser download is never used). Skipped, with the reason, when Playwright or a Chromium
binary is missing: ``apt-get install chromium`` and ``pip install -e '.[test]'`` bring both.

What is shown: the page loads with no console error, no uncaught exception and no Content
Security Policy violation (a detector installed before the page's own script, proven live by
a deliberate inline script that the policy must block); it shows the issuer and its key id;
after the issuer rotates its key and a token signed with the new key makes the gateway refetch,
the page shows the new key id without reloading; it fits a phone's width; the token form works;
and a screenshot is taken (``JWTPROXY_STATUS_SCREENSHOT=path`` keeps a copy, which is how
docs/status-page.png is made).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from aiohttp import web

from daemon_harness import Daemon, http
from helpers import AUDIENCE, ISSUER, AppServer, Backend, SigningKey, free_port

pytestmark = pytest.mark.slow

#: Both HTTP codecs, where a test sends traffic through the gateway (as tests/conftest.py has it).
CODECS = ["httptools", "h11"]

try:
    from playwright.async_api import Browser, BrowserContext, Page, async_playwright
except ImportError:  # pragma: no cover - depends on the machine
    pytest.skip("Playwright for Python is not installed (pip install -e '.[test]')", allow_module_level=True)


def _chromium() -> str | None:
    configured = os.environ.get("JWTPROXY_CHROMIUM")
    if configured:
        return configured if os.access(configured, os.X_OK) else None
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _chromium()
if CHROMIUM is None:  # pragma: no cover - depends on the machine
    pytest.skip("no Chromium binary (apt-get install chromium, or set JWTPROXY_CHROMIUM)", allow_module_level=True)

#: Headless, sandbox-less (we run as root in a container), and quiet: no network of its own.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
ADMIN_TOKEN = "page-test-admin-token-0123456789"

# Waits below are written as functions ("() => ..."): Playwright evaluates a bare expression
# string with eval, which the page's policy rightly forbids.
# Runs before the page's own script (CDP, so the page's policy does not apply to it): records
# every policy violation the page causes.
CSP_DETECTOR = """
window.__violations = [];
document.addEventListener("securitypolicyviolation",
  (e) => window.__violations.push(e.violatedDirective + " " + (e.blockedURI || "inline")));
window.__loaded_once = (window.__loaded_once || 0) + 1;
"""


class Issuer:
    """A JWKS endpoint whose key set the test replaces."""

    def __init__(self, *keys: SigningKey) -> None:
        self.keys = list(keys)
        app = web.Application()
        app.router.add_get("/jwks.json", self._jwks)
        self.server = AppServer(app)

    async def _jwks(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": [k.jwk() for k in self.keys]})

    @property
    def port(self) -> int:
        return self.server.port


def config_text(*, port: int, admin_port: int, backend_port: int, jwks_port: int, parser: str, tmp: Path) -> str:
    return f"""
[server]
listen = ["127.0.0.1:{port}"]
workers = 2
http_parser = "{parser}"
shutdown_timeout = 2
access_log = false

[admin]
listen = "127.0.0.1:{admin_port}"
token = "{ADMIN_TOKEN}"

[[issuer]]
name = "corp"
issuer = "{ISSUER}"
jwks_uri = "http://127.0.0.1:{jwks_port}/jwks.json"
audiences = ["{AUDIENCE}"]
jwks_cooldown = 0.1

[[route]]
path_prefix = "/"
upstream = "backend"

[upstream.backend]
targets = ["http://127.0.0.1:{backend_port}"]

[revocation]
backend = "sqlite"
sqlite_path = "{tmp / 'revocations.db'}"
"""


class Stack:
    def __init__(self, daemon: Daemon, port: int, admin_port: int, issuer: Issuer) -> None:
        self.daemon, self.port, self.admin_port, self.issuer = daemon, port, admin_port, issuer

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def admin(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"


@pytest.fixture
async def stack(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Stack]:
    # The gateway's codec matters only where traffic goes through it (parametrised there).
    parser = getattr(request, "param", "httptools")
    backend = await Backend().start()
    issuer = Issuer(SigningKey.rsa("kid-before-rotation"))
    await issuer.server.start()
    port, admin_port = free_port(), free_port()
    config = tmp_path / "status-page.toml"
    config.write_text(config_text(port=port, admin_port=admin_port, backend_port=backend.port,
                                  jwks_port=issuer.port, parser=parser, tmp=tmp_path))
    daemon = Daemon(tmp_path, config_path=config)
    try:
        await daemon.wait_ready()
        yield Stack(daemon, port, admin_port, issuer)
    finally:
        daemon.kill()
        await issuer.server.stop()
        await backend.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            await b.close()


class Watched:
    """A page with every console message, uncaught error and failed request recorded."""

    def __init__(self, context: BrowserContext, page: Page) -> None:
        self.context, self.page = context, page
        self.console: list[tuple[str, str]] = []
        self.errors: list[str] = []
        self.failed: list[str] = []
        page.on("console", lambda m: self.console.append((m.type, m.text)))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("requestfailed", lambda r: self.failed.append(r.url))

    def console_errors(self) -> list[str]:
        return [text for kind, text in self.console if kind in ("error", "warning")]

    async def violations(self) -> list[str]:
        return list(await self.page.evaluate("window.__violations"))


async def open_page(browser: Browser, url: str, **viewport: int) -> Watched:
    # A fresh context is a fresh profile: empty storage, no cache.
    context = await browser.new_context(viewport={"width": viewport.get("width", 1280),
                                                  "height": viewport.get("height", 900)})
    await context.add_init_script(CSP_DETECTOR)
    page = await context.new_page()
    watched = Watched(context, page)
    await page.goto(url)
    return watched


async def kids_on_page(page: Page) -> list[str]:
    return [t.strip() for t in await page.locator('.issuer[data-issuer="corp"] td.kid').all_inner_texts()]


@pytest.mark.parametrize("stack", CODECS, indirect=True)
async def test_page_shows_keys_and_follows_a_rotation_without_reload(
        stack: Stack, browser: Browser, tmp_path: Path) -> None:
    old_key = stack.issuer.keys[0]
    # Some traffic for the last-minute figures: one good request and two kinds of rejection.
    assert (await http("GET", stack.url("/a"), token=old_key.token())).status == 200
    assert (await http("GET", stack.url("/a"))).status == 401
    assert (await http("GET", stack.url("/a"), token="not.a.token")).status == 401

    w = await open_page(browser, stack.admin(f"/#token={ADMIN_TOKEN}"))
    page = w.page
    await page.wait_for_selector('.issuer[data-issuer="corp"] td.kid', timeout=15_000)
    assert "#token" not in page.url and ADMIN_TOKEN not in page.url   # taken out of the address bar
    assert await kids_on_page(page) == ["kid-before-rotation"]
    header = await page.locator('.issuer[data-issuer="corp"] h2').inner_text()
    assert "Issuer corp" in header and "2/2 workers have keys" in header
    assert ISSUER in await page.locator('.issuer[data-issuer="corp"] dl').inner_text()
    assert await page.locator("#readiness").inner_text() == "ready"
    assert await page.locator("#workers tbody tr").count() == 2
    # The reasons reach the page through the metrics flush (1 s) and the next poll (3 s).
    await page.wait_for_function(
        "() => document.querySelector('#reasons tbody').innerText.includes('missing_token')", timeout=15_000)
    reasons = await page.locator("#reasons tbody").inner_text()
    assert "missing_token" in reasons and "malformed" in reasons

    # Rotate: the issuer now publishes only a new key; a token signed with it makes the
    # gateway refetch (unknown kid), and the workers report the new key set.
    # Each worker refetches on its own, so new-key requests go out on fresh connections (the
    # kernel spreads them over both workers) until the page shows only the new key.
    new_key = SigningKey.ec("kid-after-rotation")
    stack.issuer.keys = [new_key]
    deadline = asyncio.get_running_loop().time() + 30
    while await kids_on_page(page) != ["kid-after-rotation"]:
        assert asyncio.get_running_loop().time() < deadline, await kids_on_page(page)
        replies = await asyncio.gather(*(http("GET", stack.url("/b"), token=new_key.token()) for _ in range(8)))
        assert {r.status for r in replies} == {200}
        await asyncio.sleep(0.5)
    assert "2" in await page.locator('.issuer[data-issuer="corp"] table.keys tbody').inner_text()
    # Still the first document: no reload happened (the init script ran exactly once).
    assert await page.evaluate("window.__loaded_once") == 1
    assert await page.evaluate("performance.getEntriesByType('navigation').length") == 1
    assert "ES256" in await page.locator('.issuer[data-issuer="corp"] table.keys').inner_text()

    shot = tmp_path / "status-page.png"
    await page.screenshot(path=str(shot), full_page=True)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    if os.environ.get("JWTPROXY_STATUS_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["JWTPROXY_STATUS_SCREENSHOT"])

    assert w.console_errors() == []
    assert w.errors == []
    assert w.failed == []
    assert await w.violations() == []
    # The detector is live and the policy enforced: an inline script is refused and reported.
    await page.evaluate("""() => { const s = document.createElement('script');
                                   s.textContent = 'window.__inline_ran = true';
                                   document.body.appendChild(s); }""")
    await page.wait_for_function("() => window.__violations.length > 0", timeout=5_000)
    assert await page.evaluate("window.__inline_ran === true") is False
    assert any(v.startswith("script-src") for v in await w.violations())
    await w.context.close()


async def test_page_fits_a_phone(stack: Stack, browser: Browser) -> None:
    w = await open_page(browser, stack.admin(f"/#token={ADMIN_TOKEN}"), width=390, height=844)
    await w.page.wait_for_selector('.issuer[data-issuer="corp"] td.kid', timeout=15_000)
    # Nothing wider than the screen: no sideways scrolling of the page itself.
    assert await w.page.evaluate("document.documentElement.scrollWidth") <= 390
    assert w.console_errors() == [] and w.errors == [] and await w.violations() == []
    await w.context.close()


async def test_token_form_when_the_fragment_is_missing_or_wrong(stack: Stack, browser: Browser) -> None:
    w = await open_page(browser, stack.admin("/"))
    page = w.page
    await page.wait_for_selector("#login:not([hidden])", timeout=10_000)
    assert await page.locator("#content").is_hidden()
    await page.fill("#token-input", "wrong-token")
    await page.click("#login button")
    await page.wait_for_selector("#login-error:not([hidden])", timeout=10_000)
    assert "not accepted" in await page.locator("#login-error").inner_text()
    assert await page.evaluate("sessionStorage.length") == 0      # a refused token is not kept
    await page.fill("#token-input", ADMIN_TOKEN)
    await page.click("#login button")
    await page.wait_for_selector('.issuer[data-issuer="corp"] td.kid', timeout=10_000)
    assert await page.locator("#login").is_hidden()
    assert page.url == stack.admin("/")                           # no navigation, no token in a URL
    assert await page.evaluate("sessionStorage.getItem('jwtproxy-admin-token')") == ADMIN_TOKEN
    # The only console errors are the browser's notes on the two 401 answers.
    assert all("401" in text for text in w.console_errors()), w.console_errors()
    assert w.errors == [] and await w.violations() == []
    await w.context.close()


async def test_status_json_matches_what_the_page_shows(stack: Stack) -> None:
    denied = await http("GET", stack.admin("/status"))
    assert denied.status == 401
    reply = await http("GET", stack.admin("/status"), headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert reply.status == 200
    doc = reply.json()
    assert [i["name"] for i in doc["issuers"]] == ["corp"]
    assert doc["issuers"][0]["keys"] == [{"kid": "kid-before-rotation", "alg": "RS256", "workers": 2}]
    assert {w["state"] for w in doc["workers"]} == {"ready"} and len(doc["workers"]) == 2
    assert doc["revocation"]["backend"] == "sqlite" and doc["revocation"]["state"] == "up"
    assert ADMIN_TOKEN not in json.dumps(doc)
