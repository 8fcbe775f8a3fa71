"""Results that land (issue 15): each job's work integrated into its result branch, bottom-up
through the tree, on real git repositories, with a real server and real worker processes."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

from tests.integration.test_engine_lifecycle import submit, wait_final, workers_of
from tests.integration.test_engine_workspaces_tokens import git, make_repo
from tests.support.servers import ServerFactory
from tests.support.wait import wait_until

# Writes level-<depth>-<index>.txt; worker 0 of each job above depth MAX delegates one child (same
# agent) and waits for it, so a tree of depth MAX has work at every level.
TREE_WRITER = r"""
import json, os, pathlib, time, urllib.request
index, depth = os.environ["WORKER_INDEX"], int(os.environ["ORCHESTRATOR_DEPTH"])
pathlib.Path(f"level-{depth}-{index}.txt").write_text(f"depth {depth} worker {index}\n")
def call(path, body=None):
    req = urllib.request.Request(os.environ["ORCHESTRATOR_URL"] + path,
                                 data=json.dumps(body).encode() if body is not None else None,
                                 method="POST" if body is not None else "GET")
    req.add_header("Authorization", "Bearer " + os.environ["ORCHESTRATOR_TOKEN"])
    req.add_header("Content-Type", "application/json")
    return json.loads(urllib.request.urlopen(req).read())
if index == "0" and depth < int(os.environ.get("MAX_DEPTH", "0")):
    child = call("/api/jobs/submit", {"task_description": f"level {depth + 1}", "depth": depth + 1,
                 "parent_job_id": os.environ["ORCHESTRATOR_JOB_ID"], "agent": "tree", "worker_count": 2})
    while call("/api/jobs/" + child["id"])["status"] not in ("COMPLETED", "FAILED", "CANCELED"):
        time.sleep(0.1)
