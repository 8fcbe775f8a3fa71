"""`merge_subjob` (issue 15): a worker merges its finished sub-job's result into its own worktree,
through the CLI with its worker token; and nobody else's (a worker is hostile code)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tests.integration.test_engine_lifecycle import log_lines, submit, wait_final, workers_of
from tests.integration.test_engine_workspaces_tokens import git, make_repo
from tests.support.agent_scripts import API_CALL
from tests.support.servers import ServerFactory

ORCHESTRATOR = Path(sys.executable).with_name("orchestrator")

PARENT = (
    API_CALL
    + r"""
import json, os, pathlib, subprocess, sys, time, urllib.request, urllib.error
pathlib.Path("parent.txt").write_text("from the parent\n")
_, child = call("POST", "/api/jobs/submit", {"task_description": "child", "depth": 1, "parent_job_id": JOB,
    "agent": "simulated", "agent_options": {"duration_seconds": 0, "files": {"child.txt": "from the child\n"}}})
results = {"early": call("POST", f"/api/jobs/{child['id']}/merge")[0]}
while call("GET", "/api/jobs/" + child["id"])[1]["status"] not in ("COMPLETED", "FAILED", "CANCELED"):
    time.sleep(0.1)
done = subprocess.run([os.environ["ORCHESTRATOR_CLI"], "merge-subjob", child["id"]], capture_output=True, text=True)
print("CLI", done.returncode, done.stdout.strip().replace("\n", " | "), done.stderr.strip(), flush=True)
results["seen"] = pathlib.Path("child.txt").read_text() if pathlib.Path("child.txt").exists() else None
results["again"] = call("POST", f"/api/jobs/{child['id']}/merge")[1].get("status")
other = pathlib.Path(os.environ["OTHER_FILE"]).read_text().strip()
results["other_child"] = call("POST", f"/api/jobs/{other}/merge")[0]
results["own_job"] = call("POST", f"/api/jobs/{JOB}/merge")[0]
print("RESULTS " + json.dumps(results), flush=True)
"""
)


def profiles(root: Path) -> str:
    scripts = root / "agent-scripts"  # bound read-only into the worker sandbox
    scripts.mkdir(exist_ok=True)
    (scripts / "parent.py").write_text(PARENT)
    path = root / "merge-agents.toml"
    path.write_text(
        f'[agents.parent]\ncommand = ["{sys.executable}", "{scripts / "parent.py"}"]\n'
        f'env = {{ ORCHESTRATOR_CLI = "{ORCHESTRATOR}", OTHER_FILE = "{scripts / "other_job"}" }}\n'
        f'ro_binds = ["{scripts}"]\n'
    )
    return str(path)


def test_worker_merges_its_sub_job_and_nobody_elses(servers: ServerFactory) -> None:
    repo = make_repo(servers.root)
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=profiles(servers.root))
    with server.client() as client:
        # Another tree's finished child: the worker must not be able to merge it.
        other_root = submit(
            client,
            repository=str(repo),
            agent_options={"duration_seconds": 0, "subtasks": [{"task_description": "theirs"}]},
        )
        assert wait_final(client, other_root["id"])["status"] == "COMPLETED"
        other_child = client.get("/api/jobs", params={"parent_job_id": other_root["id"]}).json()["jobs"][0]
        (servers.root / "agent-scripts" / "other_job").write_text(other_child["id"])
        user = client.post(f"/api/jobs/{other_child['id']}/merge")
        assert user.status_code == 403 and "worker" in user.json()["detail"]

        job = submit(client, agent="parent", repository=str(repo))
        done = wait_final(client, job["id"], timeout=90)
        [worker] = workers_of(client, job["id"])
        lines = log_lines(client, worker["id"])
        assert done["status"] == "COMPLETED", (done, lines[-5:])
        cli = next(line for line in lines if line.startswith("CLI "))
        assert cli.startswith("CLI 0 Merged orchestrator/j_") and "child.txt" in cli, cli
        results: dict[str, Any] = json.loads(
            next(x for x in lines if x.startswith("RESULTS ")).removeprefix("RESULTS ")
        )
        assert results == {
            "early": 404,  # not integrated yet
            "seen": "from the child\n",
            "again": "already merged",
            "other_child": 403,
            "own_job": 403,
        }, results
        # The merge is on the worker's own branch (a real merge commit), and in the job's result.
        assert git(repo, "show", f"{worker['branch']}:child.txt") == "from the child"
        subjects = git(repo, "log", "--merges", "--format=%s", worker["branch"])
        assert "orchestrator: merge sub-job" in subjects
        result = f"orchestrator/{job['id']}/result"
        assert git(repo, "show", f"{result}:child.txt") == "from the child"
        assert git(repo, "show", f"{result}:parent.txt") == "from the parent"


TAMPERER = (
    API_CALL
    + r"""
