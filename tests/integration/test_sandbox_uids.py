"""A host uid per live worker (docs/SANDBOX.md, executors/uids.py), with real servers and real
sandboxed hostile workers: two workers run as different uids, one cannot read or change what the
other left in a shared rw_bind, the agent cannot drop its uid's lease, and a worker re-adopted
after a kill -9 of the server keeps its uid while no other worker gets it."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.executors import uids
from tests.integration.test_engine_lifecycle import log_lines, submit, workers_of
from tests.support.checks import session_processes
from tests.support.servers import ServerFactory
from tests.support.wait import wait_until

HOLDER = r"""
import json, os, socket, sys, time
spec = json.loads(sys.stdin.read())
shared = spec["shared"]
with open(os.path.join(shared, "holder-file"), "w") as handle:  # the agent's default modes
    handle.write("the holder's")
os.mkdir(os.path.join(shared, "holder-dir"))
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind("\0orchestrator-test-" + spec["tag"])
server.listen(4)
print("HOLDER " + json.dumps({"uid": os.getuid()}), flush=True)
while True:
    conn, _ = server.accept()
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    print("PEER uid " + str(int.from_bytes(creds[4:8], "little")), flush=True)
    conn.sendall(b"hello")
    conn.close()
"""
PROBER = r"""
import fcntl, json, os, socket, sys, time
spec = json.loads(sys.stdin.read())
shared = spec["shared"]
report = {"uid": os.getuid()}

def attempt(name, action):
    try:
        report[name] = "ok: " + str(action())[:100]
    except Exception as exc:
        report[name] = "blocked: " + type(exc).__name__

def write(path):
    with open(path, "a") as handle:
        handle.write("pwned")
    return path

def connect():
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect("\0orchestrator-test-" + spec["tag"])
    return sock.recv(16)

attempt("read_file", lambda: open(os.path.join(shared, "holder-file")).read())
attempt("write_file", lambda: write(os.path.join(shared, "holder-file")))
attempt("list_dir", lambda: os.listdir(os.path.join(shared, "holder-dir")))
attempt("write_in_dir", lambda: write(os.path.join(shared, "holder-dir", "x")))
attempt("chmod_file", lambda: os.chmod(os.path.join(shared, "holder-file"), 0o666))
attempt("abstract_socket", connect)
# Drop every lock this process could hold: a leaked lease descriptor would free its uid.
fds = sorted(int(fd) for fd in os.listdir("/proc/self/fd"))
for fd in fds:
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError:
        pass
report["fds"] = fds
print("REPORT " + json.dumps(report), flush=True)
time.sleep(600)
"""


def agents(root: Path, shared: Path) -> str:
    scripts = root / "uid-scripts"
    scripts.mkdir(exist_ok=True)
    (scripts / "holder.py").write_text(HOLDER)
    (scripts / "prober.py").write_text(PROBER)
    py = sys.executable
    binds = f'ro_binds = ["{scripts}"]\nrw_binds = ["{shared}"]\n'
    path = root / "uid-agents.toml"
    path.write_text(
        f'[agents.holder]\ncommand = ["{py}", "{scripts / "holder.py"}"]\n{binds}'
        f'[agents.prober]\ncommand = ["{py}", "{scripts / "prober.py"}"]\n{binds}'
        '[agents.whoami]\ncommand = ["bash", "-c", "echo uid $(id -u); sleep 600 & wait"]\n'
    )
    return str(path)


def shared_dir(root: Path) -> Path:
    shared = root / "shared"  # what an operator makes for workers of any uid to write into
    shared.mkdir()
    shared.chmod(0o1777)
    root.chmod(0o755)
    return shared


@pytest.fixture
def uid_range() -> Iterator[dict[str, str]]:
    """A range of this test's own: other servers on the host lease from theirs."""
    base = random.randrange(100_000, 2**31 - 10_000, 1000)
    yield {"ORCHESTRATOR_SANDBOX_UID": str(base), "ORCHESTRATOR_SANDBOX_UID_COUNT": "3"}
    uids.forget(uids.LEASE_DIR, range(base, base + 3))


def running(client: httpx.Client, job_id: str) -> dict[str, Any]:
    found: dict[str, Any] = wait_until(
        lambda: next((w for w in workers_of(client, job_id) if w["status"] == "RUNNING"), None),
        what="worker running",
    )
    return found


