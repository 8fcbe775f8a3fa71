"""Red team of what the engine does, as root, with a hostile worker's output and worktree, and of
the API as the worker's own token reaches it (docs/SANDBOX.md): a real sandboxed `command` worker
writes a log no terminal or database should take at face value, leaves files in its worktree that
the engine's commit (run as the server's user) must not follow, and calls the API against another
job tree. Each script reports what it did in its log, so no test passes because it did not run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.integration.test_engine_lifecycle import log_lines, submit, wait_final, workers_of
from tests.integration.test_sandbox import make_repo
from tests.support.agent_scripts import API_CALL
from tests.support.servers import ServerFactory
from tests.support.wait import wait_until

LONG_LINE_BYTES = 3_000_000

# Output nothing downstream should choke on: NUL (PostgreSQL text refuses it), invalid UTF-8,
# terminal escapes, CR, Unicode line separators, a line of megabytes, an unterminated tail.
FLOOD = rf"""
import os, sys
out = sys.stdout.buffer
out.write(b"NUL:\x00middle\x00end\n")
out.write(b"BAD-UTF8:\xff\xfe\xc3(\xed\xa0\x80\n")
out.write(b"ANSI:\x1b[2J\x1b]0;title\x07\x1b[31mred\x1b[0m\n")
out.write(b"CR:one\rtwo\n")
out.write("SEP:a\u2028b\u2029c\n".encode())
out.write(b"L" * {LONG_LINE_BYTES} + b"\n")
out.write(b"AFTER the flood\n")
out.write(b"TAIL-NO-NEWLINE")
out.flush()
"""

# Files in the worktree the engine's commit (git as root, outside the sandbox) meets: a fifo
# (a reader blocks forever), a socket, symlinks to host files and directories (followed as root
# they would copy a host secret into the result), odd names, a nested repository whose config
# runs a command, and a hard link to a host file.
TRAPS = r"""
import errno, json, os, socket, sys
spec = json.loads(sys.stdin.read())
report = {}
os.mkfifo("a-fifo")
listener = socket.socket(socket.AF_UNIX)
listener.bind("a-socket")
os.symlink(spec["secret"], "secret-link")
os.symlink(spec["secret_dir"], "secret-dir-link")
os.symlink("/", "root-link")
os.symlink(".", "loop")
open("new\nline.txt", "w").write("a name with a newline\n")
open("esc-\x1b[31m-name.txt", "w").write("an escape in a name\n")
os.makedirs("nested/.git/objects", exist_ok=True)
os.makedirs("nested/.git/refs/heads", exist_ok=True)
open("nested/.git/HEAD", "w").write("ref: refs/heads/main\n")
open("nested/.git/config", "w").write(
    "[core]\n\tfsmonitor = touch " + spec["marker"] + "\n\thooksPath = /tmp\n"
    "[filter \"evil\"]\n\tclean = touch " + spec["marker"] + "\n")
open(".gitattributes", "w").write("* filter=evil diff=evil\n")
open("nested/file.txt", "w").write("nested\n")
for name, target in (("passwd-hardlink", "/etc/passwd"), ("python-hardlink", sys.executable)):
    try:
        os.link(target, name)
        report[name] = "made"
    except OSError as exc:
        report[name] = errno.errorcode.get(exc.errno, str(exc.errno))
open("work.txt", "w").write("the agent's work\n")
report["made"] = sorted(os.listdir("."))
print("REPORT " + json.dumps(report), flush=True)
"""

# The worker's own token against another job tree, its limits and the server's secret.
API = (
    API_CALL
    + r"""