import json, os, pathlib, subprocess, time, urllib.request, urllib.error
_, child = call("POST", "/api/jobs/submit", {"task_description": "child", "depth": 1, "parent_job_id": JOB,
    "agent": "simulated", "agent_options": {"duration_seconds": 0, "files": {"child.txt": "from the child\n"}}})
while call("GET", "/api/jobs/" + child["id"])[1]["status"] not in ("COMPLETED", "FAILED", "CANCELED"):
    time.sleep(0.1)
# The worktree's admin dir (HEAD, index) is the agent's to write: aim it at another repository.
admin = pathlib.Path(subprocess.run(["git", "rev-parse", "--absolute-git-dir"], capture_output=True, text=True).stdout.strip())
victim = os.environ["VICTIM"]
results = {}
(admin / "commondir").write_text(victim + "/.git\n")
results["commondir"] = call("POST", f"/api/jobs/{child['id']}/merge")
(admin / "commondir").write_text("../..\n")
(admin / "MERGE_MSG").unlink(missing_ok=True)
(admin / "MERGE_MSG").symlink_to(victim + "/target.txt")
results["link"] = call("POST", f"/api/jobs/{child['id']}/merge")
print("RESULTS " + json.dumps(results), flush=True)
"""
)


def test_a_worker_that_rewires_its_git_dir_cannot_make_the_merge_write_elsewhere(
    servers: ServerFactory,
) -> None:
    """The parent's worktree admin dir is writable in its sandbox: a `commondir` aimed at another
    repository and a MERGE_MSG linked to another file must not make the server's git write there."""
    repo = make_repo(servers.root)
    victim = servers.root / "victim"
    victim.mkdir()
    git(victim, "init", "-q", "-b", "main")
    (victim / "target.txt").write_text("untouched\n")
    git(victim, "add", "-A")
    git(victim, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "victim")
    victim_refs = git(victim, "for-each-ref")
    scripts = servers.root / "agent-scripts"
    scripts.mkdir(exist_ok=True)
    (scripts / "tamperer.py").write_text(TAMPERER)
    agents = servers.root / "tamper-agents.toml"
    agents.write_text(
        f'[agents.tamperer]\ncommand = ["{sys.executable}", "{scripts / "tamperer.py"}"]\n'
        f'env = {{ VICTIM = "{victim}" }}\nro_binds = ["{scripts}"]\n'
    )
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=str(agents))
    with server.client() as client:
        job = submit(client, agent="tamperer", repository=str(repo))
        wait_final(client, job["id"], timeout=90)
        [worker] = workers_of(client, job["id"])
        lines = log_lines(client, worker["id"])
        line = next((x for x in lines if x.startswith("RESULTS ")), None)
        assert line is not None, lines[-10:]
        results = json.loads(line.removeprefix("RESULTS "))
    # Aimed elsewhere, the merge still went to the worker's own repository (its branch), or was
    # refused with a clear 409: never into the victim.
    status, body = results["commondir"]
    assert status in (200, 409), results
    assert status == 409 or body["status"] == "merged", results
    status, body = results["link"]
    assert status in (200, 409), results
    if status == 409:
        assert "symbolic link" in body["detail"], body
    assert (victim / "target.txt").read_text() == "untouched\n"
    assert git(victim, "for-each-ref") == victim_refs
    assert git(victim, "status", "--porcelain") == ""


