"""Agents without MCP delegate with the CLI: `orchestrator submit --parent "$ORCHESTRATOR_JOB_ID" --wait`."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.integration.test_engine_lifecycle import log_lines, wait_final, workers_of
from tests.support.servers import ServerFactory

ORCHESTRATOR = Path(sys.executable).parent / "orchestrator"


def test_worker_submits_a_child_with_the_cli_and_its_token(servers: ServerFactory) -> None:
    profile = servers.root / "agents.toml"
    script = (
        f'{ORCHESTRATOR} submit --parent "$ORCHESTRATOR_JOB_ID" --agent simulated '
        '-o duration_seconds=0.1 --wait "child via the cli"; echo "submit exit $?"'
    )
    profile.write_text('[agents.delegator]\ncommand = ["bash", "-c", \'\'\'' + script + "''']\n")
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=str(profile))
    with server.client() as client:
        job = client.post(
            "/api/jobs/submit", json={"task_description": "delegate", "agent": "delegator"}
        ).json()
        done = wait_final(client, job["id"], timeout=60)
        [worker] = workers_of(client, job["id"])
        lines = log_lines(client, worker["id"])
        assert done["status"] == "COMPLETED", (done, lines)
        assert lines[-1] == "submit exit 0", lines
        [child] = client.get("/api/jobs", params={"parent_job_id": job["id"]}).json()["jobs"]
        assert child["status"] == "COMPLETED" and child["depth"] == 1
        assert child["task_description"] == "child via the cli"
