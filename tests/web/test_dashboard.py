"""The dashboard in a real browser: headless Chromium driven by Selenium against a real server.

Needs Debian's `chromium` and `chromium-driver` (apt-get install -y chromium chromium-driver).
Without them this test fails, on purpose: the dashboard is part of the product.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.servers import Server, ServerFactory, token

selenium = pytest.importorskip("selenium", reason="selenium is a dev dependency: pip install -e '.[dev]'")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER_CANDIDATES = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
INSTALL_HINT = "install them with: sudo apt-get install -y chromium chromium-driver"


def _find(candidates: tuple[str, ...], name: str) -> str | None:
    for path in candidates:
        if Path(path).exists():
            return path
    return shutil.which(name)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[WebDriver]:
    binary = _find(CHROMIUM_CANDIDATES, "chromium")
    driver_path = _find(CHROMEDRIVER_CANDIDATES, "chromedriver")
    if binary is None or driver_path is None:
        pytest.fail(f"Chromium and chromedriver are required for the dashboard test; {INSTALL_HINT}")
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
    try:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    except WebDriverException as exc:
        pytest.fail(f"could not start headless Chromium ({exc.msg}); {INSTALL_HINT}")
    try:
        yield driver
    finally:
        driver.quit()


def eventually(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Retry `check` (tolerating a re-render under our feet) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (StaleElementReferenceException, WebDriverException) as exc:
            last = exc
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def text_of(driver: WebDriver, css: str) -> str:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    return found[0].text if found else ""


def click(driver: WebDriver, css: str) -> bool:
    found = driver.find_elements(By.CSS_SELECTOR, css)
    if found and found[0].is_enabled():
        found[0].click()
        return True
    return False


def fill(driver: WebDriver, css: str, value: str) -> None:
    field = driver.find_element(By.CSS_SELECTOR, css)
    field.clear()
    field.send_keys(value)


def test_dashboard_submit_watch_terminate(servers: ServerFactory, browser: WebDriver) -> None:
    server: Server = servers.start()
    browser.get(server.url + "/")
    assert "Parallel AI Orchestrator" in browser.title

    # A bad token gets a clear message, not a broken page.
    fill(browser, "#token-input", "not-a-token")
    browser.find_element(By.CSS_SELECTOR, "#token-save").click()
    eventually("the 401 message", lambda: "(401)" in text_of(browser, "#message"))

    fill(browser, "#token-input", token())
    browser.find_element(By.CSS_SELECTOR, "#token-save").click()
    eventually("connected", lambda: text_of(browser, "#connection") == "connected")
    assert browser.execute_script("return sessionStorage.getItem('orchestrator.token')")

    fill(browser, "#f-task", "Build the dashboard demo")
    fill(browser, "#f-workers", "2")
    fill(browser, "#f-options", '{"duration_seconds": 30, "progress_interval_seconds": 0.3}')
    browser.find_element(By.CSS_SELECTOR, "#f-submit").click()
    job_id = eventually(
        "the submitted job id",
        lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-last-job"),
    )

    job_status = f'li.job[data-job-id="{job_id}"] > .job-line .status'
    eventually("the job turns RUNNING without a reload", lambda: text_of(browser, job_status) == "RUNNING")
    rows = f'#workers tr[data-job-id="{job_id}"]'
    eventually(
        "both workers RUNNING",
        lambda: (
            [r.get_attribute("data-status") for r in browser.find_elements(By.CSS_SELECTOR, rows)]
            == ["RUNNING", "RUNNING"]
        ),
    )
    eventually(
        "quota bar shows 2 slots at depth 0",
        lambda: text_of(browser, '.quota[data-depth="0"] .meta') == "2 / 10",
    )

    # The live log pane of the first worker.
    worker_id = browser.find_elements(By.CSS_SELECTOR, rows)[0].get_attribute("data-worker-id")
    eventually(
        "log button", lambda: click(browser, f'tr[data-worker-id="{worker_id}"] button[data-action="log"]')
    )
    eventually("log lines stream in", lambda: len(text_of(browser, "#log-lines").splitlines()) >= 3)

    # Terminate it with a click; the table and the log pane show it.
    eventually(
        "terminate",
        lambda: click(browser, f'tr[data-worker-id="{worker_id}"] button[data-action="terminate"]'),
    )
    eventually(
        "the worker shows TERMINATED",
        lambda: text_of(browser, f'tr[data-worker-id="{worker_id}"] .status') == "TERMINATED",
    )
    eventually("the log pane sees the end", lambda: "end of log" in text_of(browser, "#log-lines"))

    # The other worker still runs; cancel the job from its row: the whole job stops.
    cancel = f'li.job[data-job-id="{job_id}"] > .job-line button[data-action="cancel"]'
    eventually("cancel", lambda: click(browser, cancel))
    eventually("the job shows CANCELED", lambda: text_of(browser, job_status) == "CANCELED")
    eventually(
        "every worker ended",
        lambda: (
            [r.get_attribute("data-status") for r in browser.find_elements(By.CSS_SELECTOR, rows)]
            == ["TERMINATED", "TERMINATED"]
        ),
    )

    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token()}"}) as client:
        worker = client.get(f"/api/supervisor/workers/{worker_id}").json()
        assert worker["status"] == "TERMINATED"
        assert worker["status_reason"].startswith("terminated by user:")

    # The screenshot: the finished job, plus a running tree so the picture shows live state.
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token()}"}) as client:
        client.post(
            "/api/jobs/submit",
            json={
                "task_description": "Refactor the billing module",
                "worker_count": 3,
                "agent_options": {
                    "duration_seconds": 1,
                    "subtasks": [
                        {"task_description": "Write the tests", "agent_options": {"duration_seconds": 20}}
                    ],
                },
            },
        ).raise_for_status()
    eventually(
        "the second tree's child job", lambda: len(browser.find_elements(By.CSS_SELECTOR, "li.job")) >= 5
    )
    time.sleep(1.0)
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    assert browser.save_screenshot(str(shot)), "screenshot failed"
    if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":  # the README's picture, refreshed on request
        shutil.copyfile(shot, REPO / "docs" / "dashboard.png")
    errors = [
        e
        for e in browser.get_log("browser")
        if e.get("level") == "SEVERE" and "401" not in e.get("message", "")
    ]
    assert errors == [], errors
