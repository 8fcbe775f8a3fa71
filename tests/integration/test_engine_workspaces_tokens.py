"""Git worktrees per worker, and the delegated worker token confined to its subtree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.integration.test_engine_lifecycle import log_lines, submit, wait_final, workers_of
from tests.support.agent_scripts import API_CALL
from tests.support.servers import ServerFactory
from tests.support.wait import wait_until

PROBE = (
    API_CALL
    + r"""
import json, os, sys, urllib.request, urllib.error
other = os.environ["OTHER_JOB"] if "OTHER_JOB" in os.environ else sys.stdin.read().strip()
results = {}
results["own_job"] = call("GET", "/api/jobs/" + JOB)[0]
code, child = call("POST", "/api/jobs/submit", {"task_description": "child", "depth": 1, "parent_job_id": JOB,
                   "agent_options": {"duration_seconds": 0}})
results["submit_child"] = code
results["read_child"] = call("GET", "/api/jobs/" + child["id"])[0]
results["submit_root"] = call("POST", "/api/jobs/submit", {"task_description": "root"})[0]
results["submit_under_other"] = call("POST", "/api/jobs/submit", {"task_description": "x", "depth": 1, "parent_job_id": other})[0]
results["read_other"] = call("GET", "/api/jobs/" + other)[0]
results["list_total"] = call("GET", "/api/jobs")[1]["total"]
results["quotas"] = call("GET", "/api/resources/quotas")[0]
results["allocate"] = call("POST", "/api/resources/allocate", {"job_id": JOB, "depth": 0, "worker_count": 1})[0]
results["terminate_self"] = call("POST", "/api/supervisor/workers/" + os.environ["ORCHESTRATOR_WORKER_ID"] + "/terminate")[0]
results["cancel_own_job"] = call("POST", "/api/jobs/" + JOB + "/cancel")[0]
results["own_logs"] = call("GET", "/api/supervisor/workers/" + os.environ["ORCHESTRATOR_WORKER_ID"] + "/logs")[0]
print("RESULTS " + json.dumps(results), flush=True)
"""
)

WRITER = r"""
import json, os, pathlib, time, urllib.request
index = os.environ["WORKER_INDEX"]
pathlib.Path(f"work-{index}.txt").write_text(f"written by worker {index}\n")
if os.environ.get("DELEGATE") == "1" and index == "0":
    body = {"task_description": "child", "depth": int(os.environ["ORCHESTRATOR_DEPTH"]) + 1,
            "parent_job_id": os.environ["ORCHESTRATOR_JOB_ID"], "agent": "child_writer"}
    req = urllib.request.Request(os.environ["ORCHESTRATOR_URL"] + "/api/jobs/submit", data=json.dumps(body).encode(), method="POST")
    req.add_header("Authorization", "Bearer " + os.environ["ORCHESTRATOR_TOKEN"])
    req.add_header("Content-Type", "application/json")
    child = json.loads(urllib.request.urlopen(req).read())
    while True:
        req = urllib.request.Request(os.environ["ORCHESTRATOR_URL"] + "/api/jobs/" + child["id"])
        req.add_header("Authorization", "Bearer " + os.environ["ORCHESTRATOR_TOKEN"])
        status = json.loads(urllib.request.urlopen(req).read())["status"]
        if status in ("COMPLETED", "FAILED", "CANCELED"):
            print("child", status, flush=True)
            raise SystemExit(0 if status == "COMPLETED" else 1)
        time.sleep(0.1)