SWAPPER = r"""
import json, os, sys
# The hostile worker's background process: it swaps the worktree's `sub` directory for a link to
# a host directory and back, as fast as it can, and watches for the merged file. The merge's last
# write to the worktree's admin dir (its index, replaced after git has run) comes after git has
# written the file: a loop that runs during the merge can see the file with the old index.
admin, victim = sys.argv[1], os.environ["VICTIM"]
def index():
    try:
        return os.stat(os.path.join(admin, "index")).st_ino
    except OSError:
        return None
before, n, seen = index(), 0, None
open("/tmp/swapping", "w").close()
def look():
    if seen is None and any(os.path.lexists(p) for p in ("sub/a.txt", "sub.x/a.txt")):
        return {"n": n, "index_unchanged": index() == before}
    return seen
while not os.path.exists("/tmp/merged"):
    n += 1
    seen = look()
    for step in (lambda: os.rename("sub", "sub.x"), lambda: os.symlink(victim, "sub"),
                 lambda: os.unlink("sub"), lambda: os.rename("sub.x", "sub")):
        try:
            step()
        except OSError:
            pass
seen = look()  # held through the merge, it may not have looked since
print("WITNESS " + json.dumps({"iterations": n, "seen": seen}), flush=True)
"""

SWAPPING_PARENT = (
    API_CALL
    + r"""
import json, os, pathlib, subprocess, sys, time
_, child = call("POST", "/api/jobs/submit", {"task_description": "child", "depth": 1, "parent_job_id": JOB,
    "agent": "simulated", "agent_options": {"duration_seconds": 0, "files": {"sub/a.txt": "from the child\n"}}})
while call("GET", "/api/jobs/" + child["id"])[1]["status"] not in ("COMPLETED", "FAILED", "CANCELED"):
    time.sleep(0.1)
admin = subprocess.run(["git", "rev-parse", "--absolute-git-dir"], capture_output=True, text=True).stdout.strip()
os.mkdir("sub")
loop = subprocess.Popen([sys.executable, os.environ["SWAPPER"], admin])
while not os.path.exists("/tmp/swapping"):
    time.sleep(0.01)
refused = []
for _ in range(50):
    # Held while `sub` is the link, git refuses to overwrite it (an untracked file): again.
    status, body = call("POST", f"/api/jobs/{child['id']}/merge")
    if status != 409:
        break
    refused.append(body["detail"])
open("/tmp/merged", "w").close()
loop.wait()
print("RESULTS " + json.dumps({"merge": [status, body], "refused": refused}), flush=True)
"""
)


def test_a_worker_swapping_a_directory_for_a_link_is_held_during_the_merge(
    servers: ServerFactory,
) -> None:
    """The merge runs as root in the worker's live worktree: a background process of the worker
    that swaps the directory the merged file goes into for a link to a host directory must be
    stopped throughout the merge (it never sees the merged file before the merge's last write)
    and the host directory stays empty."""
    repo = make_repo(servers.root)
    victim = servers.root / "victim-dir"
    victim.mkdir()
    scripts = servers.root / "agent-scripts"
    scripts.mkdir(exist_ok=True)
    (scripts / "swapping.py").write_text(SWAPPING_PARENT)
    (scripts / "swapper.py").write_text(SWAPPER)
    agents = servers.root / "swap-agents.toml"
    agents.write_text(
        f'[agents.swapper]\ncommand = ["{sys.executable}", "{scripts / "swapping.py"}"]\n'
        f'env = {{ VICTIM = "{victim}", SWAPPER = "{scripts / "swapper.py"}" }}\n'
        f'ro_binds = ["{scripts}"]\n'
    )
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=str(agents))
    with server.client() as client:
        job = submit(client, agent="swapper", repository=str(repo))
        wait_final(client, job["id"], timeout=120)
        [worker] = workers_of(client, job["id"])
        lines = log_lines(client, worker["id"])
    found = {
        x.split(" ", 1)[0]: json.loads(x.split(" ", 1)[1])
        for x in lines
        if x.startswith(("RESULTS ", "WITNESS "))
    }
    assert set(found) == {"RESULTS", "WITNESS"}, lines[-10:]
    status, body = found["RESULTS"]["merge"]
    assert status == 200 and body["status"] == "merged", found
    assert all("untracked working tree files" in x for x in found["RESULTS"]["refused"]), found
    # Held: its loop did not run between git's first write and the merge's last one.
    seen = found["WITNESS"]["seen"]
    assert seen is not None and seen["index_unchanged"] is False, found
    assert list(victim.iterdir()) == []