import json, os, sys, urllib.request, base64, hmac, hashlib
spec = json.loads(sys.stdin.read())
other_job, other_worker = spec["other_job"], spec["other_worker"]
me = os.environ["ORCHESTRATOR_WORKER_ID"]
depth = int(os.environ["ORCHESTRATOR_DEPTH"])
r = {}
r["other_worker"] = call("GET", "/api/supervisor/workers/" + other_worker)[0]
r["other_logs"] = call("GET", "/api/supervisor/workers/" + other_worker + "/logs")[0]
r["pause_other"] = call("POST", "/api/supervisor/workers/" + other_worker + "/pause")[0]
r["resume_other"] = call("POST", "/api/supervisor/workers/" + other_worker + "/resume")[0]
r["terminate_other"] = call("POST", "/api/supervisor/workers/" + other_worker + "/terminate")[0]
r["cancel_other"] = call("POST", "/api/jobs/" + other_job + "/cancel")[0]
r["other_usage"] = call("GET", "/api/jobs/" + other_job + "/usage")[0]
r["other_result"] = call("GET", "/api/jobs/" + other_job + "/result")[0]
r["other_events"] = call("GET", "/api/jobs/" + other_job + "/events")[0]
r["workers_listed"] = sorted(w["id"] for w in call("GET", "/api/supervisor/workers")[1]["workers"])
r["workspaces_listed"] = call("GET", "/api/workspaces")[1].get("total")
r["pause_self"] = call("POST", "/api/supervisor/workers/" + me + "/pause")[0]
r["release"] = call("POST", "/api/resources/release", {"job_id": other_job})[0]
r["child_too_deep"] = call("POST", "/api/jobs/submit", {"task_description": "x", "parent_job_id": JOB, "depth": 6})[0]
r["child_same_depth"] = call("POST", "/api/jobs/submit", {"task_description": "x", "parent_job_id": JOB, "depth": depth})[0]
r["child_many_workers"] = call("POST", "/api/jobs/submit", {"task_description": "x", "parent_job_id": JOB, "depth": depth + 1, "worker_count": 10000})[0]
# Nested and huge bodies.
def raw_post(path, data):
    req = urllib.request.Request(URL + path, method="POST", data=data)
    req.add_header("Authorization", "Bearer " + TOKEN)
    req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError as e:  # the server answered and closed before reading it all
        return "closed:" + type(e).__name__
r["nested_json"] = raw_post("/api/jobs/submit", b"[" * 200000 + b"]" * 200000)
r["nested_options"] = raw_post("/api/jobs/submit", json.dumps({"task_description": "x", "parent_job_id": JOB, "depth": depth + 1,
    "agent_options": json.loads("{\"a\":" * 500 + "1" + "}" * 500)}).encode())
r["huge_body"] = raw_post("/api/jobs/submit", b"{\"task_description\": \"" + b"x" * (40 << 20) + b"\"}")
# Tokens it makes itself: no signature, a guessed key, its own token with the claims changed.
def b64(data):
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
def with_token(tok, path):
    req = urllib.request.Request(URL + path)
    req.add_header("Authorization", "Bearer " + tok)
    try:
        with urllib.request.urlopen(req) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
claims = {"sub": "admin", "scopes": ["jobs:read", "jobs:write", "supervisor:read", "supervisor:write", "resources:write"], "exp": 9999999999}
unsigned = b64({"alg": "none", "typ": "JWT"}) + "." + b64(claims) + "."
r["alg_none"] = with_token(unsigned, "/api/jobs/" + other_job)
body = b64({"alg": "HS256", "typ": "JWT"}) + "." + b64(claims)
for key in (b"", b"secret", b"changeme"):
    sig = base64.urlsafe_b64encode(hmac.new(key, body.encode(), hashlib.sha256).digest()).rstrip(b"=").decode()
    r["guessed_key_" + (key.decode() or "empty")] = with_token(body + "." + sig, "/api/jobs/" + other_job)
