"""The worker sandbox against hostile agents (docs/SANDBOX.md): real sandboxed workers running
attack scripts, each attack's result reported by the script itself in the worker's log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.integration.test_engine_lifecycle import log_lines, submit, wait_final, workers_of
from tests.support.checks import session_processes
from tests.support.servers import ServerFactory
from tests.support.wait import wait_until

ATTACK = r"""
import json, os, signal, subprocess, sys
spec = json.loads(sys.stdin.read())
report = {}

def attempt(name, action):
    try:
        report[name] = "ok: " + str(action())[:200]
    except Exception as exc:
        report[name] = "blocked: " + type(exc).__name__

def environ_secrets():
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                data = open(f"/proc/{pid}/environ", "rb").read()
            except OSError:
                continue
            if b"SECRET_KEY=" in data:
                found.append(pid)
    if found:
        return found
    raise PermissionError("no environ with SECRET_KEY")

def write(path):
    with open(path, "w") as handle:
        handle.write("pwned")
    return path

attempt("secret_key", lambda: open(spec["data"] + "/secret_key").read())
attempt("database", lambda: open(spec["data"] + "/orchestrator.db", "rb").read(16))
attempt("data_listing", lambda: os.listdir(spec["data"]))
attempt("server_environ", lambda: open(f"/proc/{spec['server_pid']}/environ", "rb").read())
attempt("any_environ_secret", environ_secrets)
attempt("kill_server", lambda: os.kill(spec["server_pid"], signal.SIGTERM))
attempt("sibling_worktree", lambda: os.listdir(spec["sibling"]))
attempt("other_repository", lambda: os.listdir(spec["other_repo"]))
attempt("server_cwd", lambda: os.listdir(spec["server_cwd"]))
attempt("write_etc", lambda: write("/etc/pwned"))
attempt("write_usr", lambda: write("/usr/pwned"))
attempt("write_data", lambda: write(spec["data"] + "/pwned"))
attempt("shadow", lambda: open("/etc/shadow").read())
attempt("remount", lambda: subprocess.run(["mount", "-o", "remount,rw", "/usr"], check=True, capture_output=True))
attempt("unshare", lambda: subprocess.run(["unshare", "-Ur", "true"], check=True, capture_output=True))
attempt("core_pattern", lambda: write("/proc/sys/kernel/core_pattern"))
report["own_worktree"] = write("mine.txt")
report["own_tmp"] = write("/tmp/mine.txt")
report["uid"] = os.getuid()
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
report["cap_eff"] = status["CapEff"].strip()
report["no_new_privs"] = status["NoNewPrivs"].strip()
report["secret_in_env"] = any(k in os.environ for k in ("SECRET_KEY", "DATABASE_URL"))
report["token_in_env"] = "ORCHESTRATOR_TOKEN" in os.environ
print("REPORT " + json.dumps(report), flush=True)
"""

HOG = "x = []\nwhile True:\n    x.append(bytearray(16 * 1024 * 1024))\n"
FORKS = r"""
import os, sys, time
children = 0
while True:
    try:
        pid = os.fork()
    except OSError as exc:
        print(f"fork refused after {children}: {exc}", flush=True)
        sys.exit(3)
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    children += 1
"""
GIT_ATTACK = r"""
import subprocess, sys
def run(label, *args):
    done = subprocess.run(["git", *args], capture_output=True, text=True)
    print(label, "->", done.returncode, done.stderr.strip()[-200:] if done.returncode else "", flush=True)
