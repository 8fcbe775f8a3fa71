"""The real `claude` CLI as orchestrator workers, against a fake Anthropic API on 127.0.0.1.

One orchestrator server and one fake serve the module; each test tags its task `[[t:<name>]]` and
the fake answers that test's requests from its own script.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import httpx
import pytest

from tests.agents.conftest import Scenarios, make_repo, workdir_of
from tests.fakes.fake_anthropic import FakeAnthropic, Step, error, text, tool_result_texts, tool_use
from tests.integration.test_engine_lifecycle import log_lines, submit, wait_final, workers_of
from tests.support.servers import Server, token

TIMEOUT = 90.0


def events_of(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = client.get(f"/api/jobs/{job_id}/events").json()["events"]
    return events


def usage_of(client: httpx.Client, job_id: str) -> dict[str, Any]:
    response = client.get(f"/api/jobs/{job_id}/usage")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def test_write_tool_lands_on_the_worker_branch_with_cost(
    claude_server: Server, scenarios: Scenarios, fake: FakeAnthropic
) -> None:
    def script(body: dict[str, Any], turn: int, n: int) -> Step:
        if turn == 0:
            path = f"{workdir_of(body)}/hello.txt"
            return tool_use("Write", {"file_path": path, "content": "hello from claude\n"}, text="Writing.")
        return text("Done: wrote hello.txt.")

    tag = scenarios.add("write", script)
    repo = make_repo(claude_server.root, "write-repo")
    with claude_server.client() as client:
        job = submit(
            client, task_description=f"{tag} write hello.txt", agent="claude-code", repository=str(repo)
        )
        done = wait_final(client, job["id"], timeout=TIMEOUT)
        [worker] = workers_of(client, job["id"])
        assert done["status"] == "COMPLETED", (done, worker, log_lines(client, worker["id"])[-5:])
        assert worker["status_reason"] == "completed"
        result = worker["result"]
        assert result["is_error"] is False and result["result"] == "Done: wrote hello.txt."
        assert result["num_turns"] == 2 and result["total_cost_usd"] > 0 and result["session_id"]
        assert result["usage"]["input_tokens"] > 0
        shown = subprocess.run(
            ["git", "-C", str(repo), "show", f"{worker['branch']}:hello.txt"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert shown.stdout == "hello from claude\n"
        assert "1 file changed" in (worker["diff_stat"] or "")
        usage = usage_of(client, job["id"])
        assert abs(usage["cost_usd"] - result["total_cost_usd"]) < 1e-6
        assert usage["input_tokens"] >= result["usage"]["input_tokens"] and usage["output_tokens"] > 0
        kinds = [e["kind"] for e in events_of(client, job["id"])]
        assert {"agent.init", "agent.message", "agent.tool_use", "agent.result"} <= set(kinds)
        init = next(e for e in events_of(client, job["id"]) if e["kind"] == "agent.init")
        assert {"name": "orchestrator", "status": "connected"}.items() <= init["data"]["mcp_servers"][
            0
        ].items()
        assert "mcp__orchestrator__spawn_subjob" in init["data"]["tools"]
    # The worker's request went to the fake with the server's key, and its HOME is its own.
    request = scenarios.bodies["write"][0]
    assert "hello.txt" in str(request["messages"])
    assert not fake.problems


@pytest.mark.parametrize("transport", ["http", "stdio"])
def test_mcp_spawn_subjob_runs_a_child_and_reports_tool_errors(
    claude_server: Server, scenarios: Scenarios, transport: str
) -> None:
    def script(body: dict[str, Any], turn: int, n: int) -> Step:
        if turn == 0:  # a refused request comes back as a tool error, not a crash
            return tool_use(
                "mcp__orchestrator__spawn_subjob", {"task_description": "too big", "worker_count": 99}
            )
        if turn == 1:
            return tool_use(
                "mcp__orchestrator__spawn_subjob",
                {
                    "task_description": "child work",
                    "agent": "simulated",
                    "agent_options": {"duration_seconds": 0.2},
                    "wait": True,
                },
            )
        return text("My sub-job finished.")

    tag = scenarios.add(f"spawn-{transport}", script)
    with claude_server.client() as client:
        job = submit(
            client,
            task_description=f"{tag} delegate",
            agent="claude-code",
            agent_options={"mcp_transport": transport},
        )
        done = wait_final(client, job["id"], timeout=TIMEOUT)
        [worker] = workers_of(client, job["id"])
        config = json.loads((claude_server.root / "data" / "runs" / worker["id"] / "mcp.json").read_text())
        assert config["mcpServers"]["orchestrator"]["type"] == transport
        init = next(e for e in events_of(client, job["id"]) if e["kind"] == "agent.init")
        assert {"name": "orchestrator", "status": "connected"}.items() <= init["data"]["mcp_servers"][
            0
        ].items()
        assert done["status"] == "COMPLETED", (done, worker, log_lines(client, worker["id"])[-5:])
        children = client.get("/api/jobs", params={"parent_job_id": job["id"]}).json()["jobs"]
        assert len(children) == 1
        child = children[0]
        assert child["depth"] == 1 and child["agent"] == "simulated" and child["status"] == "COMPLETED"
        assert child["finished_at"] <= done["finished_at"]
    results = tool_result_texts(scenarios.bodies[f"spawn-{transport}"][-1])
    assert "Quota exhausted: " in results[0] and "must be at most" in results[0], results
    assert f"Job {child['id']}: COMPLETED" in results[1], results


def test_overloaded_worker_is_parked_and_resumed_in_place(
    claude_server: Server, scenarios: Scenarios
) -> None:
    def script(body: dict[str, Any], turn: int, n: int) -> Step:
        if n <= 3:  # the CLI tries 3 times (CLAUDE_CODE_MAX_RETRIES=2), then reports api error 529
            return error(529)
        return text("Recovered after the overload.")

    tag = scenarios.add("overload", script)
    with claude_server.client() as client:
        job = submit(client, task_description=f"{tag} survive an overload", agent="claude-code")
        done = wait_final(client, job["id"], timeout=TIMEOUT)
        [worker] = workers_of(client, job["id"])
        lines = log_lines(client, worker["id"])
        assert done["status"] == "COMPLETED", (done, worker, lines[-5:])
        events = events_of(client, job["id"])
        kinds = [e["kind"] for e in events]
        assert kinds.count("worker.waiting") == 1 and kinds.count("worker.resumed") == 1, kinds
        waiting = next(e for e in events if e["kind"] == "worker.waiting")
        assert waiting["reason"] == "api error 529 (overloaded_error)", waiting
        # One worker row throughout: RUNNING once, then COMPLETED; the log kept growing.
        changes = [(e["from_status"], e["to_status"]) for e in events if e["kind"] == "worker.status"]
        assert changes == [(None, "IDLE"), ("IDLE", "RUNNING"), ("RUNNING", "COMPLETED")]
        assert worker["result"]["resumes"] == 1 and "waiting" not in worker["result"]
        assert worker["result"]["result"] == "Recovered after the overload."
        assert sum(1 for line in lines if '"type":"result"' in line) == 2
        resumed = next(e for e in events if e["kind"] == "worker.resumed")
        assert resumed["data"]["session_id"] == worker["result"]["session_id"]
    # The resumed run continued the same conversation.
    last = scenarios.bodies["overload"][-1]
    assert "survive an overload" in str(last["messages"])


def test_max_turns_exceeded_fails_with_the_reason(claude_server: Server, scenarios: Scenarios) -> None:
    def script(body: dict[str, Any], turn: int, n: int) -> Step:
        if turn == 0:
            return tool_use("Bash", {"command": "echo one", "description": "first step"})
        return text("never reached")

    tag = scenarios.add("turns", script)
    with claude_server.client() as client:
        job = submit(client, task_description=f"{tag} take many turns", agent="claude-code", max_turns=1)
        done = wait_final(client, job["id"], timeout=TIMEOUT)
        [worker] = workers_of(client, job["id"])
        assert done["status"] == "FAILED"
        assert worker["status"] == "FAILED"
        assert worker["status_reason"] == "error_max_turns: Reached maximum number of turns (1)", worker
        assert worker["result"]["total_cost_usd"] > 0


def test_rejected_credentials_fail_with_that_reason(claude_server: Server, scenarios: Scenarios) -> None:
    tag = scenarios.add("auth", lambda body, turn, n: error(401))
    with claude_server.client() as client:
        job = submit(client, task_description=f"{tag} no entry", agent="claude-code")
        done = wait_final(client, job["id"], timeout=TIMEOUT)
        [worker] = workers_of(client, job["id"])
        assert done["status"] == "FAILED"
        assert worker["status_reason"].startswith("authentication failed: "), worker
        assert "exit code" not in worker["status_reason"]
        assert not [e for e in events_of(client, job["id"]) if e["kind"] == "worker.waiting"]


def test_budget_stops_the_tree_and_refuses_children(claude_server: Server, scenarios: Scenarios) -> None:
    def script(body: dict[str, Any], turn: int, n: int) -> Step:
        if n == 1:  # the first worker spends far more than the budget at once
            return text("expensive answer", input_tokens=200_000, output_tokens=100)
        return text("slow answer", delay=60)

    tag = scenarios.add("budget", script)
    repo = make_repo(claude_server.root, "budget-repo")
    with claude_server.client() as client:
        job = submit(
            client,
            task_description=f"{tag} spend",
            agent="claude-code",
            worker_count=2,
            max_cost_usd=0.01,
            repository=str(repo),
        )
        done = wait_final(client, job["id"], timeout=TIMEOUT)
        workers = workers_of(client, job["id"])
        statuses = sorted(w["status"] for w in workers)
        assert statuses == ["COMPLETED", "TERMINATED"], workers
        stopped = next(w for w in workers if w["status"] == "TERMINATED")
        assert stopped["status_reason"].startswith(f"budget: the tree of job {job['id']} spent $"), stopped
        assert stopped["branch"] and stopped["commit"]  # its work was committed to its branch
        assert done["status"] == "FAILED"
        usage = usage_of(client, job["id"])
        assert usage["cost_usd"] >= 0.01 and usage["remaining_usd"] < 0
        refused = client.post(
            "/api/jobs/submit",
            json={"task_description": "more", "parent_job_id": job["id"], "depth": 1, "agent": "simulated"},
        )
        assert refused.status_code == 400
        assert "Budget exhausted" in refused.json()["detail"] and job["id"] in refused.json()["detail"]


def test_child_budgets_are_reserved_from_the_parent(claude_server: Server) -> None:
    with claude_server.client() as client:
        root = submit(client, agent="simulated", max_cost_usd=1.0, agent_options={"duration_seconds": 30})

        def child(amount: float) -> httpx.Response:
            return client.post(
                "/api/jobs/submit",
                json={
                    "task_description": "child",
                    "parent_job_id": root["id"],
                    "depth": 1,
                    "agent": "simulated",
                    "max_cost_usd": amount,
                    "agent_options": {"duration_seconds": 30},
                },
            )

        assert child(2.0).status_code == 400
        first = child(0.6)
        assert first.status_code == 201, first.text
        second = child(0.6)
        assert second.status_code == 400 and "exceeds the remaining budget" in second.json()["detail"]
        usage = usage_of(client, root["id"])
        assert abs(usage["reserved_usd"] - 0.6) < 1e-9 and abs(usage["remaining_usd"] - 0.4) < 1e-9
        # Canceling the child refunds its unspent reservation.
        assert client.post(f"/api/jobs/{first.json()['id']}/cancel").status_code == 200
        assert abs(usage_of(client, root["id"])["remaining_usd"] - 1.0) < 1e-9
        assert child(0.9).status_code == 201
        assert client.post(f"/api/jobs/{root['id']}/cancel").status_code == 200


def test_missing_cli_is_a_400_that_says_what_to_install(claude_server: Server, tmp_path: Any) -> None:
    # codex is not on the server's PATH (nor configured): submitting to it says what to install.
    with claude_server.client() as client:
        response = client.post("/api/jobs/submit", json={"task_description": "t", "agent": "codex"})
        assert response.status_code == 400
        assert "npm install -g @openai/codex" in response.json()["detail"]
        assert "ORCHESTRATOR_CODEX_BIN" in response.json()["detail"]
        bad = client.post(
            "/api/jobs/submit",
            json={
                "task_description": "t",
                "agent": "claude-code",
                "agent_options": {"permission_mode": "yolo"},
            },
        )
        assert bad.status_code in (400, 422) and "permission_mode" in bad.text
    assert token()  # tokens made here verify on the server
