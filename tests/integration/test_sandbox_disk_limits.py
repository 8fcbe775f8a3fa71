"""A hostile worker and the host's disk (docs/SANDBOX.md "Disk"): real sandboxed `command` workers
flood their output past the profile's `max_output_mb`, write a file past `max_file_mb`
(RLIMIT_FSIZE, their stdout file too) and leave a sparse file the engine's final commit must not
read. Each script reports what it tried (in its log, or in a file the engine commits), so no test
passes because it did not run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from orchestrator.workspaces import gitdirs
from tests.integration.test_engine_lifecycle import log_lines, submit, wait_final, workers_of
from tests.integration.test_sandbox import make_repo
from tests.integration.test_sandbox_redteam_engine import report_of
from tests.support.servers import ServerFactory

LINE = 200  # bytes a line of the flood, newline included

# Numbered lines of LINE bytes, 3 MiB in all (the profile stores 1 MiB), then a last word.
FLOOD = rf"""
import sys
out = sys.stdout.buffer
for n in range(3 * 1024 * 1024 // {LINE}):
    out.write(b"FLOOD %08d " % n + b"x" * ({LINE} - 16) + b"\n")
out.write(b"AFTER the flood\n")
out.flush()
"""

# 2 MiB into a file of the worktree, then 2 MiB more on stdout (the profile allows 1 MiB a file);
# SIGXFSZ ignored so each write fails with EFBIG instead of killing the agent. The stdout report
# goes into a small file of the worktree, which the engine commits.
BIGFILE = r"""
import errno, json, os, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
def fill(fd):
    written = 0
    try:
        while written < (2 << 20):
            written += os.write(fd, b"z" * 65536)
        return {"written": written, "error": None}
    except OSError as exc:
        return {"written": written, "error": errno.errorcode.get(exc.errno, str(exc.errno))}
fd = os.open("big.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
report = {"file": fill(fd), "file_size": os.fstat(fd).st_size}
os.close(fd)
print("REPORT " + json.dumps(report), flush=True)
open("stdout-report.json", "w").write(json.dumps(fill(1)))
"""

# A terabyte for nothing (refused: RLIMIT_FSIZE), then a sparse file of exactly max_file_mb (the
# most the limit lets it make), and a small file of real work.
SPARSE = r"""
import errno, json, os
report = {}
for name, size in (("huge.bin", 1 << 40), ("sparse.bin", 1 << 20)):
    try:
        os.truncate(os.open(name, os.O_WRONLY | os.O_CREAT, 0o600), size)
        report[name] = os.stat(name).st_size
    except OSError as exc:
        report[name] = errno.errorcode.get(exc.errno, str(exc.errno))
open("work.txt", "w").write("the agent's work\n")
print("REPORT " + json.dumps(report), flush=True)
"""


def agents(root: Path) -> str:
    scripts = root / "disk-scripts"  # bound read-only into the sandbox (ro_binds)
    scripts.mkdir(exist_ok=True)
    for name, body in (("flood.py", FLOOD), ("bigfile.py", BIGFILE), ("sparse.py", SPARSE)):
        (scripts / name).write_text(body)
    py, binds = sys.executable, f'ro_binds = ["{scripts}"]\n'
    path = root / "disk-agents.toml"
    path.write_text(
        f'[agents.flood]\ncommand = ["{py}", "{scripts / "flood.py"}"]\n{binds}'
        "max_output_mb = 1\nmax_file_mb = 8\n"
        f'[agents.bigfile]\ncommand = ["{py}", "{scripts / "bigfile.py"}"]\n{binds}'
        "max_file_mb = 1\n"
        f'[agents.sparse]\ncommand = ["{py}", "{scripts / "sparse.py"}"]\n{binds}'
        "max_file_mb = 1\n"
    )
    return str(path)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def test_output_beyond_max_output_mb_is_cut_with_a_marker(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents(servers.root))
    with server.client() as client:
        job = submit(client, agent="flood")
        done = wait_final(client, job["id"], timeout=180)
        worker = workers_of(client, job["id"])[0]
        lines = log_lines(client, worker["id"])
        assert done["status"] == "COMPLETED", (done, worker["status_reason"], lines[-3:])
        # Everything up to the cap, in order (the line the cap cuts stored up to it), then one
        # marker, and nothing of what came after.
        assert lines[-1] == "[orchestrator] output cut at 1 MiB (max_output_mb)", lines[-3:]
        stored = lines[:-1]
        whole = (1 << 20) // LINE
        assert [line[:14] for line in stored[:whole]] == [f"FLOOD {n:08d}" for n in range(whole)]
        assert sum(len(line) + 1 for line in stored) <= (1 << 20) + 1
        assert len(stored) == whole + 1 and stored[-1].startswith(f"FLOOD {whole:08d}")
        assert not any("AFTER" in line for line in lines)
        # The worker wrote it all (3 MiB, under its max_file_mb): only the database was spared.
        output = servers.root / "data" / "runs" / worker["id"] / "output.log"
        assert output.stat().st_size == (3 << 20) // LINE * LINE + len("AFTER the flood\n")
        assert client.get("/health").status_code == 200


def test_a_file_beyond_max_file_mb_cannot_be_written(servers: ServerFactory) -> None:
    repo = make_repo(servers.root / "project")
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents(servers.root))
    with server.client() as client:
        job = submit(client, agent="bigfile", repository=str(repo))
        done = wait_final(client, job["id"], timeout=180)
        worker = workers_of(client, job["id"])[0]
        report = report_of(client, worker["id"])
        assert done["status"] == "COMPLETED", (done, worker["status_reason"], report)
        # The write stopped at the limit (EFBIG), and so did its stdout file.
        assert report == {"file": {"written": 1 << 20, "error": "EFBIG"}, "file_size": 1 << 20}, report
        output = servers.root / "data" / "runs" / worker["id"] / "output.log"
        assert output.stat().st_size == 1 << 20
        branch = worker["branch"]
        stdout = json.loads(git(repo, "show", f"{branch}:stdout-report.json"))
        assert stdout["error"] == "EFBIG" and stdout["written"] < 1 << 20, stdout
        # big.bin reached the limit: likely cut, so not committed, and the worker is told why.
        assert "big.bin" not in git(repo, "ls-tree", "--name-only", branch)
        result = client.get(f"/api/supervisor/workers/{worker['id']}").json()["result"]
        assert "big.bin" in result["commit_error"] and "max_file_mb" in result["commit_error"], result


def test_a_sparse_file_at_max_file_mb_is_left_out_of_the_commit(servers: ServerFactory) -> None:
    repo = make_repo(servers.root / "project")
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents(servers.root))
    with server.client() as client:
        job = submit(client, agent="sparse", repository=str(repo))
        done = wait_final(client, job["id"], timeout=180)
        worker = workers_of(client, job["id"])[0]
        report = report_of(client, worker["id"])
        assert done["status"] == "COMPLETED", (done, worker["status_reason"], report)
        assert report == {"huge.bin": "EFBIG", "sparse.bin": 1 << 20}, report
        branch = worker["branch"]
        committed = git(repo, "ls-tree", "--name-only", branch).split()
        assert "work.txt" in committed and "sparse.bin" not in committed, committed
        result = client.get(f"/api/supervisor/workers/{worker['id']}").json()["result"]
        assert "sparse.bin" in result["commit_error"], result
        assert client.get("/health").status_code == 200


def test_the_commit_never_reads_a_sparse_terabyte(tmp_path: Path) -> None:
    """The literal attack, where nothing limits the writer (a file the agent's limit did not
    cover): a terabyte made with truncate. The commit leaves it out and completes."""
    repo = make_repo(tmp_path / "project")
    worktree, run_dir = tmp_path / "wt", tmp_path / "run"
    run_dir.mkdir()
    git(repo, "worktree", "add", "-q", "-b", "work", str(worktree))
    assert gitdirs.record(worktree, run_dir) is not None
    with (worktree / "huge.bin").open("wb") as handle:
        handle.truncate(1 << 40)
    (worktree / "sub").mkdir()
    (worktree / "sub" / "work.txt").write_text("the agent's work\n")
    skipped: list[str] = []
    head, _ = gitdirs.commit_worker(worktree, run_dir, "work", None, "work", skipped, 1024)
    assert skipped == ["huge.bin"]
    assert git(repo, "ls-tree", "-r", "--name-only", head).split() == ["README.md", "sub/work.txt"]
