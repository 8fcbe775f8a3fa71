"""A `repository` job on the Ray cluster: each worker's worktree is cloned on its node from a git
remote (a bare repository in its own directory), never made on the server's disk, and its branch
comes back through the remote when it ends (also when terminated): the branch, commit and diff
stat in the API and the job's result branch are as on one machine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.integration.test_engine_lifecycle import log_lines, submit, wait_final, workers_of
from tests.integration.test_engine_workspaces_tokens import git, make_repo
from tests.integration.test_results import result_branch
from tests.integration.test_worktree_setup import repo_with_env
from tests.ray.conftest import RayCluster
from tests.ray.test_ray_executor import LONG, node_ids, running
from tests.support.agent_scripts import API_CALL
from tests.support.servers import Server, ServerFactory
from tests.support.wait import wait_until

# The sleeper stages its file with git inside its sandbox (the private git view on the node), and
# leaves it uncommitted: the node's final commit must carry it back after a terminate.
PROFILES = """
[agents.writer]
type = "command"
command = ["sh", "-c", "echo \\"worker $WORKER_INDEX\\" > file-$WORKER_INDEX.txt && pwd"]

[agents.hostile]
type = "command"
command = ["sh", "-c", "echo mine > mine.txt && printf 'gitdir: /nonexistent\\n' > .git && mkdir -p hooks && echo evil > hooks/pre-push"]

[agents.reader]
type = "command"
command = ["sh", "-c", "cat .env conf/local.json setup-output.txt"]

[agents.bigfile]
type = "command"
command = ["sh", "-c", "truncate -s 1M sparse.bin && echo work > work.txt"]
max_file_mb = 1

[agents.sleeper]
type = "command"
command = ["sh", "-c", "echo partial > partial.txt && git add partial.txt && echo ready && exec sleep 600"]
"""


def start(
    servers: ServerFactory, cluster: RayCluster, extra: str = "", quotas: str = "6"
) -> tuple[Server, Path, Path]:
    """A server on the cluster, its repository (under the allowed roots) and the bare remote."""
    roots = servers.root / "repos"
    roots.mkdir(exist_ok=True)
    repo = make_repo(roots)
    bare = servers.root / "remote" / "project.git"
    bare.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "--bare", str(bare)], check=True)
    agents = servers.root / "agents.toml"
    agents.write_text(PROFILES + extra)
    server = servers.start(
        ORCHESTRATOR_AGENTS_FILE=str(agents),
        ORCHESTRATOR_QUOTAS=quotas,
        ORCHESTRATOR_REPO_ROOTS=str(roots),
        ORCHESTRATOR_GIT_REMOTE=str(bare),
        **cluster.env(),
    )
    return server, repo, bare


def node_path(cluster: RayCluster, worker: dict[str, Any]) -> Path:
    """Where its node kept the worker's worktree (the nodes' directory, then the node's id)."""
    return cluster.node_dir.resolve() / worker["host"] / "workspaces" / worker["id"]


def test_each_workers_branch_comes_back_from_its_node(
    servers: ServerFactory, ray_cluster: RayCluster
) -> None:
    server, repo, bare = start(servers, ray_cluster)
    base = git(repo, "rev-parse", "HEAD")
    with server.client() as client:
        job = submit(client, agent="writer", worker_count=2, repository=str(repo))
        done = wait_final(client, job["id"], timeout=LONG * 2)
        workers = sorted(workers_of(client, job["id"]), key=lambda w: w["worker_index"])
        assert done["status"] == "COMPLETED", (done, workers)
        for worker in workers:
            index, branch = worker["worker_index"], f"orchestrator/{job['id']}/{worker['id']}"
            assert worker["host"] in node_ids(ray_cluster), worker
            assert worker["branch"] == branch and worker["commit"] not in (None, base), worker
            assert git(repo, "rev-parse", branch) == worker["commit"]
            assert git(repo, "rev-parse", f"{branch}^") == base
            assert git(repo, "show", f"{branch}:file-{index}.txt") == f"worker {index}"
            assert worker["diff_stat"] == "1 file changed, 1 insertion(+)", worker
            # It came through the remote, from a worktree on its node, never on the server's disk.
            assert git(bare, "rev-parse", f"refs/heads/{branch}") == worker["commit"]
            assert not (servers.root / "data" / "workspaces" / worker["id"]).exists()
            # The agent ran in the worktree its node cloned (its `pwd`), gone from the node once pushed.
            assert log_lines(client, worker["id"]) == [str(node_path(ray_cluster, worker))]
            assert (
                not node_path(ray_cluster, worker).exists()
                and not node_path(ray_cluster, worker).with_name(worker["id"] + ".git").exists()
            )
            assert not worker["result"] or "commit_error" not in worker["result"], worker
        # The result integration merged both workers' branches.
        files = git(repo, "ls-tree", "-r", "--name-only", result_branch(job)).splitlines()
        assert sorted(files) == ["README.md", "file-0.txt", "file-1.txt"]
        assert git(repo, "status", "--porcelain") == "", "the main checkout must not be touched"
        assert "workspaces" not in git(repo, "worktree", "list")


