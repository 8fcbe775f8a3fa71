"""`LocalExecutor.hold`: every process of a worker stopped before the engine reads its live
worktree as root (the checkpoint before a delegation), a daemon that left the worker's process
group included; SIGCONT lets them all go on. Real sandboxed processes in this host's cgroups."""

from __future__ import annotations

import shutil
import signal
import sys
from pathlib import Path

import pytest

from orchestrator.agents.base import LaunchSpec
from orchestrator.executors import cgroups, sandbox
from orchestrator.executors.cgroups import Limits
from orchestrator.executors.local import LocalExecutor
from tests.support.wait import wait_until

GROUPS = cgroups.detect()
pytestmark = pytest.mark.skipif(
    not GROUPS.usable or shutil.which("bwrap") is None, reason="needs writable cgroups and bwrap"
)

DAEMON = r"""
import os, time
first = os.fork()
if first == 0:
    os.setsid()
    if os.fork() == 0:
        print("daemon", flush=True)
        while True:
            time.sleep(0.01)
    os._exit(0)
os.waitpid(first, 0)
while True:
    time.sleep(0.01)
"""


def states(worker_id: str) -> list[str]:
    found = []
    for pid in GROUPS.processes(worker_id):
        try:
            found.append(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
        except OSError:
            continue
    return found


def test_hold_stops_every_process_of_the_worker_until_sigcont(tmp_path: Path) -> None:
    host = sandbox.detect(tmp_path / "data")
    assert host.usable, host.problem
    ex = LocalExecutor(host, GROUPS, pool_size=0)
    work, run = tmp_path / "work", tmp_path / "run"
    work.mkdir()
    (run / "home").mkdir(parents=True)
    sandbox.give_to_agent(host, work, run / "home")
    script = tmp_path / "daemon.py"
    script.write_text(DAEMON)
    script.chmod(0o644)  # the agent's uid reads it whatever umask an earlier test left
    box = sandbox.SandboxSpec(work, run / "home", ro_binds=[str(script)])
    spec = LaunchSpec(argv=[sys.executable, str(script)])
    proc = ex.start("w_hold0000001", spec, work, run, sandbox=box, limits=Limits(256, 64))
    try:
        output = run / "output.log"
        wait_until(lambda: output.exists() and "daemon" in output.read_text().split(), what="daemon up")
        assert len(states(proc.worker_id)) >= 5 and "T" not in states(proc.worker_id)
        assert ex.hold(proc) is True
        assert set(states(proc.worker_id)) == {"T"}  # no waiting here: hold returned after it
        assert ex.send(proc, signal.SIGCONT)
        wait_until(lambda: "T" not in states(proc.worker_id), what="all continued")
    finally:
        ex.send(proc, signal.SIGKILL)
        ex.wait(proc, 30)
        wait_until(lambda: not GROUPS.processes(proc.worker_id), what="worker gone")
        ex.ending(proc.worker_id)
