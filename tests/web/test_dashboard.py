"""The dashboard in a real browser: headless Chromium driven by Selenium against a real server
(with its engine) on the database under test, holding 10,000 seeded jobs.

Needs Debian's `chromium` and `chromium-driver` (scripts/test.sh installs them). Without them
these tests fail, on purpose: the dashboard is part of the product.

Timings (first render, next page, filter, search) are printed, never asserted: the machine may be
busy. They are recorded in docs/BENCHMARKS.md. `UPDATE_DOCS_SCREENSHOT=1` refreshes the README's
pictures (docs/dashboard*.png).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from tests.support.seed import SeededJob, seed_fleet
from tests.support.servers import Server, ServerFactory, token

selenium = pytest.importorskip("selenium", reason="selenium is a dev dependency: pip install -e '.[dev]'")

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMEDRIVER_CANDIDATES = ("/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver")
INSTALL_HINT = "install them with: sudo apt-get install -y chromium chromium-driver"
# 7,693 trees of which every tenth has three sub-jobs: 10,003 jobs.
ROOTS = 7693
WIDTH, HEIGHT = 1400, 900


def _find(candidates: tuple[str, ...], name: str) -> str | None:
    for path in candidates:
        if Path(path).exists():
            return path
    return shutil.which(name)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, list[SeededJob]]]:
    factory = ServerFactory(tmp_path_factory.mktemp("dashboard"))
    try:
        server = factory.start()
        started = time.monotonic()
        jobs = seed_fleet(server, ROOTS)
        print(f"\nseeded {len(jobs)} jobs in {time.monotonic() - started:.1f}s")
        yield server, jobs
    finally:
        factory.close()


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
        f"--window-size={WIDTH},{HEIGHT}",
        f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-', dir=tmp_path)}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    except WebDriverException as exc:
        pytest.fail(f"could not start headless Chromium ({exc.msg}); {INSTALL_HINT}")
    try:
        yield driver
        # No script error and no Content-Security-Policy violation in any test.
        # (Answers a test provoked on purpose, 401 and 422, are shown by the page, not errors.)
        provoked = ("status of 401", "status of 422")
        errors = [
            e
            for e in driver.get_log("browser")
            if e.get("level") == "SEVERE" and not any(p in e["message"] for p in provoked)
        ]
        assert errors == [], errors
    finally:
        driver.quit()


def eventually(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    """Retry `check` until it returns something truthy (generous: the machine may be busy)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except (StaleElementReferenceException, WebDriverException, AssertionError, LookupError) as exc:
            last = exc
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def css(driver: WebDriver | WebElement, selector: str) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, selector)


def text_of(driver: WebDriver, selector: str) -> str:
    found = css(driver, selector)
    return found[0].text if found else ""


def row_ids(driver: WebDriver) -> list[str]:
    return [str(li.get_attribute("data-job-id")) for li in css(driver, "#jobs > li.job")]


def api(server: Server) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token()}"}, timeout=30)


def api_ids(server: Server, **params: Any) -> list[str]:
    with api(server) as client:
        body = client.get("/api/jobs", params={"limit": 50, **params}).json()
    return [job["id"] for job in body["jobs"]]


def open_dashboard(driver: WebDriver, server: Server, path: str = "/") -> float:
    """Load `path` with a token in the session; returns seconds until the first page of rows."""
    driver.get(server.url + "/")  # same origin, to put the token in the session
    driver.execute_script("sessionStorage.setItem('orchestrator.token', arguments[0])", token())
    started = time.monotonic()
    driver.get(server.url + path)
    eventually("the first rows", lambda: css(driver, "#jobs > li.job") or css(driver, "#jobs > li.empty"))
    return time.monotonic() - started


def query(driver: WebDriver) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlparse(driver.current_url).query).items()}


