"""The job panel's result (issue 15), in headless Chromium: result branch and commit, merged
branches, a resolved conflict, and the diff per file (collapsible, monospace, coloured)."""

from __future__ import annotations

from pathlib import Path

from selenium.webdriver.remote.webdriver import WebDriver

from tests.integration.test_engine_lifecycle import submit, wait_final
from tests.integration.test_engine_workspaces_tokens import git, make_repo
from tests.support.servers import ServerFactory
from tests.web.test_dashboard import browser, css, eventually, open_dashboard, shoot

__all__ = ["browser"]

FILES = {
    "shared.txt": "line written by worker {index}\n",
    "src/module-{index}.py": "def work():\n    return {index}\n",
}


def test_job_panel_shows_the_result_and_its_diff(
    servers: ServerFactory, browser: WebDriver, tmp_path: Path
) -> None:
    repo = make_repo(servers.root)
    server = servers.start()
    with server.client() as client:
        job = submit(
            client,
            task_description="two workers, one shared line",
            worker_count=2,
            repository=str(repo),
            agent_options={"duration_seconds": 0, "files": FILES, "resolve": "both"},
        )
        assert wait_final(client, job["id"], timeout=60)["status"] == "COMPLETED"
        result = client.get(f"/api/jobs/{job['id']}/result").json()
    open_dashboard(browser, server, f"/?job={job['id']}")
    branch = f"orchestrator/{job['id']}/result"
    eventually(
        "the result branch",
        lambda: css(browser, "#result-branch") and css(browser, "#result-branch")[0].text == branch,
    )
    assert css(browser, "#result-commit")[0].text == result["commit"][:12]
    assert css(browser, "#result-commit")[0].get_attribute("title") == git(repo, "rev-parse", branch)
    assert "3 file(s)" in css(browser, "#result-stat")[0].text
    merged = [li.text for li in css(browser, "#result-merged li")]
    assert len(merged) == 2 and all(m.startswith(f"orchestrator/{job['id']}/w_") for m in merged), merged
    conflicts = css(browser, "#result-conflicts li")
    assert len(conflicts) == 1 and "shared.txt" in conflicts[0].text and "resolved by w_" in conflicts[0].text
    files = css(browser, "#result-diff details.file-diff")
    assert sorted(str(f.get_attribute("data-path")) for f in files) == [
        "shared.txt", "src/module-0.py", "src/module-1.py",
    ]  # fmt: skip
    shared = next(f for f in files if f.get_attribute("data-path") == "shared.txt")
    assert shared.get_attribute("open") is not None
    added = [line.text for line in css(shared, ".line.add")]
    assert added == ["+line written by worker 0", "+line written by worker 1"], added
    style = browser.execute_script(
        "const s = getComputedStyle(arguments[0]); return [s.fontFamily, s.backgroundColor];",
        css(shared, ".line.add")[0],
    )
    assert "monospace" in style[0] and style[1] not in ("rgba(0, 0, 0, 0)", "transparent"), style
    browser.execute_script("arguments[0].scrollIntoView()", css(browser, "#result")[0])
    shoot(browser, "dashboard-result.png")
    css(shared, "summary")[0].click()  # collapsible
    eventually("the file collapsed", lambda: shared.get_attribute("open") is None)
    assert not css(shared, ".line.add")[0].is_displayed()
