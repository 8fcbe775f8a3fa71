"""Parked worker wrappers (executors/pool.py) with real processes and this host's real cgroups
(v1 here): a parked shell becomes a worker's wrapper in the worker's own groups, with its
limits, its stdin and the identity adoption relies on; parked shells end with their pool."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.agents.base import LaunchSpec
from orchestrator.executors import cgroups, sandbox
from orchestrator.executors.cgroups import Limits
from orchestrator.executors.local import LocalExecutor
from orchestrator.executors.pool import GROUP_PREFIX, PARKED_NAME, launch_script
from tests.support.wait import wait_until

GROUPS = cgroups.detect()
pytestmark = pytest.mark.skipif(
    GROUPS.version != "v1" or not GROUPS.usable or shutil.which("bwrap") is None,
    reason="parked wrappers need writable cgroup v1 controllers and bwrap (this project's test hosts)",
)


def executor(tmp_path: Path) -> LocalExecutor:
    host = sandbox.detect(tmp_path / "data")
    assert host.usable, host.problem
    ex = LocalExecutor(host, GROUPS, pool_size=2)
    assert ex.pool is not None and ex.pool.fill(60)
    return ex


def dirs(tmp_path: Path, name: str, ex: LocalExecutor) -> tuple[Path, Path, sandbox.SandboxSpec]:
    work, run = tmp_path / f"work-{name}", tmp_path / f"run-{name}"
    home = run / "home"
    home.mkdir(parents=True)
    work.mkdir()
    assert ex.sandbox is not None
    sandbox.give_to_agent(ex.sandbox, work, home)
    return work, run, sandbox.SandboxSpec(work, home)


def parked_pids() -> set[int]:
    found = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if PARKED_NAME.encode() in argv:
                found.add(int(name))
    return found


def test_a_parked_wrapper_becomes_the_worker_in_its_own_groups(tmp_path: Path) -> None:
    ex = executor(tmp_path)
    assert ex.pool is not None
    idle = {parked.pid for parked in ex.pool._idle}
    work, run, box = dirs(tmp_path, "a", ex)
    task = "the task\n" * 100
    script = "cat > task.txt; [ -e /proc/self/fd/3 ] && echo fd 3 leaked; echo started; sleep 600"
    spec = LaunchSpec(argv=["/bin/sh", "-c", script], stdin_text=task, env={"ORCHESTRATOR_X": "a 'b' $c"})
    proc = ex.start("w_pooltest_a", spec, work, run, sandbox=box, limits=Limits(96, 40))
    try:
        assert proc.pid in idle  # a parked shell, not a new spawn
        wait_until(lambda: (run / "output.log").exists() and "started" in (run / "output.log").read_text())
        assert (work / "task.txt").read_text() == task  # its own stdin pipe
        assert "leaked" not in (run / "output.log").read_text()  # the launch script's pipe is closed
        own = Path(f"/proc/{proc.pid}/cgroup").read_text()
        assert "pids:/orchestrator-workers/w_pooltest_a\n" in own, own
        assert f"/{cgroups.PARENT_NAME}/w_pooltest_a\n" in own.split("memory:", 1)[1], own
        assert ex.cgroups is not None and ex.cgroups.limit_of("w_pooltest_a") == (96, 40)
        # Adoption after a server restart finds it as it finds any wrapper.
        assert ex.find_started(run) == (proc.pid, proc.start_time)
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        assert b"ORCHESTRATOR_X=a 'b' $c" in environ
    finally:
        ex.send(proc, signal.SIGKILL)
        ex.wait(proc, 60)
    assert ex.ending("w_pooltest_a") is None
    assert not (GROUPS.bases["pids"] / "w_pooltest_a").exists()
    assert ex.pool.fill(60)  # refilled in the background
    ex.close()


def test_limits_hold_in_a_pooled_worker(tmp_path: Path) -> None:
    ex = executor(tmp_path)
    work, run, box = dirs(tmp_path, "b", ex)
    hog = ["python3", "-c", "x = []\nwhile True: x.append(bytearray(8 << 20))"]
    proc = ex.start("w_pooltest_b", LaunchSpec(argv=hog), work, run, sandbox=box, limits=Limits(48, 64))
    ex.wait(proc, 120)
    assert ex.ending("w_pooltest_b") == "out of memory: killed at its memory limit of 48 MiB"
    ex.close()


@pytest.mark.parametrize("pooled", [True, False])
def test_the_file_size_limit_holds_parked_or_spawned(tmp_path: Path, pooled: bool) -> None:
    """RLIMIT_FSIZE (`file_mb`) on every file the agent writes, its stdout file too, whether a
    parked shell or a new spawn runs it; the agent cannot raise it again."""
    ex = LocalExecutor(sandbox.detect(tmp_path / "data"), GROUPS, pool_size=2 if pooled else 0)
    assert (ex.pool is not None and ex.pool.fill(60)) == pooled
    idle = {parked.pid for parked in ex.pool._idle} if ex.pool is not None else set()
    work, run, box = dirs(tmp_path, "f", ex)
    script = (
        "trap '' XFSZ; ulimit -f unlimited 2>/dev/null && echo RAISED; "
        "head -c 3000000 /dev/zero >big; echo wrote $?; head -c 3000000 /dev/zero"
    )
    spec = LaunchSpec(argv=["/bin/sh", "-c", script])
    proc = ex.start("w_pooltest_f", spec, work, run, sandbox=box, limits=Limits(96, 40, file_mb=2))
    assert (proc.pid in idle) == pooled
    ex.wait(proc, 60)
    output = (run / "output.log").read_bytes()
    assert b"wrote 1" in output and b"RAISED" not in output, output[:200]
    assert (work / "big").stat().st_size == 2 << 20
    assert (run / "output.log").stat().st_size == 2 << 20
    ex.close()


def test_big_stdin_newlines_and_odd_environment_names(tmp_path: Path) -> None:
    assert launch_script(["echo"], {"NOT-A-NAME": "x"}) is None
    ex = executor(tmp_path)
    assert ex.pool is not None
    idle = {parked.pid for parked in ex.pool._idle}
    work, run, box = dirs(tmp_path, "c", ex)
    big = "y" * (128 * 1024)  # over the pipe: handed over in a file
    spec = LaunchSpec(argv=["/bin/sh", "-c", "wc -c; printf '%s' \"$1\"", "-", "two\nlines"], stdin_text=big)
    proc = ex.start("w_pooltest_c", spec, work, run, sandbox=box, limits=Limits(96, 40))
    assert ex.wait(proc, 60) == 0
    assert proc.pid in idle
    assert (run / "output.log").read_text() == f"{len(big)}\ntwo\nlines"
    assert ex.ending("w_pooltest_c") is None
    # A name the shell cannot export: a new wrapper that joins its groups itself.
    work, run, box = dirs(tmp_path, "d", ex)
    odd = LaunchSpec(argv=["/bin/sh", "-c", "echo ran"], env={"ODD.NAME": "1"})
    proc = ex.start("w_pooltest_d", odd, work, run, sandbox=box, limits=Limits(96, 40))
    assert ex.wait(proc, 60) == 0 and proc.pid not in idle
    assert (run / "output.log").read_text().strip() == "ran"
    assert ex.ending("w_pooltest_d") is None
    ex.close()


def test_parked_shells_end_with_their_pool_and_leave_no_group(tmp_path: Path) -> None:
    ex = executor(tmp_path)
    assert ex.pool is not None
    parked = {p.pid: p.group for p in ex.pool._idle}
    # A shell's cmdline reads empty until its exec has set it up, which may come after posix_spawn
    # returned (the vfork parent wakes once the old memory is released) on a loaded host.
    wait_until(lambda: parked.keys() <= parked_pids(), what="parked shells exec'd")
    ex.close()
    wait_until(lambda: not (parked.keys() & parked_pids()), what="parked shells gone")
    for group in parked.values():
        assert group.startswith(GROUP_PREFIX)
        # close() retries the removal briefly; a v1 group that empties later (a loaded host) is
        # left to the stale-group sweep, which must then find it empty and removable.
        wait_until(lambda group=group: GROUPS.remove(group), what=f"group {group} removed")
        assert not any((base / group).exists() for base in GROUPS.bases.values())


def test_a_batch_of_starts_takes_parked_wrappers_and_the_pool_refills_after_it(tmp_path: Path) -> None:
    """Inside `batch` (a pass's launch) the pool parks nothing: parking moves a shell into its
    cgroup, which on v1 holds the cgroup mutex the starts' renames need. It refills once the
    batch ends; a start taken outside any batch asks for a refill at once, as before."""
    ex = executor(tmp_path)
    pool = ex.pool
    assert pool is not None
    idle = {parked.pid for parked in pool._idle}
    procs = []
    try:
        with pool.batch():
            for name in ("a", "b"):
                work, run, box = dirs(tmp_path, name, ex)
                spec = LaunchSpec(argv=["/bin/sh", "-c", "sleep 600"])
                procs.append(ex.start(f"w_batch_{name}", spec, work, run, sandbox=box, limits=Limits(96, 40)))
            assert {proc.pid for proc in procs} == idle  # both from the pool
            # Parking would show within moments on an idle host; under load this only gets weaker.
            for _ in range(20):
                assert not pool._idle and not pool._parking, "parked during a batch"
                time.sleep(0.02)
        assert pool.fill(60), "the pool did not refill after the batch"
        refilled = {parked.pid for parked in pool._idle}
        work, run, box = dirs(tmp_path, "c", ex)
        procs.append(
            ex.start("w_batch_c", LaunchSpec(argv=["/bin/sh", "-c", "sleep 600"]), work, run, sandbox=box)
        )
        assert procs[-1].pid not in refilled  # no limits: spawned, the parked ones stay
        with pool.batch():
            work, run, box = dirs(tmp_path, "d", ex)
            spec = LaunchSpec(argv=["/bin/sh", "-c", "sleep 600"])
            procs.append(ex.start("w_batch_d", spec, work, run, sandbox=box, limits=Limits(96, 40)))
        assert procs[-1].pid in refilled
        assert pool.fill(60)
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        ex.close()


OWNER = r"""
import sys, time
from orchestrator.executors import cgroups
from orchestrator.executors.local import LocalExecutor
ex = LocalExecutor(None, cgroups.detect(), pool_size=2)
assert ex.pool is not None and ex.pool.fill(60)
print(" ".join(f"{p.pid}:{p.group}" for p in ex.pool._idle), flush=True)
time.sleep(600)
"""


def test_parked_shells_end_when_their_server_is_killed(tmp_path: Path) -> None:
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    parked = dict(item.split(":") for item in owner.stdout.readline().split())
    pids = {int(pid) for pid in parked}
    assert len(pids) == 2
    wait_until(lambda: pids <= parked_pids(), what="parked shells exec'd")
    owner.kill()  # SIGKILL: no finaliser runs; the pipes close with the process
    owner.wait()
    owner.stdout.close()
    wait_until(lambda: not (pids & parked_pids()), what="parked shells gone")
    # Their groups are empty now, so the stale-group sweep (start-up, gc) can remove them (only
    # these: the sweep itself would also take other servers' fresh groups on this shared host).
    for group in parked.values():
        wait_until(lambda group=group: GROUPS.remove(group), what=f"group {group} empty")


def fd_targets(pid: int) -> set[str]:
    targets = set()
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            targets.add(os.readlink(f"/proc/{pid}/fd/{name}"))
    return targets


def test_a_parked_shell_inherits_no_descriptor_marked_inheritable(tmp_path: Path) -> None:
    """Parked shells close what the executor's (cached) list of inheritable descriptors names,
    like every wrapper: a worker outliving the server must not hold them open."""
    marker = tmp_path / "inheritable-marker"
    fd = os.open(marker, os.O_WRONLY | os.O_CREAT)
    os.set_inheritable(fd, True)
    try:
        ex = executor(tmp_path)
        assert ex.pool is not None
        idle = [parked.pid for parked in ex.pool._idle]
        assert idle
        for pid in idle:
            # A shell just parked may still be closing descriptors (a vanishing entry): wait for
            # it to settle; one that keeps the marker open fails here.
            wait_until(
                lambda pid=pid: str(marker) not in fd_targets(pid), what=f"shell {pid} closed the marker"
            )
        ex.close()
    finally:
        os.close(fd)
