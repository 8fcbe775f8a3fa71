"""Uid leases (executors/uids.py) with real sandboxed workers on this host: a uid is leased to
one live worker at a time whatever engine asks, the wrapper (not the engine) holds it, it is
free once the wrapper is gone, and its next holder cannot read or change what the last one left
in a shared rw_bind."""

from __future__ import annotations

import os
import random
import shutil
import signal
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.agents.base import LaunchSpec
from orchestrator.executors import cgroups, sandbox, uids
from orchestrator.executors.cgroups import Limits
from orchestrator.executors.local import LocalExecutor, WorkerProcess
from tests.support.wait import wait_until

GROUPS = cgroups.detect()
needs_root_sandbox = pytest.mark.skipif(
    os.geteuid() != 0 or not GROUPS.usable or shutil.which("bwrap") is None,
    reason="uid leases are for a root server with bwrap and cgroups",
)


def base_uid() -> int:
    return random.randrange(100_000, 2**31 - 10_000, 1000)  # a range of this test's own


@pytest.fixture
def base() -> Iterator[int]:
    first = base_uid()
    yield first
    uids.forget(uids.LEASE_DIR, range(first, first + 3))


def test_sweep_hands_leftovers_to_root_without_following_symlinks(tmp_path: Path) -> None:
    uid, other = base_uid(), base_uid() + 1
    top = tmp_path / "shared"
    (top / "open" / "deep").mkdir(parents=True)
    (top / "closed").mkdir()
    outside = tmp_path / "outside"
    outside.write_text("host file")
    files = {
        top / "private": 0o600, top / "public": 0o644, top / "setuid": 0o4777,
        top / "open" / "deep" / "inner": 0o666, top / "closed" / "hidden": 0o644,
    }  # fmt: skip
    for path, mode in files.items():
        path.write_text("left")
        os.chown(path, uid, uid)
        path.chmod(mode)
    for directory, mode in ((top / "open", 0o777), (top / "open" / "deep", 0o755), (top / "closed", 0o700)):
        os.chown(directory, uid, uid)
        directory.chmod(mode)
    (top / "theirs").write_text("another worker's")
    os.chown(top / "theirs", other, other)
    os.chown(outside, uid, uid)
    outside.chmod(0o666)
    (top / "link").symlink_to(outside)
    os.lchown(top / "link", uid, uid)
    os.chown(top, uid, uid)  # the operator's directory itself is left as it is

    uids.sweep(top, uid)

    def owner_mode(path: Path) -> tuple[int, int]:
        info = path.lstat()
        return info.st_uid, stat.S_IMODE(info.st_mode)

    assert owner_mode(top / "private") == (0, 0o600)
    assert owner_mode(top / "public") == (0, 0o644)
    assert owner_mode(top / "setuid") == (0, 0o755)  # no set-id, no group/other write
    assert owner_mode(top / "open") == (0, 0o755)
    assert owner_mode(top / "open" / "deep" / "inner") == (0, 0o644)
    assert owner_mode(top / "closed") == (0, 0o700)  # sealed: not descended
    assert owner_mode(top / "closed" / "hidden") == (uid, 0o644)
    assert owner_mode(top / "theirs")[0] == other
    assert (top / "link").lstat().st_uid == 0
    assert owner_mode(outside) == (uid, 0o666)  # the symlink was not followed
    assert top.stat().st_uid == uid


def test_sweep_seals_what_lies_too_deep_and_skips_what_went_away(tmp_path: Path) -> None:
    uid = base_uid()
    top = tmp_path / "shared"
    top.mkdir()
    chain = [top / "/".join(["d"] * level) for level in range(1, uids.MAX_DEPTH + 6)]
    chain[-1].mkdir(parents=True)
    (chain[-1] / "bottom").write_text("left")
    for path in [*chain, chain[-1] / "bottom"]:
        os.chown(path, uid, uid)
        path.chmod(0o777)
    wide = top / "wide"  # many directories side by side: one descriptor at a time
    wide.mkdir()
    for path in (top, wide):  # traversable by others (the sweep's rule), whatever the umask
        path.chmod(0o755)
    for n in range(300):
        (wide / str(n)).mkdir()
        os.chown(wide / str(n), uid, uid)
        (wide / str(n)).chmod(0o755)

    uids.sweep(top, uid)
    uids.sweep(tmp_path / "gone", uid)  # an rw_bind the operator removed: nothing to do

    depths = [(path.stat().st_uid, stat.S_IMODE(path.stat().st_mode)) for path in chain]
    assert depths[: uids.MAX_DEPTH - 1] == [(0, 0o755)] * (uids.MAX_DEPTH - 1)
    assert depths[uids.MAX_DEPTH - 1] == (0, 0o700)  # sealed: nothing below is reachable
    assert all(owner == uid for owner, _ in depths[uids.MAX_DEPTH :])
    assert {(wide / str(n)).stat().st_uid for n in range(300)} == {0}
    assert len(os.listdir("/proc/self/fd")) < 50