head, payload, sig = TOKEN.split(".")
mine = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
mine.update(jid=other_job, exp=9999999999)
r["own_token_claims_changed"] = with_token(head + "." + b64(mine) + "." + sig, "/api/jobs/" + other_job)
r["secret_in_env"] = [k for k in os.environ if "SECRET" in k or "DATABASE" in k]
r["own_job"] = call("GET", "/api/jobs/" + JOB)[0]
print("REPORT " + json.dumps(r), flush=True)
"""
)


def agents(root: Path) -> str:
    scripts = root / "redteam-engine-scripts"  # bound read-only into the sandbox (ro_binds)
    scripts.mkdir(exist_ok=True)
    for name, body in (("flood.py", FLOOD), ("traps.py", TRAPS), ("api.py", API)):
        (scripts / name).write_text(body)
    py, binds = sys.executable, f'ro_binds = ["{scripts}"]\n'
    path = root / "redteam-engine-agents.toml"
    path.write_text(
        f'[agents.flood]\ncommand = ["{py}", "{scripts / "flood.py"}"]\n{binds}'
        f'[agents.traps]\ncommand = ["{py}", "{scripts / "traps.py"}"]\n{binds}'
        f'[agents.api]\ncommand = ["{py}", "{scripts / "api.py"}"]\n{binds}'
        '[agents.sleeper]\ncommand = ["bash", "-c", "echo up; sleep 600 & wait"]\n'
        # The set-up failure file the engine reads from the worker's HOME when it ends, made a
        # link to a host file named in the task, a fifo, or /dev/zero.
        '[agents.forge_link]\ncommand = ["sh", "-c", "read target; ln -s \\"$target\\" \\"$HOME/.orchestrator-setup-failed\\" && echo FORGED link"]\n'
        '[agents.forge_fifo]\ncommand = ["sh", "-c", "mkfifo \\"$HOME/.orchestrator-setup-failed\\" && echo FORGED fifo"]\n'
        '[agents.forge_zero]\ncommand = ["sh", "-c", "ln -s /dev/zero \\"$HOME/.orchestrator-setup-failed\\" && echo FORGED zero"]\n'
    )
    return str(path)


def report_of(client: httpx.Client, worker_id: str) -> dict[str, Any]:
    lines = log_lines(client, worker_id)
    line = next((line for line in lines if line.startswith("REPORT ")), None)
    assert line is not None, (
        client.get(f"/api/supervisor/workers/{worker_id}").json()["status_reason"],
        lines,
    )
    result: dict[str, Any] = json.loads(line.removeprefix("REPORT "))
    return result


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True, text=True).stdout


def test_hostile_output_is_stored_whole_and_the_server_stays_healthy(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents(servers.root))
    with server.client() as client:
        job = submit(client, agent="flood")
        done = wait_final(client, job["id"], timeout=120)
        worker = workers_of(client, job["id"])[0]
        lines = log_lines(client, worker["id"])
        assert done["status"] == "COMPLETED", (done, worker["status_reason"], lines[:5])
        # Every line is there, in order, the unterminated tail too; NUL and invalid UTF-8 are
        # stored as U+FFFD (a database text column cannot hold NUL), escapes are kept as text.
        assert lines[0] == "NUL:\ufffdmiddle\ufffdend", lines[0]
        assert lines[1].startswith("BAD-UTF8:\ufffd") and "\x00" not in "".join(lines)
        assert lines[2] == "ANSI:\x1b[2J\x1b]0;title\x07\x1b[31mred\x1b[0m"
        assert "CR:one\rtwo" in lines or lines[3:5] == ["CR:one", "two"]
        long_part = [line for line in lines if line and set(line) == {"L"}]
        assert sum(len(line) for line in long_part) == LONG_LINE_BYTES
        assert lines[-2:] == ["AFTER the flood", "TAIL-NO-NEWLINE"], lines[-3:]
        assert client.get("/health").status_code == 200
        # The server's own log stays one record a line (no agent-written line breaks or escapes).
        assert "\x1b[2J" not in server.log()


def test_worktree_traps_are_committed_as_links_never_followed(servers: ServerFactory) -> None:
    repo = make_repo(servers.root / "project")
    secret_dir = servers.root / "host-secrets"
    secret_dir.mkdir()
    secret = secret_dir / "secret.txt"
    secret.write_text("HOST-SECRET-CONTENT\n")
    marker = servers.root / "PWNED"
    config_before = git(repo, "config", "--list", "--local")
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents(servers.root))
    with server.client() as client:
        spec = {"secret": str(secret), "secret_dir": str(secret_dir), "marker": str(marker)}
        job = submit(client, agent="traps", repository=str(repo), task_description=json.dumps(spec))
        done = wait_final(client, job["id"], timeout=120)
        worker = workers_of(client, job["id"])[0]
        report = report_of(client, worker["id"])
        assert done["status"] == "COMPLETED", (done, worker["status_reason"], report)
        assert {"a-fifo", "a-socket", "secret-link", "loop", "nested"} <= set(report["made"])
        # Hard links across the sandbox's mounts are refused (EXDEV): no host inode in the worktree.
        assert report["passwd-hardlink"] in ("EXDEV", "EPERM") and report["python-hardlink"] in (
            "EXDEV",
            "EPERM",
        )
        branch = worker["branch"]
        tree = git(repo, "ls-tree", "-r", "-z", "--full-tree", branch).split("\0")
        entries = {item.split("\t", 1)[1]: item.split()[0] for item in tree if item}
        # Symlinks are committed as symlinks: their target's path, never the host file's content.
        for link, target in (
            ("secret-link", secret),
            ("secret-dir-link", secret_dir),
            ("root-link", "/"),
            ("loop", "."),
        ):
            assert entries.get(link) == "120000", (link, entries, worker)
            assert git(repo, "cat-file", "-p", f"{branch}:{link}") == str(target)
        assert "a-fifo" not in entries and "a-socket" not in entries
        assert "new\nline.txt" in entries and "work.txt" in entries
        assert subprocess.run(["git", "grep", "-q", "HOST-SECRET-CONTENT", branch], cwd=repo).returncode == 1
        assert not marker.exists()  # no command of the agent's nested config ran as root
        assert git(repo, "config", "--list", "--local") == config_before
        result = client.get(f"/api/jobs/{job['id']}/result")
        assert result.status_code == 200, result.text
        diff = client.get(f"/api/jobs/{job['id']}/diff")
        assert diff.status_code == 200 and "HOST-SECRET-CONTENT" not in diff.text
        assert client.get("/health").status_code == 200


def test_worker_token_cannot_reach_another_tree_or_its_own_limits(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents(servers.root))
    with server.client() as client:
        other = submit(client, agent="sleeper")
        other_worker = wait_until(
            lambda: next((w for w in workers_of(client, other["id"]) if w["status"] == "RUNNING"), None),
            what="the other tree's worker",
        )
        spec = {"other_job": other["id"], "other_worker": other_worker["id"]}
        job = submit(client, agent="api", task_description=json.dumps(spec))
        done = wait_final(client, job["id"], timeout=120)
        worker = workers_of(client, job["id"])[0]
        r = report_of(client, worker["id"])
        assert done["status"] == "COMPLETED", (done, r)
        assert r["own_job"] == 200  # its token worked for what it may do
        for name in (
            "other_worker", "other_logs", "pause_other", "resume_other", "terminate_other", "cancel_other",
            "other_usage", "other_result", "other_events",
        ):  # fmt: skip
            assert r[name] in (403, 404), (name, r[name])
        assert r["workers_listed"] == [worker["id"]]
        assert r["pause_self"] == 403 and r["release"] == 403
        for name in ("child_too_deep", "child_same_depth", "child_many_workers"):
            assert r[name] in (400, 403, 422), (name, r[name])
        assert r["nested_json"] in (400, 413, 422) and r["nested_options"] in (400, 422)
        assert r["huge_body"] == 413 or str(r["huge_body"]).startswith("closed:"), r["huge_body"]
        for name in ("alg_none", "guessed_key_empty", "guessed_key_secret", "guessed_key_changeme"):
            assert r[name] == 401, (name, r[name])
        assert r["own_token_claims_changed"] == 401
        assert r["secret_in_env"] == []
        # The other tree is untouched.
        assert client.get(f"/api/supervisor/workers/{other_worker['id']}").json()["status"] == "RUNNING"
        assert client.get(f"/api/jobs/{other['id']}").json()["status"] == "RUNNING"
        client.post(f"/api/jobs/{other['id']}/cancel")


def test_a_forged_setup_failure_file_is_not_followed_or_blocked_on(servers: ServerFactory) -> None:
    secret = servers.root / "host-secrets" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("HOST-SECRET-CONTENT\n")
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents(servers.root))
    with server.client() as client:
        jobs = {
            "link": submit(client, agent="forge_link", task_description=f"{secret}\n"),
            "fifo": submit(client, agent="forge_fifo"),
            "zero": submit(client, agent="forge_zero"),
        }
        for kind, job in jobs.items():
            done = wait_final(client, job["id"], timeout=120)  # the engine never blocks on a fifo
            worker = workers_of(client, job["id"])[0]
            assert f"FORGED {kind}" in log_lines(client, worker["id"])  # the agent made its trap
            assert done["status"] == "COMPLETED", (kind, worker["status_reason"])
            assert "HOST-SECRET" not in (worker["status_reason"] or "")
        # The engine still runs workers afterwards.
        after = submit(client, agent="forge_zero")
        assert wait_final(client, after["id"], timeout=120)["status"] == "COMPLETED"
        assert client.get("/health").status_code == 200


# A parent agent commits links into its branch (un-ignoring the copied file first), then starts a
# child job from that branch: the engine's set-up copy into the child's new worktree meets them.
DELEGATOR = (
    API_CALL
    + r"""
