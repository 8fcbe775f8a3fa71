"""Issue 20 item 12 in a real browser: headless Chromium loads the dashboard (connected, so it
renders jobs, workers and the quota bars), /docs and /redoc, and fails on any Content-Security-
Policy violation, caught two ways: a `securitypolicyviolation` listener installed through the
DevTools protocol before any page script runs (such scripts are not subject to the page's CSP),
and the browser's console log. A violation the test provokes itself proves the detection works.

Without network access the docs pages cannot fetch Swagger UI / ReDoc from their CDN; that is a
network error, not a violation, and the Swagger page's inline script still runs (and says its
bundle is missing), which shows the CSP let it run."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.servers import Server, token
from tests.web.test_dashboard import (
    CHROMEDRIVER_CANDIDATES,
    CHROMIUM_CANDIDATES,
    INSTALL_HINT,
    _find,
    eventually,
    text_of,
)

selenium = pytest.importorskip("selenium", reason="selenium is a dev dependency: pip install -e '.[dev]'")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402

RECORDER = """
window.__cspViolations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__cspViolations.push([e.violatedDirective, e.blockedURI, e.sourceFile, e.lineNumber].join(" "));
});
"""


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    binary = _find(CHROMIUM_CANDIDATES, "chromium")
    driver_path = _find(CHROMEDRIVER_CANDIDATES, "chromedriver")
    if binary is None or driver_path is None:
        pytest.fail(f"Chromium and chromedriver are required for the CSP test; {INSTALL_HINT}")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
        f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-', dir=tmp_path)}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    except WebDriverException as exc:
        pytest.fail(f"could not start headless Chromium ({exc.msg}); {INSTALL_HINT}")
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": RECORDER})
        yield driver
    finally:
        driver.quit()


def fill(driver: WebDriver, selector: str, value: str) -> None:
    field = driver.find_element(By.CSS_SELECTOR, selector)
    field.clear()
    field.send_keys(value)


def violations(driver: WebDriver) -> list[str]:
    recorded: list[str] = driver.execute_script("return window.__cspViolations || []")
    logged = [
        entry["message"]
        for entry in driver.get_log("browser")
        if "Content Security Policy" in entry["message"]
    ]
    return recorded + logged


def console(driver: WebDriver) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = driver.get_log("browser")
    return entries


def test_the_dashboard_runs_under_its_csp(shared_server: Server, browser: WebDriver) -> None:
    with shared_server.client() as client:
        job = client.post(
            "/api/jobs/submit", json={"task_description": "csp", "agent_options": {"duration_seconds": 60}}
        ).json()
    try:
        browser.get(shared_server.url + "/")
        fill(browser, "#token-input", token())
        browser.find_element(By.CSS_SELECTOR, "#token-save").click()
        eventually("connected", lambda: text_of(browser, "#connection") == "connected")
        eventually(
            "the job listed", lambda: browser.find_elements(By.CSS_SELECTOR, f'[data-job-id="{job["id"]}"]')
        )
        # The quota meters are filled by script (no inline style), and one shows the running job.
        eventually(
            "a quota meter in use",
            lambda: any(
                float(m.get_attribute("value") or 0) > 0
                for m in browser.find_elements(By.CSS_SELECTOR, "#quotas meter")
            ),
        )
        assert violations(browser) == []
        # The detection works: an inline style attribute is refused and reported.
        browser.execute_script("document.body.setAttribute('style', 'color: red')")
        found = eventually("the provoked violation", lambda: violations(browser))
        assert any("style-src" in v for v in found), found
    finally:
        with shared_server.client() as client:
            client.post(f"/api/jobs/{job['id']}/cancel")


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_the_docs_pages_run_under_their_csp(shared_server: Server, browser: WebDriver, path: str) -> None:
    browser.get(shared_server.url + path)
    entries = eventually(
        "the page's scripts to have run or failed to load",
        lambda: (
            browser.execute_script("return document.readyState") == "complete" and [*console(browser), {}]
        ),
    )
    messages = [json.dumps(e) for e in entries if e]
    problems = [m for m in messages if "Content Security Policy" in m]
    problems += browser.execute_script("return window.__cspViolations || []")
    assert problems == [], problems
    if path == "/docs":
        rendered = browser.find_elements(By.CSS_SELECTOR, "#swagger-ui .swagger-ui")
        ran = any("SwaggerUIBundle is not defined" in m for m in messages)
        assert rendered or ran, messages  # the inline script ran: with the CDN, or without it