"""


def profiles(root: Path) -> str:
    scripts = root / "agent-scripts"  # bound read-only into the worker sandbox
    scripts.mkdir(exist_ok=True)
    (scripts / "tree.py").write_text(TREE_WRITER)
    path = root / "results-agents.toml"
    path.write_text(
        f'[agents.tree]\ncommand = ["{sys.executable}", "{scripts / "tree.py"}"]\nenv = {{ MAX_DEPTH = "2" }}\n'
        f'ro_binds = ["{scripts}"]\n'
        '[agents.writer]\ncommand = ["sh", "-c", "echo \\"worker $WORKER_INDEX\\" > file-$WORKER_INDEX.txt"]\n'
        '[agents.named]\ncommand = ["sh", "-c", "echo \\"$ORCHESTRATOR_JOB_ID\\" > job-$ORCHESTRATOR_JOB_ID.txt"]\n'
        '[agents.failing]\ncommand = ["sh", "-c", "echo x > x.txt; exit 3"]\n'
    )
    return str(path)


def result_branch(job: dict[str, Any]) -> str:
    return f"orchestrator/{job['id']}/result"


def merge_parents(repo: Path, branch: str) -> list[list[str]]:
    """The parents of each merge commit on `branch` since it left main, newest first."""
    lines = git(repo, "log", "--merges", "--format=%P", f"main..{branch}").splitlines()
    return [line.split() for line in lines]


def test_three_workers_land_on_the_result_branch_with_merge_commits(servers: ServerFactory) -> None:
    repo = make_repo(servers.root)
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=profiles(servers.root))
    with server.client() as client:
        job = submit(client, agent="writer", worker_count=3, repository=str(repo))
        done = wait_final(client, job["id"])
        assert done["status"] == "COMPLETED", done
        # COMPLETED only once the result branch exists: it is there the moment the job is final.
        branch = result_branch(job)
        for index in range(3):
            assert git(repo, "show", f"{branch}:file-{index}.txt") == f"worker {index}"
        merges = merge_parents(repo, branch)
        assert len(merges) == 3 and all(len(parents) == 2 for parents in merges)
        # Workers by index: the first merge (oldest) brings worker 0's branch.
        workers = sorted(workers_of(client, job["id"]), key=lambda w: w["worker_index"])
        assert [m[1] for m in reversed(merges)] == [w["commit"] for w in workers]
        graph = git(repo, "log", "--graph", "--oneline", branch)
        assert graph.count("orchestrator: merge") == 3, graph
        for worker in workers:  # the sources stay as they were
            assert git(repo, "rev-parse", worker["branch"]) == worker["commit"]
        assert git(repo, "status", "--porcelain") == "", "the main checkout must not be touched"
        assert git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "main"
        assert not (servers.root / "data" / "integrations" / job["id"]).exists(), "temporary worktree left"
        assert "integrations" not in git(repo, "worktree", "list")


def test_depth_two_tree_root_result_holds_every_level(servers: ServerFactory) -> None:
    repo = make_repo(servers.root)
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=profiles(servers.root))
    with server.client() as client:
        root = submit(client, agent="tree", worker_count=2, repository=str(repo))
        done = wait_final(client, root["id"], timeout=90)
        assert done["status"] == "COMPLETED", done
        files = set(git(repo, "ls-tree", "--name-only", result_branch(root)).splitlines())
        expected = {f"level-{d}-{i}.txt" for d in range(3) for i in range(2)}
        assert expected <= files, files
        jobs = client.get("/api/jobs", params={"limit": 100}).json()["jobs"]
        assert len(jobs) == 3
        for job in jobs:  # each level has its own result branch, holding its subtree
            depth = job["depth"]
            held = set(git(repo, "ls-tree", "--name-only", result_branch(job)).splitlines())
            assert {f"level-{d}-{i}.txt" for d in range(depth, 3) for i in range(2)} <= held


def test_ten_jobs_finishing_at_once_in_one_repository_all_integrate(servers: ServerFactory) -> None:
    repo = make_repo(servers.root)
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=profiles(servers.root))
    with server.client() as client:
        jobs = [submit(client, agent="named", worker_count=2, repository=str(repo)) for _ in range(10)]
        for job in jobs:
            done = wait_final(client, job["id"], timeout=120)
            assert done["status"] == "COMPLETED", done
            assert git(repo, "show", f"{result_branch(job)}:job-{job['id']}.txt") == job["id"]
            assert len(merge_parents(repo, result_branch(job))) == 2
    assert "lock" not in server.log().lower(), server.log()


def test_failed_worker_leaves_no_result_branch(servers: ServerFactory) -> None:
    repo = make_repo(servers.root)
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=profiles(servers.root))
    with server.client() as client:
        job = submit(client, agent="failing", repository=str(repo))
        assert wait_final(client, job["id"])["status"] == "FAILED"
        assert git(repo, "branch", "--list", result_branch(job)) == ""


def slow_git(root: Path) -> str:
    """A PATH whose `git` is the real one, 0.3 s slower per merge: integration takes seconds, so the
    server can be killed in the middle of it."""
    real = shutil.which("git")
    assert real is not None
    bin_dir = root / "slow-git"
    bin_dir.mkdir()
    script = bin_dir / "git"
    marker = root / "merging"  # the first merge has begun
    script.write_text(
        f'#!/bin/sh\ncase " $* " in *" merge-tree "*) touch {marker}; sleep 0.3;; esac\nexec {real} "$@"\n'
    )
    script.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


def test_kill9_mid_integration_then_restart_completes_the_result(servers: ServerFactory) -> None:
    repo = make_repo(servers.root)
    first = servers.start(ORCHESTRATOR_AGENTS_FILE=profiles(servers.root), PATH=slow_git(servers.root))
    with first.client() as client:
        job = submit(client, agent="writer", worker_count=10, repository=str(repo))

        # Killed once the first merge has begun (10 merges take about 3 s with this git).
        wait_until(lambda: (servers.root / "merging").exists(), timeout=60, interval=0.02, what="merging")
        assert client.get(f"/api/jobs/{job['id']}").json()["status"] == "RUNNING"
    first.kill9()
    second = servers.make(port=first.port, ORCHESTRATOR_AGENTS_FILE=profiles(servers.root)).start()
    with second.client() as client:
        done = wait_final(client, job["id"], timeout=60)
        assert done["status"] == "COMPLETED", done
        # The first engine began it (and died in it); the second redid it from the base.
        assert client.get(f"/api/jobs/{job['id']}/result").json()["attempts"] == 2
    branch = result_branch(job)
    for index in range(10):
        assert git(repo, "show", f"{branch}:file-{index}.txt") == f"worker {index}"
    assert len(merge_parents(repo, branch)) == 10
    assert not (servers.root / "data" / "integrations" / job["id"]).exists()
    assert "integrations" not in git(repo, "worktree", "list")


SAME_LINE = {"shared.txt": "line written by worker {index}\n"}


def conflict_profiles(root: Path) -> str:
    """Command profiles that write the same line differently per worker; resolvers, or not."""
    path = root / "conflict-agents.toml"
    clash = 'command = ["sh", "-c", "echo \\"worker $WORKER_INDEX\\" > shared.txt"]\n'
    path.write_text(
        f"[agents.clash]\n{clash}"
        # A "resolver" that claims success but leaves the markers in place.
        '[agents.liar]\nresolver = true\ncommand = ["sh", "-c", '
        '"test \\"$ORCHESTRATOR_ROLE\\" = resolver && exit 0; echo \\"worker $WORKER_INDEX\\" > shared.txt"]\n'
        # A resolver that commits something else of its own instead of the merge.
        '[agents.rogue]\nresolver = true\ncommand = ["sh", "-c", '
        '"if test \\"$ORCHESTRATOR_ROLE\\" = resolver; then git merge --abort; echo evil > evil.txt; '
        "git add -A; git -c user.name=x -c user.email=x@x commit -qm evil; exit 0; fi; "
        'echo \\"worker $WORKER_INDEX\\" > shared.txt"]\n'
    )
    return str(path)


def test_same_line_conflict_goes_to_a_resolver_and_both_intents_land(servers: ServerFactory) -> None:
    repo = make_repo(servers.root)
    server = servers.start()
    with server.client() as client:
        job = submit(
            client,
            worker_count=2,
            repository=str(repo),
            agent_options={"duration_seconds": 0, "files": SAME_LINE, "resolve": "both"},
        )
        done = wait_final(client, job["id"], timeout=60)
        assert done["status"] == "COMPLETED", (
            done["status_reason"],
            [(w["status"], w["status_reason"]) for w in workers_of(client, job["id"])],
        )
        content = git(repo, "show", f"{result_branch(job)}:shared.txt")
        assert content.splitlines() == ["line written by worker 0", "line written by worker 1"]
        workers = workers_of(client, job["id"])
        resolvers = [w for w in workers if (w["result"] or {}).get("role") == "resolver"]
        assert len(resolvers) == 1 and resolvers[0]["status"] == "COMPLETED", workers
        merges = merge_parents(repo, result_branch(job))
        assert len(merges) == 2 and all(len(p) == 2 for p in merges)
        events = client.get(f"/api/jobs/{job['id']}/events").json()["events"]
        assert any(e["kind"] == "integration.conflict" for e in events)


def test_profile_that_cannot_resolve_fails_naming_files_and_branches(servers: ServerFactory) -> None:
    repo = make_repo(servers.root)
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=conflict_profiles(servers.root))
    with server.client() as client:
        job = submit(client, agent="clash", worker_count=2, repository=str(repo))
        done = wait_final(client, job["id"], timeout=60)
        assert done["status"] == "FAILED", done
        workers = sorted(workers_of(client, job["id"]), key=lambda w: w["worker_index"])
        assert len(workers) == 2, "no resolver for a profile without resolver = true"
        reason = f"merge conflict: shared.txt (orchestrator/{job['id']}/result vs {workers[1]['branch']})"
        assert done["status_reason"] == reason
        for worker in workers:  # every source branch intact
            assert git(repo, "rev-parse", worker["branch"]) == worker["commit"]
        # The partial result is kept: worker 0's work merged, worker 1's not.
        assert git(repo, "show", f"{result_branch(job)}:shared.txt") == "worker 0"
        assert git(repo, "status", "--porcelain") == ""


def test_simulated_resolver_without_resolve_option_fails_the_job(servers: ServerFactory) -> None:
    repo = make_repo(servers.root)
    server = servers.start()
    with server.client() as client:
        options = {"duration_seconds": 0, "files": SAME_LINE}
        job = submit(client, worker_count=2, repository=str(repo), agent_options=options)
        done = wait_final(client, job["id"], timeout=60)
        assert done["status"] == "FAILED", done
        assert done["status_reason"].startswith("merge conflict: shared.txt (")


def test_hostile_resolvers_cannot_pass_off_markers_or_their_own_commit(servers: ServerFactory) -> None:
    repo = make_repo(servers.root)
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=conflict_profiles(servers.root))
    with server.client() as client:
        for agent in ("liar", "rogue"):
            job = submit(client, agent=agent, worker_count=2, repository=str(repo))
            done = wait_final(client, job["id"], timeout=60)
            assert done["status"] == "FAILED", (agent, done)
            assert done["status_reason"].startswith("merge conflict: shared.txt ("), done
            files = git(repo, "ls-tree", "--name-only", result_branch(job)).splitlines()
            assert "evil.txt" not in files
            assert git(repo, "show", f"{result_branch(job)}:shared.txt") == "worker 0"