def test_a_terminated_workers_uncommitted_work_comes_back(
    servers: ServerFactory, ray_cluster: RayCluster
) -> None:
    server, repo, _ = start(servers, ray_cluster)
    with server.client() as client:
        job = submit(client, agent="sleeper", repository=str(repo))
        worker = wait_until(lambda: running(client, [job["id"]]), timeout=LONG, what="worker running")[0]
        wait_until(lambda: "ready" in log_lines(client, worker["id"]), timeout=LONG, what="its work staged")
        assert client.post(f"/api/supervisor/workers/{worker['id']}/terminate").status_code == 200
        wait_final(client, job["id"], timeout=LONG)
        final = wait_until(
            lambda: (w := client.get(f"/api/supervisor/workers/{worker['id']}").json())["commit"] and w,
            timeout=LONG,
            what="the terminated worker's commit",
        )
        assert final["status"] == "TERMINATED", final
        assert git(repo, "show", f"{final['branch']}:partial.txt") == "partial"
        assert final["diff_stat"] == "1 file changed, 1 insertion(+)", final
        assert not (servers.root / "data" / "workspaces" / worker["id"]).exists()


def test_a_worker_that_rewrites_its_git_file_still_brings_its_work_back(
    servers: ServerFactory, ray_cluster: RayCluster
) -> None:
    """The agent points its worktree's `.git` at nothing: the node's final commit reads only the
    files (git pointed at the node repository explicitly), so the work comes back all the same."""
    server, repo, _ = start(servers, ray_cluster)
    with server.client() as client:
        job = submit(client, agent="hostile", repository=str(repo))
        assert wait_final(client, job["id"], timeout=LONG)["status"] == "COMPLETED"
        (worker,) = workers_of(client, job["id"])
        files = git(repo, "ls-tree", "-r", "--name-only", worker["commit"]).splitlines()
        assert sorted(files) == ["README.md", "hooks/pre-push", "mine.txt"], worker


def test_a_file_at_max_file_mb_stays_out_of_the_nodes_commit(
    servers: ServerFactory, ray_cluster: RayCluster
) -> None:
    """As the engine's own final commit: a file of the profile's max_file_mb or more (the most
    its RLIMIT_FSIZE lets it make: likely cut, or sparse) is left out, unread, and named in the
    worker's commit_error; the rest of its work comes back."""
    server, repo, _ = start(servers, ray_cluster)
    with server.client() as client:
        job = submit(client, agent="bigfile", repository=str(repo))
        done = wait_final(client, job["id"], timeout=LONG)
        (worker,) = workers_of(client, job["id"])
        assert worker["status"] == "COMPLETED", (done, worker)
        files = git(repo, "ls-tree", "-r", "--name-only", worker["commit"]).splitlines()
        assert sorted(files) == ["README.md", "work.txt"], worker
        error = worker["result"]["commit_error"]
        assert "sparse.bin" in error and "max_file_mb (1 MiB)" in error, worker


