"""`merge_subjob` over MCP from a real Claude Code worker (fake model): the child's file appears
in the parent's worktree and ends on the parent's branch and in the job's result (issue 15)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.agents.conftest import Scenarios, make_repo, workdir_of
from tests.fakes.fake_anthropic import Step, text, tool_result_texts, tool_use
from tests.integration.test_engine_lifecycle import log_lines, submit, wait_final, workers_of
from tests.support.servers import Server

TIMEOUT = 90.0


def show(repo: Any, ref: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), "show", ref], capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.parametrize("transport", ["http", "stdio"])
def test_claude_worker_merges_its_sub_job_over_mcp(
    claude_server: Server, scenarios: Scenarios, transport: str
) -> None:
    def script(body: dict[str, Any], turn: int, n: int) -> Step:
        if turn == 0:
            return tool_use(
                "mcp__orchestrator__spawn_subjob",
                {
                    "task_description": "write child.txt",
                    "agent": "simulated",
                    "agent_options": {"duration_seconds": 0, "files": {"child.txt": "from the child\n"}},
                    "wait": True,
                },
            )
        if turn == 1:
            found = re.search(r"Job (j_[0-9a-f]{12}): COMPLETED", tool_result_texts(body)[0])
            assert found, tool_result_texts(body)
            return tool_use("mcp__orchestrator__merge_subjob", {"job_id": found.group(1)})
        return text("Merged my sub-job.")

    tag = scenarios.add(f"merge-{transport}", script)
    repo = make_repo(claude_server.root, f"merge-repo-{transport}")
    with claude_server.client() as client:
        job = submit(
            client,
            task_description=f"{tag} delegate and merge",
            agent="claude-code",
            repository=str(repo),
            agent_options={"mcp_transport": transport},
        )
        done = wait_final(client, job["id"], timeout=TIMEOUT)
        [worker] = workers_of(client, job["id"])
        assert done["status"] == "COMPLETED", (done, worker, log_lines(client, worker["id"])[-5:])
    merged = tool_result_texts(scenarios.bodies[f"merge-{transport}"][-1])[1]
    assert merged.startswith("Merged orchestrator/j_") and "child.txt" in merged, merged
    assert show(repo, f"{worker['branch']}:child.txt") == "from the child\n"
    assert show(repo, f"orchestrator/{job['id']}/result:child.txt") == "from the child\n"


def test_claude_resolver_resolves_a_scripted_conflict(claude_server: Server, scenarios: Scenarios) -> None:
    """Two Claude Code workers write the same line differently; the engine hands the conflict to a
    Claude Code resolver (same profile), which keeps both: the job COMPLETES with both intents."""

    def script(body: dict[str, Any], turn: int, n: int) -> Step:
        workdir = workdir_of(body)
        if "resolving a git merge conflict" in json.dumps(body["messages"]):
            if turn == 0:
                return tool_use("Read", {"file_path": f"{workdir}/shared.txt"})
            if turn == 1:
                current = Path(workdir, "shared.txt").read_text()
                kept = [
                    line
                    for line in current.splitlines(keepends=True)
                    if not line.startswith(("<<<<<<< ", ">>>>>>> ")) and line.rstrip("\n") != "======="
                ]
                return tool_use("Write", {"file_path": f"{workdir}/shared.txt", "content": "".join(kept)})
            return text("Resolved: kept both lines.")
        if turn == 0:
            line = f"line from {Path(workdir).name}\n"
            return tool_use("Write", {"file_path": f"{workdir}/shared.txt", "content": line})
        return text("Wrote my line.")

    tag = scenarios.add("resolve-conflict", script)
    repo = make_repo(claude_server.root, "resolve-repo")
    with claude_server.client() as client:
        job = submit(
            client,
            task_description=f"{tag} write your line",
            agent="claude-code",
            worker_count=2,
            repository=str(repo),
        )
        done = wait_final(client, job["id"], timeout=TIMEOUT * 2)
        workers = workers_of(client, job["id"])
        assert done["status"] == "COMPLETED", (done, workers)
    writers = [w for w in workers if (w["result"] or {}).get("role") != "resolver"]
    resolvers = [w for w in workers if (w["result"] or {}).get("role") == "resolver"]
    assert len(writers) == 2 and len(resolvers) == 1 and resolvers[0]["status"] == "COMPLETED", workers
    content = show(repo, f"orchestrator/{job['id']}/result:shared.txt")
    assert sorted(content.splitlines()) == sorted(f"line from {w['id']}" for w in writers), content