def line(client: httpx.Client, worker_id: str, prefix: str) -> str:
    found: str = wait_until(
        lambda: next((t for t in log_lines(client, worker_id) if t.startswith(prefix)), None),
        timeout=60,
        what=f"{prefix!r} in the log of {worker_id}",
    )
    return found[len(prefix) :]


def recorded(data: Path, worker_id: str) -> int:
    return int((data / "runs" / worker_id / "engine" / "uid").read_text())


def test_workers_run_as_different_uids_and_cannot_use_what_another_left(
    servers: ServerFactory, uid_range: dict[str, str]
) -> None:
    shared = shared_dir(servers.root)
    env = uid_range
    base = int(env["ORCHESTRATOR_SANDBOX_UID"])
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents(servers.root, shared), **env)
    data = servers.root / "data"
    tag = servers.root.name
    with server.client() as client:
        spec = json.dumps({"shared": str(shared), "tag": tag})
        holder = running(client, submit(client, agent="holder", task_description=spec)["id"])
        holder_uid = json.loads(line(client, holder["id"], "HOLDER "))["uid"]
        prober = running(client, submit(client, agent="prober", task_description=spec)["id"])
        report = json.loads(line(client, prober["id"], "REPORT "))
        assert holder_uid == recorded(data, holder["id"]) and report["uid"] == recorded(data, prober["id"])
        assert holder_uid != report["uid"] and {holder_uid, report["uid"]} <= set(range(base, base + 3))
        assert (shared / "holder-file").stat().st_uid == holder_uid
        for attack in ("read_file", "write_file", "list_dir", "write_in_dir", "chmod_file"):
            assert report[attack].startswith("blocked"), (attack, report)
        assert (shared / "holder-file").read_text() == "the holder's"
        # Abstract Unix sockets have no permissions: with network on, the prober reaches the
        # holder's (a known gap, docs/SANDBOX.md); the holder at least sees it is another uid.
        if report["abstract_socket"].startswith("ok"):
            assert line(client, holder["id"], "PEER uid ") == str(report["uid"])
        # The agent had no descriptor of its lease to unlock: both uids are still leased.
        lease_dir = uids.LEASE_DIR
        assert uids.held(lease_dir, holder_uid) and uids.held(lease_dir, report["uid"]), report["fds"]
        for worker in (holder, prober):
            assert client.post(f"/api/supervisor/workers/{worker['id']}/terminate").status_code == 200
        for worker, uid in ((holder, holder_uid), (prober, report["uid"])):
            wait_until(lambda w=worker: not session_processes(w["pid"]), timeout=30, what="no process left")
            wait_until(lambda u=uid: not uids.held(lease_dir, u), timeout=30, what=f"uid {uid} released")


def test_readopted_worker_keeps_its_uid_through_a_kill9(
    servers: ServerFactory, uid_range: dict[str, str]
) -> None:
    env = uid_range
    toml = agents(servers.root, shared_dir(servers.root))
    first = servers.start(ORCHESTRATOR_AGENTS_FILE=toml, **env)
    data = servers.root / "data"
    with first.client() as client:
        worker = running(client, submit(client, agent="whoami")["id"])
        uid = int(line(client, worker["id"], "uid "))
        assert uid == recorded(data, worker["id"]) and uids.held(uids.LEASE_DIR, uid)
    first.kill9()
    assert session_processes(worker["pid"])
    assert uids.held(uids.LEASE_DIR, uid)  # the worker's wrapper holds it, not the dead engine
    second = servers.make(port=first.port, ORCHESTRATOR_AGENTS_FILE=toml, **env).start()
    with second.client() as client:
        wait_until(
            lambda: client.get(f"/api/supervisor/workers/{worker['id']}").json()["pid"] == worker["pid"],
            what="adopted",
        )
        others = [running(client, submit(client, agent="whoami")["id"]) for _ in range(2)]
        # The range has 3 uids and the adopted worker holds one: the new ones get the other two.
        other_uids = {int(line(client, other["id"], "uid ")) for other in others}
        assert len(other_uids) == 2 and uid not in other_uids
        assert uids.held(uids.LEASE_DIR, uid)
        for each in (worker, *others):
            client.post(f"/api/supervisor/workers/{each['id']}/terminate")
        wait_until(lambda: not session_processes(worker["pid"]), timeout=30, what="no process left")
        for each_uid in (uid, *other_uids):
            wait_until(
                lambda u=each_uid: not uids.held(uids.LEASE_DIR, u),
                timeout=30,
                what=f"uid {each_uid} released",
            )