# Leaves its work uncommitted, delegates a child from its own branch, and waits for it to end.
DELEGATOR = (
    API_CALL
    + r"""
import time
open("mine.txt", "w").write("work so far\n")
# Hostile too: a link to a file only the node's user may read, and its .git pointed at nothing.
os.symlink(os.environ["SECRET"], "leak")
open(".git", "w").write("gitdir: /nonexistent\n")
own = "orchestrator/" + JOB + "/" + os.environ["ORCHESTRATOR_WORKER_ID"]
code, child = call("POST", "/api/jobs/submit", {"task_description": "list", "depth": 1, "parent_job_id": JOB,
                                                "agent": "lister", "base_ref": own})
assert code == 201, child
while call("GET", "/api/jobs/" + child["id"])[1]["status"] not in ("COMPLETED", "FAILED", "CANCELED"):
    time.sleep(0.2)
print("CHILD " + child["id"], flush=True)
"""
)


def delegator_server(
    servers: ServerFactory, cluster: RayCluster, code: str = DELEGATOR
) -> tuple[Server, Path, Path, Path]:
    """A server whose `delegator` agent checkpoints (its child starts from its branch): the
    server, its repository, the bare remote and the secret only the node's user may read."""
    scripts = servers.root / "delegator"  # bound read-only into the sandbox, readable by its uid
    scripts.mkdir(mode=0o755)
    scripts.chmod(0o755)
    script = scripts / "delegator.py"
    script.write_text(code)
    script.chmod(0o644)
    secret = servers.root / "node-secret.txt"
    secret.write_text("the node user's secret")
    secret.chmod(0o600)
    extra = (
        f'\n[agents.delegator]\ncommand = ["{sys.executable}", "{script}"]\nro_binds = ["{scripts}"]\n'
        f'env = {{ SECRET = "{secret}" }}\n'
        '[agents.lister]\ncommand = ["sh", "-c", "ls"]\n'
    )
    server, repo, bare = start(servers, cluster, extra, quotas="2,1")
    return server, repo, bare, secret


def test_a_delegating_workers_live_worktree_is_checkpointed_on_its_node(
    servers: ServerFactory, ray_cluster: RayCluster
) -> None:
    """As on one machine: before a child starts from its delegating worker's own branch, the
    worker's live worktree (on its node) is committed onto that branch, so the child sees the
    work so far; the worker runs on, and its final commit descends from the checkpoint. The
    worker is hostile: the checkpoint (run as the node's user) commits its link to a file it
    cannot read as a link, never that file's content, and reads nothing from its `.git`."""
    server, repo, _, secret = delegator_server(servers, ray_cluster)
    base = git(repo, "rev-parse", "HEAD")
    with server.client() as client:
        job = submit(client, agent="delegator", repository=str(repo))
        done = wait_final(client, job["id"], timeout=LONG * 2)
        (worker,) = workers_of(client, job["id"])
        lines = log_lines(client, worker["id"])
        assert done["status"] == "COMPLETED", (done, worker, lines)
        child_id = next(line for line in lines if line.startswith("CHILD ")).removeprefix("CHILD ")
        (child,) = workers_of(client, child_id)
        assert child["status"] == "COMPLETED", child
        assert "mine.txt" in log_lines(client, child["id"]), "the child did not see its parent's work so far"
        checkpoint = git(repo, "rev-parse", child["branch"])  # it committed nothing: its start
        assert checkpoint != base and git(repo, "show", f"{checkpoint}:mine.txt") == "work so far"
        assert git(repo, "ls-tree", checkpoint, "leak").startswith("120000 blob "), "not a link"
        assert git(repo, "cat-file", "-p", f"{checkpoint}:leak") == str(secret)
        assert git(repo, "merge-base", "--is-ancestor", checkpoint, worker["commit"]) == ""


# The bare remote takes a worker branch's first push (the delegator's checkpoint, a child's only
# push) and refuses every later update of it (the delegator's final push).
FIRST_PUSH_ONLY_HOOK = """#!/bin/sh
while read -r old new ref; do
  case "$ref" in
    refs/heads/orchestrator/*)
      if [ "$old" != "0000000000000000000000000000000000000000" ]; then echo "$ref" >> "{dir}/refused"; exit 1; fi ;;
  esac
done
exit 0
"""