import json, os, sys, time
import shutil
victim = sys.stdin.read().strip()
open(".gitignore", "w").write("")
os.remove(".env")  # the copies the engine made for this worker
shutil.rmtree("conf")
os.symlink(victim, ".env")
os.symlink(os.path.dirname(victim), "conf")
depth = int(os.environ["ORCHESTRATOR_DEPTH"])
branch = "orchestrator/" + JOB + "/" + os.environ["ORCHESTRATOR_WORKER_ID"]
code, child = call("POST", "/api/jobs/submit", {"task_description": "child", "parent_job_id": JOB,
                   "depth": depth + 1, "base_ref": branch, "agent": "quiet"})
print("SUBMITTED", code, flush=True)
while call("GET", "/api/jobs/" + child["id"])[1]["status"] not in ("COMPLETED", "FAILED", "CANCELED"):
    time.sleep(0.1)
print("CHILD", call("GET", "/api/jobs/" + child["id"])[1]["status"], flush=True)
"""
)


def test_setup_copy_never_writes_through_links_a_parent_committed(servers: ServerFactory) -> None:
    repo = make_repo(servers.root / "project")
    (repo / ".gitignore").write_text(".env\nconf/\n")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "ignore copied files")
    (repo / ".env").write_text("SECRET=42\n")
    (repo / "conf").mkdir()
    (repo / "conf" / "victim.txt").write_text("from the repository\n")
    victim_dir = servers.root / "host-dir"
    victim_dir.mkdir()
    victim = victim_dir / "victim.txt"
    victim.write_text("ORIGINAL host file\n")
    scripts = servers.root / "delegator-scripts"
    scripts.mkdir()
    (scripts / "delegator.py").write_text(DELEGATOR)
    config = servers.root / "delegator-agents.toml"
    config.write_text(
        f'[agents.delegator]\ncommand = ["{sys.executable}", "{scripts / "delegator.py"}"]\n'
        f'ro_binds = ["{scripts}"]\n'
        '[agents.quiet]\ncommand = ["true"]\n'
        f'[repositories."{repo}"]\ncopy = [".env", "conf"]\n'
    )
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=str(config))
    with server.client() as client:
        job = submit(client, agent="delegator", repository=str(repo), task_description=str(victim))
        wait_final(client, job["id"], timeout=120)
        parent = workers_of(client, job["id"])[0]
        lines = log_lines(client, parent["id"])
        assert "SUBMITTED 201" in lines and any(line.startswith("CHILD ") for line in lines), lines
        children = client.get("/api/jobs", params={"parent_job_id": job["id"]}).json()["jobs"]
        (child,) = [j for j in children if j["id"] != job["id"]]
        child_worker = workers_of(client, child["id"])[0]
        # The child's worktree holds the parent's links; the copy refused to go through them.
        assert child_worker["status"] == "FAILED", child_worker
        assert "symbolic link in the worktree" in child_worker["status_reason"], child_worker
    assert victim.read_text() == "ORIGINAL host file\n"
    assert sorted(p.name for p in victim_dir.iterdir()) == ["victim.txt"]
