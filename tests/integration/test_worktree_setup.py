"""Worktree set-up per repository (issue 15), from the server's TOML file: files copied into each
new worktree, a set-up command run in the worker's process before the agent, its output in the
worker's log, and its failure failing the worker with a clear reason."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.integration.test_engine_lifecycle import log_lines, submit, wait_final, workers_of
from tests.integration.test_engine_workspaces_tokens import git
from tests.support.servers import ServerFactory


def repo_with_env(root: Path, name: str) -> Path:
    repo = root / name
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    (repo / ".gitignore").write_text(".env\nconf/\n")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    (repo / ".env").write_text("SECRET=42\n")  # ignored, so never in a worktree by itself
    (repo / "conf").mkdir()
    (repo / "conf" / "local.json").write_text('{"db": "local"}\n')
    return repo


def config(root: Path, good: Path, broken: Path, missing: Path) -> str:
    path = root / "setup-agents.toml"
    path.write_text(
        '[agents.reader]\ncommand = ["sh", "-c", '
        '"cat > task.txt; cat .env conf/local.json setup-output.txt > seen.txt; git add -f seen.txt"]\n'
        f'[repositories."{good}"]\ncopy = [".env", "conf"]\n'
        'setup = "echo installing deps; test -f .env && echo ran-in-worktree > setup-output.txt"\n'
        f'[repositories."{broken}"]\nsetup = ["sh", "-c", "echo npm ERR! broken; exit 3"]\n'
        f'[repositories."{missing}"]\ncopy = [".env.local"]\n'
    )
    return str(path)


def test_files_copied_and_setup_run_before_the_agent_and_failures_are_clear(servers: ServerFactory) -> None:
    good = repo_with_env(servers.root, "good")
    broken = repo_with_env(servers.root, "broken")
    missing = repo_with_env(servers.root, "missing")
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=config(servers.root, good, broken, missing))
    with server.client() as client:
        job = submit(client, agent="reader", task_description="the task text", repository=str(good))
        done = wait_final(client, job["id"], timeout=60)
        [worker] = workers_of(client, job["id"])
        lines = log_lines(client, worker["id"])
        assert done["status"] == "COMPLETED", (done, lines)
        for expected in ("[setup] copied .env into the worktree", "[setup] running: echo installing deps; "
                         "test -f .env && echo ran-in-worktree > setup-output.txt", "installing deps", "[setup] done"):  # fmt: skip
            assert expected in lines, (expected, lines)
        # The agent ran after the set-up, in the worktree, with its task on stdin.
        assert git(good, "show", f"{worker['branch']}:task.txt") == "the task text"
        seen = git(good, "show", f"{worker['branch']}:seen.txt")
        assert seen.splitlines() == ["SECRET=42", '{"db": "local"}', "ran-in-worktree"]
        # Copied files are ignored by the repository, so they are not committed with the work.
        listed = git(good, "ls-tree", "-r", "--name-only", worker["branch"]).splitlines()
        assert ".env" not in listed and "conf/local.json" not in listed

        failing = submit(client, agent="reader", repository=str(broken))
        done = wait_final(client, failing["id"], timeout=60)
        [worker] = workers_of(client, failing["id"])
        assert worker["status"] == "FAILED"
        reason = "worktree set-up failed: `sh -c echo npm ERR! broken; exit 3` exited with code 3"
        assert worker["status_reason"] == reason, worker
        assert done["status"] == "FAILED" and reason in done["status_reason"]
        assert "npm ERR! broken" in log_lines(client, worker["id"])
        assert (
            subprocess.run(
                ["git", "-C", str(broken), "cat-file", "-e", f"{worker['branch']}:task.txt"],
                capture_output=True,
            ).returncode
            != 0
        ), "the agent must not run after a failed set-up"

        absent = submit(client, agent="reader", repository=str(missing))
        done = wait_final(client, absent["id"], timeout=60)
        [worker] = workers_of(client, absent["id"])
        assert worker["status"] == "FAILED"
        assert ".env.local (to copy) does not exist" in worker["status_reason"], worker