open("work.txt", "w").write("mine")
run("add work.txt", "add", "work.txt")
run("commit", "-c", "user.name=a", "-c", "user.email=a@a", "commit", "-qm", "the agent's own commit")
run("branch -f main", "branch", "-f", "main", "HEAD")
run("update-ref refs/heads/main", "update-ref", "refs/heads/main", "HEAD")
run("config core.hooksPath", "config", "core.hooksPath", "/tmp")
run("log main", "log", "-1", "--format=%s", "main")
"""


def agents(root: Path) -> str:
    scripts = root / "agent-scripts"  # bound read-only into the sandbox (ro_binds)
    scripts.mkdir(exist_ok=True)
    for name, body in (("attack.py", ATTACK), ("hog.py", HOG), ("forks.py", FORKS), ("git.py", GIT_ATTACK)):
        (scripts / name).write_text(body)
    py = sys.executable
    binds = f'ro_binds = ["{scripts}"]\n'
    path = root / "agents.toml"
    path.write_text(
        f'[agents.attack]\ncommand = ["{py}", "{scripts / "attack.py"}"]\n{binds}'
        f'[agents.hog]\ncommand = ["{py}", "{scripts / "hog.py"}"]\nmemory_mb = 64\n{binds}'
        f'[agents.forks]\ncommand = ["{py}", "{scripts / "forks.py"}"]\npids = 24\n{binds}'
        f'[agents.git]\ncommand = ["{py}", "{scripts / "git.py"}"]\n{binds}'
        '[agents.bomb]\ncommand = ["bash", "-c", ":(){ :|:& };:; sleep 600"]\npids = 32\n'
        '[agents.sleeper]\ncommand = ["bash", "-c", "echo up; sleep 600 & wait"]\n'
        '[agents.offline]\ncommand = ["python3", "-c", "import socket; socket.create_connection((\'1.1.1.1\', 53), 3)"]\n'
        'network = "none"\n'
    )
    return str(path)


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def make_repo(path: Path) -> Path:
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    (path / "README.md").write_text("project\n")
    git(path, "add", "-A")
    git(path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    return path


def report_of(client: httpx.Client, worker_id: str) -> dict[str, Any]:
    lines = log_lines(client, worker_id)
    line = next((line for line in lines if line.startswith("REPORT ")), None)
    assert line is not None, (
        client.get(f"/api/supervisor/workers/{worker_id}").json()["status_reason"],
        lines,
    )
    result: dict[str, Any] = json.loads(line[len("REPORT ") :])
    return result


def test_hostile_agent_reaches_only_its_own_worktree(servers: ServerFactory) -> None:
    other_repo = make_repo(servers.root / "other-repo")
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents(servers.root))
    data = servers.root / "data"
    with server.client() as client:
        sibling_job = submit(client, agent="sleeper")
        sibling = wait_until(lambda: next(iter(workers_of(client, sibling_job["id"])), None), what="sibling")
        spec = {
            "data": str(data),
            "server_pid": server.process.pid,
            "sibling": str(data / "workspaces" / sibling["id"]),
            "other_repo": str(other_repo),
            "server_cwd": str(servers.root),
        }
        job = submit(client, agent="attack", task_description=json.dumps(spec))
        done = wait_final(client, job["id"], timeout=60)
        worker = workers_of(client, job["id"])[0]
        report = report_of(client, worker["id"])  # the script ran: its own report is in the log
        assert done["status"] == "COMPLETED", (done, report)
        for attack in (
            "secret_key", "database", "data_listing", "server_environ", "any_environ_secret", "kill_server",
            "sibling_worktree", "other_repository", "server_cwd", "write_etc", "write_usr", "write_data",
            "shadow", "remount", "unshare", "core_pattern",
        ):  # fmt: skip
            assert report[attack].startswith("blocked"), (attack, report[attack])
        assert report["own_worktree"] == "mine.txt" and report["own_tmp"] == "/tmp/mine.txt"
        assert (
            report["uid"] != 0 and report["cap_eff"] == "0000000000000000" and report["no_new_privs"] == "1"
        )
        assert report["secret_in_env"] is False and report["token_in_env"] is True
        assert not (data / "pwned").exists()
        assert (data / "workspaces" / worker["id"] / "mine.txt").read_text() == "pwned"
        assert client.get("/health").status_code == 200  # the server is alive
        client.post(f"/api/jobs/{sibling_job['id']}/cancel")


def test_memory_hog_fails_out_of_memory_and_fork_bomb_is_contained(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents(servers.root))
    with server.client() as client:
        hog = submit(client, agent="hog")
        forks = submit(client, agent="forks")
        done = wait_final(client, hog["id"], timeout=60)
        worker = workers_of(client, hog["id"])[0]
        assert done["status"] == "FAILED"
        assert worker["status_reason"].startswith("out of memory"), worker["status_reason"]
        assert "64 MiB" in worker["status_reason"]
        wait_final(client, forks["id"], timeout=60)
        worker = workers_of(client, forks["id"])[0]
        assert any(line.startswith("fork refused after") for line in log_lines(client, worker["id"]))
        assert worker["status"] == "FAILED" and "process limit" in worker["status_reason"], worker
        assert "24 processes" in worker["status_reason"]
        assert client.get("/health").status_code == 200


def test_git_worktree_cannot_rewrite_another_branch(servers: ServerFactory) -> None:
    repo = make_repo(servers.root / "project")
    main_before = git(repo, "rev-parse", "main")
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents(servers.root))
    with server.client() as client:
        job = submit(client, agent="git", repository=str(repo))
        assert wait_final(client, job["id"], timeout=60)["status"] == "COMPLETED"
        worker = workers_of(client, job["id"])[0]
        lines = log_lines(client, worker["id"])
        # Git works in the worktree, the agent's own commit too (on refs only its view holds),
        # and whatever it does to refs and config there (main moved by update-ref; `branch -f`
        # refuses, main being checked out in the main worktree; a hooks path set) stays
        # in its private copy of the common dir: the repository's main and config are untouched.
        for step in ("add work.txt", "commit", "update-ref refs/heads/main", "config core.hooksPath"):
            assert any(line.startswith(f"{step} -> 0") for line in lines), (step, lines)
    assert git(repo, "rev-parse", "main") == main_before
    assert "hookspath" not in git(repo, "config", "--list").lower()
    assert git(repo, "show", f"{worker['branch']}:work.txt") == "mine"


def test_network_none_and_sandboxed_worker_survives_kill9_and_is_adopted(servers: ServerFactory) -> None:
    first = servers.start(ORCHESTRATOR_AGENTS_FILE=agents(servers.root))
    with first.client() as client:
        offline = submit(client, agent="offline")
        assert wait_final(client, offline["id"], timeout=60)["status"] == "FAILED"
        job = submit(client, agent="sleeper")
        worker = wait_until(
            lambda: next((w for w in workers_of(client, job["id"]) if w["status"] == "RUNNING"), None)
        )
        wait_until(lambda: "up" in log_lines(client, worker["id"]), what="sleeper up")
    inside = session_processes(worker["pid"])
    first.kill9()
    assert session_processes(worker["pid"]).keys() == inside.keys()  # the sandbox outlived the server
    second = servers.make(port=first.port, ORCHESTRATOR_AGENTS_FILE=agents(servers.root)).start()
    with second.client() as client:
        wait_until(
            lambda: client.get(f"/api/supervisor/workers/{worker['id']}").json()["pid"] == worker["pid"],
            what="adopted",
        )
        assert client.post(f"/api/supervisor/workers/{worker['id']}/terminate").status_code == 200
        wait_until(lambda: not session_processes(worker["pid"]), timeout=20, what="no process left")
        assert wait_final(client, job["id"])["status"] == "FAILED"


def test_job_limits_are_validated_and_applied(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents(servers.root))
    with server.client() as client:
        for bad in ({"memory_mb": "lots"}, {"memory_mb": 0}, {"pids": -1}, {"network": "some"}, {"cpu": 1}):
            response = client.post("/api/jobs/submit", json={"task_description": "x", "limits": bad})
            assert response.status_code == 422, (bad, response.text)
        above = client.post(
            "/api/jobs/submit", json={"task_description": "x", "agent": "hog", "limits": {"memory_mb": 4096}}
        )
        assert above.status_code == 400 and "maximum" in above.json()["detail"], above.text
        network = client.post(
            "/api/jobs/submit",
            json={"task_description": "x", "agent": "offline", "limits": {"network": "on"}},
        )
        assert network.status_code == 400 and "network" in network.json()["detail"]
        job = submit(client, agent="hog", limits={"memory_mb": 48})
        assert job["limits"] == {"memory_mb": 48}
        assert wait_final(client, job["id"], timeout=60)["status"] == "FAILED"
        worker = workers_of(client, job["id"])[0]
        assert worker["status_reason"] == "out of memory: killed at its memory limit of 48 MiB", worker


def test_admission_holds_a_worker_until_memory_frees(servers: ServerFactory) -> None:
    meminfo = servers.root / "meminfo"
    meminfo.write_text(f"MemTotal: {4096 * 1024} kB\nMemAvailable: {300 * 1024} kB\n")
    server = servers.start(
        ORCHESTRATOR_AGENTS_FILE=agents(servers.root),
        ORCHESTRATOR_MEMINFO_PATH=str(meminfo),
        ORCHESTRATOR_MEMORY_HEADROOM_MB="0",
    )
    with server.client() as client:
        first = submit(client, agent="sleeper", limits={"memory_mb": 200})
        running = wait_until(
            lambda: next((w for w in workers_of(client, first["id"]) if w["status"] == "RUNNING"), None)
        )
        second = submit(client, agent="sleeper", limits={"memory_mb": 200})
        held = wait_until(
            lambda: next(
                (
                    w
                    for w in workers_of(client, second["id"])
                    if (w["status_reason"] or "").startswith("waiting")
                ),
                None,
            ),
            what="second worker held for memory",
        )
        assert held["status"] == "IDLE" and held["pid"] is None
        assert held["status_reason"] == "waiting for memory: needs 200 MiB, 100 available"
        assert session_processes(running["pid"])  # the running worker is never evicted
        client.post(f"/api/supervisor/workers/{running['id']}/terminate")
        wait_until(
            lambda: any(w["status"] == "RUNNING" for w in workers_of(client, second["id"])),
            what="second worker starts once memory frees",
        )
        client.post(f"/api/jobs/{second['id']}/cancel")


def test_endless_fork_bomb_is_stopped_and_leaves_nothing(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents(servers.root))
    with server.client() as client:
        job = submit(client, agent="bomb")
        worker = wait_until(lambda: next(iter(workers_of(client, job["id"])), None), what="worker")
        assert wait_final(client, job["id"], timeout=60)["status"] == "FAILED"
        worker = client.get(f"/api/supervisor/workers/{worker['id']}").json()
        assert worker["status_reason"].startswith("process limit: it reached its limit of 32 processes")
        wait_until(lambda: not session_processes(worker["pid"]), timeout=30, what="no process left")
        assert client.get("/health").status_code == 200


def test_data_dir_is_private(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents(servers.root))
    data = servers.root / "data"
    with server.client() as client:
        job = submit(client, agent="sleeper")
        worker = wait_until(lambda: next(iter(workers_of(client, job["id"])), None), what="worker")
        run_dir = data / "runs" / worker["id"]
        wait_until(lambda: (run_dir / "output.log").exists(), what="output file")
        assert data.stat().st_mode & 0o777 == 0o700
        for path in (run_dir / "output.log", run_dir / "pid", *data.glob("orchestrator.db*")):
            assert path.stat().st_mode & 0o777 == 0o600, path
        client.post(f"/api/jobs/{job['id']}/cancel")


def test_never_silently_unsandboxed(servers: ServerFactory) -> None:
    empty = servers.root / "no-bwrap-here"
    empty.mkdir()
    # No bwrap on PATH: /ready says why, and workers fail with the reason instead of running bare.
    missing = servers.start(ORCHESTRATOR_AGENTS_FILE=agents(servers.root), PATH=str(empty))
    with missing.client() as client:
        ready = wait_until(lambda: (r := client.get("/ready")).status_code == 200 and r.json(), what="ready")
        assert ready["sandbox"] == {"status": "unavailable", "reason": "bwrap (bubblewrap) is not installed"}
        job = submit(client, agent="sleeper")
        assert wait_final(client, job["id"])["status"] == "FAILED"
        worker = workers_of(client, job["id"])[0]
        assert worker["status_reason"] == (
            "could not start: the worker sandbox cannot work on this host: bwrap (bubblewrap) is not installed"
        )
    missing.stop()
    # Switched off on purpose: said at start-up and in /ready, and workers run unconfined.
    off = servers.start(ORCHESTRATOR_AGENTS_FILE=agents(servers.root), ORCHESTRATOR_SANDBOX="off")
    with off.client() as client:
        ready = wait_until(lambda: (r := client.get("/ready")).status_code == 200 and r.json(), what="ready")
        assert ready["sandbox"]["status"] == "off"
        assert "UNSANDBOXED" in off.log()
        job = submit(client, agent="sleeper")
        worker = wait_until(
            lambda: next((w for w in workers_of(client, job["id"]) if w["status"] == "RUNNING"), None)
        )
        assert not any("bwrap" in cmd for _, cmd in session_processes(worker["pid"]).values())
        client.post(f"/api/jobs/{job['id']}/cancel")