"""

CHILD_WRITER = r"""
import pathlib
seen = sorted(p.name for p in pathlib.Path(".").glob("*.txt"))
print("child sees", seen, flush=True)
pathlib.Path("child.txt").write_text("child was here\n")
raise SystemExit(0 if "work-0.txt" in seen else 7)
"""


def profiles(root: Path) -> str:
    scripts = root / "agent-scripts"  # bound read-only into the worker sandbox
    scripts.mkdir(exist_ok=True)
    for name, body in (("probe.py", PROBE), ("writer.py", WRITER), ("child_writer.py", CHILD_WRITER)):
        (scripts / name).write_text(body)
    py = sys.executable
    binds = f'ro_binds = ["{scripts}"]\n'
    path = root / "agents.toml"
    path.write_text(
        f'[agents.probe]\ncommand = ["{py}", "{scripts / "probe.py"}"]\n{binds}'
        f'[agents.writer]\ncommand = ["{py}", "{scripts / "writer.py"}"]\n{binds}'
        f'[agents.delegating_writer]\ncommand = ["{py}", "{scripts / "writer.py"}"]\n'
        f'env = {{ DELEGATE = "1" }}\n{binds}'
        f'[agents.child_writer]\ncommand = ["{py}", "{scripts / "child_writer.py"}"]\n{binds}'
        '[agents.sleeper]\ncommand = ["bash", "-c", "echo partial > partial.txt; sleep 600"]\n'
        '[agents.quick_writer]\ncommand = ["sh", "-c", "echo quick > quick-$WORKER_INDEX.txt"]\n'
    )
    return str(path)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def make_repo(root: Path) -> Path:
    repo = root / "project"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / "README.md").write_text("project\n")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return repo


def test_worker_token_is_confined_to_its_subtree(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=profiles(servers.root))
    with server.client() as client:
        other = submit(client, agent_options={"duration_seconds": 30})
        # The probe reads the other job's id from its task (stdin): the data dir is not in its sandbox.
        job = submit(client, agent="probe", agent_options={}, task_description=other["id"])
        done = wait_final(client, job["id"])
        (worker,) = workers_of(client, job["id"])
        line = next(x for x in log_lines(client, worker["id"]) if x.startswith("RESULTS "))
        results: dict[str, Any] = json.loads(line.removeprefix("RESULTS "))
        assert results == {
            "own_job": 200,
            "submit_child": 201,
            "read_child": 200,
            "submit_root": 403,
            "submit_under_other": 403,
            "read_other": 403,
            "list_total": 2,  # its own job and the child it made
            "quotas": 403,
            "allocate": 403,
            "terminate_self": 403,
            "cancel_own_job": 403,
            "own_logs": 200,
        }, results
        assert done["status"] == "COMPLETED"
        client.post(f"/api/jobs/{other['id']}/cancel")


def test_worker_token_stops_working_when_the_worker_ends(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=profiles(servers.root))
    with server.client() as client:
        job = submit(client, agent="sleeper")

        def running() -> dict[str, Any] | None:
            workers = workers_of(client, job["id"])
            return workers[0] if workers and workers[0]["status"] == "RUNNING" else None

        worker = wait_until(running, what="worker running")
        environ = Path(f"/proc/{worker['pid']}/environ").read_bytes().decode().split("\0")
        token = dict(item.split("=", 1) for item in environ if "=" in item)["ORCHESTRATOR_TOKEN"]
        headers = {"Authorization": f"Bearer {token}"}
        assert httpx.get(f"{server.url}/api/jobs/{job['id']}", headers=headers).status_code == 200
        client.post(f"/api/supervisor/workers/{worker['id']}/terminate")
        response = httpx.get(f"{server.url}/api/jobs/{job['id']}", headers=headers)
        assert response.status_code == 401
        assert "no longer valid" in response.json()["detail"]


def test_each_worker_gets_a_worktree_branch_and_its_work_is_committed(servers: ServerFactory) -> None:
    repo = make_repo(servers.root)
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=profiles(servers.root))
    with server.client() as client:
        job = submit(client, agent="writer", worker_count=2, repository=str(repo))
        assert job["repository"] == str(repo.resolve())
        assert wait_final(client, job["id"])["status"] == "COMPLETED"
        for worker in workers_of(client, job["id"]):
            branch = f"orchestrator/{job['id']}/{worker['id']}"
            assert worker["branch"] == branch
            assert git(repo, "rev-parse", branch) == worker["commit"]
            index = worker["worker_index"]
            assert git(repo, "show", f"{branch}:work-{index}.txt") == f"written by worker {index}"
            assert "1 file changed" in worker["diff_stat"]
        workspaces = client.get("/api/workspaces").json()["workspaces"]
        mine = next(w for w in workspaces if w["repository"] == str(repo.resolve()))
        assert mine["workers"] == 2 and mine["live_workers"] == 0
        assert git(repo, "status", "--porcelain") == "", "the main checkout must not be touched"


def test_work_of_a_worker_that_ends_at_once_is_committed(servers: ServerFactory) -> None:
    """A shell that exits within a millisecond of its spawn usually ends before the engine has
    recorded its start (the pass after the launch does): its worktree is still committed."""
    repo = make_repo(servers.root)
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=profiles(servers.root))
    with server.client() as client:
        job = submit(client, agent="quick_writer", worker_count=4, repository=str(repo))
        final = wait_final(client, job["id"])
        assert final["status"] == "COMPLETED"
        workers = workers_of(client, job["id"])
        # Start times are the spawns', not when they were recorded: the job's is its first worker's.
        assert final["started_at"] == min(w["started_at"] for w in workers)
        assert all(w["started_at"] <= w["finished_at"] for w in workers)
        for worker in workers:
            branch = f"orchestrator/{job['id']}/{worker['id']}"
            assert worker["branch"] == branch and worker["commit"], worker
            index = worker["worker_index"]
            assert git(repo, "show", f"{branch}:quick-{index}.txt") == "quick"


def test_terminated_worker_work_is_committed(servers: ServerFactory) -> None:
    repo = make_repo(servers.root)
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=profiles(servers.root))
    with server.client() as client:
        job = submit(client, agent="sleeper", repository=str(repo))
        worker = wait_until(
            lambda: next((w for w in workers_of(client, job["id"]) if w["status"] == "RUNNING"), None)
        )
        workdir = servers.root / "data" / "workspaces" / worker["id"]
        wait_until(lambda: (workdir / "partial.txt").exists())
        client.post(f"/api/supervisor/workers/{worker['id']}/terminate")
        wait_final(client, job["id"])
        final = wait_until(
            lambda: (w := client.get(f"/api/supervisor/workers/{worker['id']}").json())["commit"] and w
        )
        assert git(repo, "show", f"{final['branch']}:partial.txt") == "partial"


def test_child_job_starts_from_parent_workers_branch(servers: ServerFactory) -> None:
    repo = make_repo(servers.root)
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=profiles(servers.root))
    with server.client() as client:
        job = submit(client, agent="delegating_writer", repository=str(repo))
        done = wait_final(client, job["id"], timeout=30)
        children = client.get("/api/jobs", params={"parent_job_id": job["id"]}).json()["jobs"]
        assert len(children) == 1
        (child_worker,) = workers_of(client, children[0]["id"])
        assert done["status"] == "COMPLETED", (done, log_lines(client, child_worker["id"]))
        assert git(repo, "show", f"{child_worker['branch']}:work-0.txt") == "written by worker 0"
        assert git(repo, "show", f"{child_worker['branch']}:child.txt") == "child was here"
        assert children[0]["workspace_id"] == job["workspace_id"]


def test_repository_outside_allowed_roots_or_not_git_is_400(
    servers: ServerFactory, tmp_path_factory: Any
) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    server = servers.start()
    with server.client() as client:
        outside = client.post(
            "/api/jobs/submit", json={"task_description": "x", "repository": str(elsewhere)}
        )
        assert outside.status_code == 400 and "allowed root" in outside.json()["detail"]
        plain = servers.root / "plain"
        plain.mkdir()
        not_git = client.post("/api/jobs/submit", json={"task_description": "x", "repository": str(plain)})
        assert not_git.status_code == 400 and "not a git repository" in not_git.json()["detail"]