SCRIPT = r"""
shared="$1"
echo "uid $(id -u)"
for fd in /proc/self/fd/*; do echo "fd $(basename "$fd") $(readlink "$fd")"; done
if [ -e "$shared/private" ]; then
  cat "$shared/private" >/dev/null 2>&1 && echo "read private: ok" || echo "read private: blocked"
  cat "$shared/public" >/dev/null 2>&1 && echo "read public: ok" || echo "read public: blocked"
  echo x >>"$shared/public" 2>/dev/null && echo "write public: ok" || echo "write public: blocked"
  touch "$shared/dir/new" 2>/dev/null && echo "create in dir: ok" || echo "create in dir: blocked"
else
  echo secret >"$shared/private"
  echo shared >"$shared/public"; chmod 644 "$shared/public"
  mkdir "$shared/dir"; chmod 777 "$shared/dir"
fi
echo started
exec sleep 600
"""


def start(ex: LocalExecutor, tmp_path: Path, name: str, shared: Path) -> tuple[WorkerProcess, Path]:
    work, run = tmp_path / f"work-{name}", tmp_path / f"run-{name}"
    home = run / "home"
    home.mkdir(parents=True)
    work.mkdir()
    box = sandbox.SandboxSpec(work, home, rw_binds=[str(shared)])
    spec = LaunchSpec(argv=["/bin/sh", "-c", SCRIPT, "agent", str(shared)])
    proc = ex.start(f"w_uidtest_{name}_{os.getpid()}", spec, work, run, sandbox=box, limits=Limits(128, 64))
    wait_until(lambda: "started" in output(run), timeout=60, what=f"{name} started")
    return proc, run


def output(run: Path) -> str:
    try:
        return (run / "output.log").read_text()
    except FileNotFoundError:
        return ""


def executor(tmp_path: Path, base: int, count: int, pool_size: int = 0) -> LocalExecutor:
    host = sandbox.detect(tmp_path / "data", uid=base, uid_count=count)
    assert host.usable, host.problem
    return LocalExecutor(host, GROUPS, pool_size=pool_size)


@needs_root_sandbox
def test_a_uid_is_leased_once_released_with_its_wrapper_and_swept_before_reuse(
    tmp_path: Path, base: int
) -> None:
    tmp_path.chmod(0o755)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    first, second = executor(tmp_path, base, 1), executor(tmp_path, base, 1)  # two engines, one uid
    proc_a, run_a = start(first, tmp_path, "a", shared)
    log_a = (run_a / "output.log").read_text()
    assert f"uid {base}\n" in log_a and (run_a / "engine" / "uid").read_text() == f"{base}\n"
    assert str(uids.LEASE_DIR) not in log_a  # the agent has no descriptor of its lease
    assert (shared / "private").stat().st_uid == base
    assert stat.S_IMODE((shared / "private").stat().st_mode) == 0o600  # the agent's umask is 077
    with pytest.raises(uids.NoFreeUid):
        start(second, tmp_path, "b", shared)  # another engine: the uid is taken
    assert uids.held(uids.LEASE_DIR, base)
    first.send(proc_a, signal.SIGKILL)
    first.wait(proc_a, 30)
    wait_until(lambda: not uids.held(uids.LEASE_DIR, base), timeout=30, what="lease released")
    proc_b, run_b = start(second, tmp_path, "c", shared)  # the same uid, a new worker
    log_b = (run_b / "output.log").read_text()
    assert f"uid {base}\n" in log_b
    # What the last holder left is root's now: the next holder reads only what it chose to share.
    for line in (
        "read private: blocked",
        "read public: ok",
        "write public: blocked",
        "create in dir: blocked",
    ):
        assert line in log_b, log_b
    second.send(proc_b, signal.SIGKILL)
    second.wait(proc_b, 30)


@needs_root_sandbox
def test_parked_wrappers_hold_their_uids_until_they_end(tmp_path: Path, base: int) -> None:
    if GROUPS.version != "v1":
        pytest.skip("parked wrappers are for cgroup v1 hosts")
    tmp_path.chmod(0o755)
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    ex = executor(tmp_path, base, 3, pool_size=2)
    assert ex.pool is not None and ex.pool.fill(60)
    parked = {p.lease.uid for p in ex.pool._idle if p.lease is not None}
    assert len(parked) == 2 and all(uids.held(uids.LEASE_DIR, uid) for uid in parked)
    proc, run = start(ex, tmp_path, "p", shared)
    uid = int((run / "engine" / "uid").read_text())
    assert uid in parked and f"uid {uid}\n" in (run / "output.log").read_text()
    ex.close()
    ex.send(proc, signal.SIGKILL)
    ex.wait(proc, 30)
    for each in range(base, base + 3):
        wait_until(lambda u=each: not uids.held(uids.LEASE_DIR, u), timeout=30, what=f"uid {each} free")