def shoot(driver: WebDriver, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / name
    assert driver.save_screenshot(str(shot)), "screenshot failed"
    if os.environ.get("UPDATE_DOCS_SCREENSHOT") == "1":
        shutil.copyfile(shot, REPO / "docs" / name)


def fits_the_window(driver: WebDriver) -> bool:
    return bool(
        driver.execute_script("return document.documentElement.scrollHeight <= window.innerHeight + 1")
    )


# --- 10,000 jobs ---------------------------------------------------------------------------------


def test_first_render_of_ten_thousand_jobs(fleet: tuple[Server, list[SeededJob]], browser: WebDriver) -> None:
    server, jobs = fleet
    assert len(jobs) >= 10_000
    seconds = open_dashboard(browser, server)
    in_page = browser.find_element(By.TAG_NAME, "body").get_attribute("data-first-render-ms")
    list_ms = browser.find_element(By.TAG_NAME, "body").get_attribute("data-list-ms")
    print(
        f"\nfirst render of {len(jobs)} jobs: {seconds:.2f}s as the test saw it; in the page {in_page} ms "
        f"since navigation, list request + render {list_ms} ms"
    )

    # The first page is the API's first page of trees, newest first; the counts are the server's.
    assert row_ids(browser) == api_ids(server, root_only="true")
    with api(server) as client:
        counts = client.get("/api/jobs/counts").json()
    assert text_of(browser, '#counts b[data-count-of=""]') == f"{counts['total']:,}"
    for status in ("COMPLETED", "FAILED", "CANCELED"):
        assert text_of(browser, f'#counts b[data-count-of="{status}"]') == f"{counts['counts'][status]:,}"
    assert text_of(browser, "#page-info") == f"1\u201350 of {ROOTS:,} job trees"
    assert fits_the_window(browser), "the page grew past the window"

    # A FAILED job shows its reason in the list; finished trees are collapsed.
    by_id = {j.id: j for j in jobs}
    failed = next(i for i in row_ids(browser) if by_id[i].status == "FAILED")
    reason = text_of(browser, f'li.job[data-job-id="{failed}"] > .job-line .reason')
    assert reason == by_id[failed].status_reason
    assert not [li for li in css(browser, "#jobs ul.children li.job") if li.is_displayed()]

    # Keyboard: down, expand a tree with sub-jobs, open, Escape back to the row.
    with_children = next(i for i in row_ids(browser) if any(j.parent_job_id == i for j in jobs))
    line = css(browser, f'li.job[data-job-id="{with_children}"] > .job-line')[0]
    line.send_keys(Keys.ARROW_RIGHT)
    children = [j.id for j in jobs if j.parent_job_id == with_children]
    eventually(
        "its sub-jobs shown",
        lambda: (
            sorted(
                str(li.get_attribute("data-job-id"))
                for li in css(browser, f'li.job[data-job-id="{with_children}"] > ul > li.job')
                if li.is_displayed()
            )
            == sorted(children)
        ),
    )
    line.send_keys(Keys.ARROW_DOWN)
    focused = browser.switch_to.active_element
    assert focused.get_attribute("data-job-id") in children
    focused.send_keys(Keys.ENTER)
    opened = str(focused.get_attribute("data-job-id"))
    eventually(
        "the panel",
        lambda: text_of(browser, "#panel-title") == opened and query(browser).get("job") == opened,
    )
    eventually(
        "the panel's details", lambda: by_id[opened].task_description in text_of(browser, "#panel-body")
    )
    assert fits_the_window(browser)
    browser.switch_to.active_element.send_keys(Keys.ESCAPE)
    eventually("the panel closed", lambda: not css(browser, "#panel")[0].is_displayed())
    assert browser.switch_to.active_element.get_attribute("data-job-id") == opened
    assert "job" not in query(browser)
    shoot(browser, "dashboard.png")


def test_paging_filters_search_and_back(fleet: tuple[Server, list[SeededJob]], browser: WebDriver) -> None:
    server, jobs = fleet
    open_dashboard(browser, server)
    first_page = row_ids(browser)

    def timed(what: str, act: Callable[[], None], done: Callable[[], bool]) -> None:
        started = time.monotonic()
        act()
        eventually(what, done)
        print(f"\n{what}: {time.monotonic() - started:.2f}s")

    second = api_ids(server, root_only="true", offset=50)
    timed("next page", lambda: css(browser, "#page-next")[0].click(), lambda: row_ids(browser) == second)
    assert query(browser)["page"] == "2"
    assert text_of(browser, "#page-info") == f"51\u2013100 of {ROOTS:,} job trees"
    browser.back()
    eventually("Back to the first page", lambda: row_ids(browser) == first_page)
    browser.forward()
    eventually("Forward to the second page", lambda: row_ids(browser) == second)

    failed = api_ids(server, status="FAILED")
    timed(
        "status filter",
        lambda: css(browser, '#counts button[data-status="FAILED"]')[0].click(),
        lambda: row_ids(browser) == failed,
    )
    assert query(browser) == {"status": "FAILED"}  # a new filter starts at page 1
    assert all(s.text == "FAILED" for s in css(browser, "#jobs > li.job > .job-line .status"))
    css(browser, '#counts button[data-status=""]')[0].click()

    # Search by a sub-job's id: that job alone.
    deep = next(j for j in jobs if j.depth == 2)
    search = css(browser, "#q")[0]
    timed("search by id", lambda: search.send_keys(deep.id), lambda: row_ids(browser) == [deep.id])
    assert query(browser)["q"] == deep.id

    # Search by text, with the agent filter: the API's answer.
    search.clear()
    wanted = api_ids(server, q="billing", agent="codex")
    assert wanted

    def search_text_and_agent() -> None:
        search.send_keys("billing")
        css(browser, "#more-filters summary")[0].click()
        agent = css(browser, "#flt-agent")[0]
        agent.send_keys("codex")
        agent.send_keys(Keys.ENTER)
        agent.send_keys(Keys.TAB)

    timed("search by text and agent", search_text_and_agent, lambda: row_ids(browser) == wanted)
    assert query(browser)["agent"] == "codex" and query(browser)["q"] == "billing"

    # Created before a time, from a link: the trees older than it.
    cut = sorted(j.created_at for j in jobs if j.parent_job_id is None)[ROOTS // 2]
    link = f"/?before={cut.isoformat().replace('+00:00', 'Z')}"
    browser.get(server.url + link)
    older = api_ids(server, root_only="true", created_before=cut.isoformat())
    eventually("created-before from a link", lambda: row_ids(browser) == older)
    assert css(browser, "#flt-before")[0].get_attribute("value")
    assert text_of(browser, "#page-info") == f"1\u201350 of {ROOTS // 2:,} job trees"

    # Nonsense in the URL is reported, not a broken page.
    browser.get(server.url + "/?after=2026-01-02T00:00:00Z&before=2026-01-01T00:00:00Z")
    eventually("the 422 message", lambda: "(422)" in text_of(browser, "#message"))


# --- live ------------------------------------------------------------------------------------------


def test_live_tree_log_deep_link_and_confirmations(
    fleet: tuple[Server, list[SeededJob]], browser: WebDriver
) -> None:
    server, _ = fleet
    open_dashboard(browser, server)
    eventually("connected", lambda: text_of(browser, "#connection") == "connected")

    # Submit from the page: a job whose two workers log, then delegate two sub-jobs.
    css(browser, "#new-job")[0].click()
    css(browser, "#f-task")[0].send_keys("Refactor the billing module")
    workers = css(browser, "#f-workers")[0]
    workers.clear()
    workers.send_keys("2")
    css(browser, "#f-options")[0].send_keys(
        '{"duration_seconds": 3, "progress_interval_seconds": 0.2, "subtasks": ['
        '{"task_description": "Write the tests", "agent_options": {"duration_seconds": 120}},'
        '{"task_description": "Update the docs", "agent_options": {"duration_seconds": 120}}]}'
    )
    css(browser, "#f-submit")[0].click()
    job_id = eventually(
        "the submitted job id",
        lambda: browser.find_element(By.TAG_NAME, "body").get_attribute("data-last-job"),
    )
    # The row arrives from the fleet stream; keep this very element and watch it change.
    row = eventually("the new tree on top", lambda: css(browser, f'#jobs > li.job[data-job-id="{job_id}"]'))[
        0
    ]
    status = css(row, ":scope > .job-line .status")[0]
    eventually("the same row turns RUNNING", lambda: status.text == "RUNNING")
    assert query(browser)["job"] == job_id
    worker_rows = eventually(
        "two workers in the panel",
        lambda: (
            len(css(browser, "#workers tr[data-worker-id]")) == 2
            and css(browser, "#workers tr[data-worker-id]")
        ),
    )
    worker_id = str(worker_rows[0].get_attribute("data-worker-id"))

    # The log beside the panel, inside the window, streaming while sub-jobs appear.
    css(worker_rows[0], 'button[data-action="log"]')[0].click()
    eventually("log lines", lambda: "step 3" in text_of(browser, "#log-lines"))
    assert query(browser)["worker"] == worker_id
    log_box = css(browser, "#log")[0].rect
    panel_box = css(browser, "#panel")[0].rect
    assert log_box["x"] >= panel_box["x"] + panel_box["width"] - 1 and log_box["y"] < HEIGHT / 3
    assert fits_the_window(browser)
    eventually(
        "the sub-jobs in the panel's tree", lambda: len(css(browser, "#panel-children li[data-job-id]")) == 4
    )
    eventually("the sub-jobs in the list's tree", lambda: len(css(row, ":scope > ul > li.job")) == 4)
    eventually("the delegation in the log", lambda: "delegated" in text_of(browser, "#log-lines"))
    assert row.is_displayed() and status.text == "RUNNING"  # still the same element
    shoot(browser, "dashboard-log.png")

    # A deep link to a worker opens its job's panel and its log.
    child_id = str(css(browser, "#panel-children li[data-job-id]")[0].get_attribute("data-job-id"))
    with api(server) as client:
        child_worker = eventually(
            "the sub-job's worker",
            lambda: client.get("/api/supervisor/workers", params={"job_id": child_id}).json()["workers"],
        )[0]["id"]
    browser.get(f"{server.url}/?worker={child_worker}")
    eventually("the panel of its job", lambda: text_of(browser, "#panel-title") == child_id)
    eventually(
        "its log",
        lambda: "step" in text_of(browser, "#log-lines") and child_worker in text_of(browser, "#log-title"),
    )
    assert query(browser) == {"job": child_id, "worker": child_worker}
    shoot(browser, "dashboard-job.png")

    # Terminate asks first and says what stops; dismissing changes nothing.
    terminate = f'#workers tr[data-worker-id="{child_worker}"] button[data-action="terminate"]'
    eventually("terminate", lambda: css(browser, terminate)[0].is_enabled())
    css(browser, terminate)[0].click()
    dialog = eventually(
        "the dialog", lambda: [d for d in css(browser, "dialog#confirm") if d.is_displayed()]
    )[0]
    assert child_worker in dialog.text and "stopped" in dialog.text
    css(browser, "#confirm-cancel")[0].click()
    eventually("the dialog closed", lambda: not dialog.is_displayed())
    with api(server) as client:
        assert client.get(f"/api/supervisor/workers/{child_worker}").json()["status"] == "RUNNING"
    worker_status = css(browser, f'#workers tr[data-worker-id="{child_worker}"] .status')[0]
    css(browser, terminate)[0].click()
    eventually("the dialog again", lambda: dialog.is_displayed())
    css(browser, "#confirm-ok")[0].click()
    eventually("the same row shows TERMINATED", lambda: worker_status.text == "TERMINATED")
    eventually("the log sees the end", lambda: "end of log" in text_of(browser, "#log-lines"))

    # Cancel the whole tree from its root: the dialog counts what stops; the list row follows.
    browser.get(f"{server.url}/?job={job_id}")
    row = eventually("the tree", lambda: css(browser, f'#jobs > li.job[data-job-id="{job_id}"]'))[0]
    status = css(row, ":scope > .job-line .status")[0]
    eventually("cancel", lambda: css(browser, "#cancel-job")[0].is_enabled())
    css(browser, "#cancel-job")[0].click()
    dialog = css(browser, "dialog#confirm")[0]  # a new page
    eventually("the cancel dialog", lambda: dialog.is_displayed())
    assert "its 4 sub-jobs" in dialog.text and "live workers will be terminated" in dialog.text, dialog.text
    css(browser, "#confirm-cancel")[0].click()
    with api(server) as client:
        assert client.get(f"/api/jobs/{job_id}").json()["status"] == "RUNNING"
    css(browser, "#cancel-job")[0].click()
    eventually("the cancel dialog again", lambda: dialog.is_displayed())
    css(browser, "#confirm-ok")[0].click()
    eventually("the same row shows CANCELED", lambda: status.text == "CANCELED")
    # The sub-job whose worker was terminated may have failed first; the others are canceled.
    eventually(
        "the panel's sub-jobs final",
        lambda: (
            sorted(s.text for s in css(browser, "#panel-children .status"))
            in (["CANCELED"] * 4, ["CANCELED", "CANCELED", "CANCELED", "FAILED"])
        ),
    )

    # Back returns to the worker's deep link.
    browser.back()
    eventually("Back", lambda: query(browser).get("worker") == child_worker)