def test_a_final_push_refused_after_a_checkpoint_is_an_error_not_the_checkpoint(
    servers: ServerFactory, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    """The delegator's checkpoint reaches the remote, its final push never does: the branch the
    server fetches holds the checkpoint, not the worker's work, so the worker's result must say
    the work did not come back (commit_error) instead of reporting the checkpoint as its commit."""
    after = DELEGATOR + 'open("after.txt", "w").write("work after the child\\n")\n'
    server, repo, bare, _ = delegator_server(servers, ray_cluster, after)
    hook = bare / "hooks" / "pre-receive"
    hook.write_text(FIRST_PUSH_ONLY_HOOK.format(dir=tmp_path))
    hook.chmod(0o755)
    with server.client() as client:
        job = submit(client, agent="delegator", repository=str(repo))
        wait_final(client, job["id"], timeout=LONG * 2)
        (worker,) = workers_of(client, job["id"])
        assert (tmp_path / "refused").read_text().splitlines()[0] == f"refs/heads/{worker['branch']}"
        assert worker["commit"] is None, worker
        error = worker["result"]["commit_error"]
        assert "gave up after 5 attempts" in error and "holds only its checkpoint" in error, error


def test_a_repository_job_without_a_git_remote_fails_with_a_clear_reason(
    servers: ServerFactory, ray_cluster: RayCluster
) -> None:
    roots = servers.root / "repos"
    roots.mkdir(exist_ok=True)
    repo = make_repo(roots)
    agents = servers.root / "agents.toml"
    agents.write_text(PROFILES)
    env = {"ORCHESTRATOR_AGENTS_FILE": str(agents), "ORCHESTRATOR_REPO_ROOTS": str(roots)}
    server = servers.start(**env, **ray_cluster.env())
    with server.client() as client:
        job = submit(client, agent="writer", repository=str(repo))
        assert wait_final(client, job["id"], timeout=LONG)["status"] == "FAILED"
        (worker,) = workers_of(client, job["id"])
        assert worker["status"] == "FAILED", worker
        assert "ORCHESTRATOR_GIT_REMOTE" in worker["status_reason"], worker
        assert worker["status_reason"].startswith("could not start: "), worker
        assert not (servers.root / "data" / "workspaces" / worker["id"]).exists()


def test_the_worktree_set_up_runs_on_the_node_with_its_copied_files(
    servers: ServerFactory, ray_cluster: RayCluster
) -> None:
    """A repository's set-up (workspaces/setup.py) on a Ray node: its `copy` files (ignored by
    git, so only in the server's main checkout) reach the worktree the node cloned, the set-up
    command runs there before the agent, and a failing set-up fails the worker with its reason."""
    server, _, _ = start(servers, ray_cluster)
    roots = servers.root / "repos"
    good, broken = repo_with_env(roots, "good"), repo_with_env(roots, "broken")
    agents = servers.root / "agents.toml"
    agents.write_text(
        agents.read_text()
        + f'[repositories."{good}"]\ncopy = [".env", "conf"]\n'
        + 'setup = "test -f .env && echo ran-in-worktree > setup-output.txt"\n'
        + f'[repositories."{broken}"]\nsetup = ["sh", "-c", "echo npm ERR! broken; exit 3"]\n'
    )
    with server.client() as client:
        job = submit(client, agent="reader", repository=str(good))
        done = wait_final(client, job["id"], timeout=LONG)
        (worker,) = workers_of(client, job["id"])
        lines = log_lines(client, worker["id"])
        assert done["status"] == "COMPLETED", (done, worker, lines)
        for expected in (
            "SECRET=42",
            '{"db": "local"}',
            "ran-in-worktree",
            "[setup] copied .env into the worktree",
        ):
            assert expected in lines, (expected, lines)
        listed = git(good, "ls-tree", "-r", "--name-only", worker["branch"]).splitlines()
        assert ".env" not in listed and "conf/local.json" not in listed, listed
        assert not (servers.root / "data" / "workspaces" / worker["id"]).exists()

        failing = submit(client, agent="reader", repository=str(broken))
        wait_final(client, failing["id"], timeout=LONG)
        (worker,) = workers_of(client, failing["id"])
        reason = "worktree set-up failed: `sh -c echo npm ERR! broken; exit 3` exited with code 3"
        assert worker["status"] == "FAILED" and worker["status_reason"] == reason, worker
