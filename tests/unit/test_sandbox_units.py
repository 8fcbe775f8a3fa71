"""The sandbox's parts on their own: the seccomp filter in a real bwrap, the cgroup file writes of
both cgroup versions (v2 on a directory laid out like /sys/fs/cgroup: this machine has only v1),
and the agents TOML's sandbox settings."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from orchestrator.agents.registry import load_profiles
from orchestrator.executors import cgroups, sandbox
from orchestrator.executors.cgroups import Limits

SYSCALLS = r"""
import ctypes, errno, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
def call(*args):
    ctypes.set_errno(0)
    result = libc.syscall(*[ctypes.c_long(a) for a in args])
    return "ok" if result >= 0 else errno.errorcode[ctypes.get_errno()]
r, w = os.pipe()
results = {
    "unshare_user": call(272, 0x10000000),
    "clone_newuser": call(56, 0x10000000 | 17, 0, 0, 0, 0),
    "clone3": call(435, 0, 0),
    "mount": call(165, 0, 0, 0, 0, 0),
    "keyctl": call(250, 0, 0, 0, 0, 0),
    "bpf": call(321, 0, 0, 0),
    "ptrace": call(101, 16, 1, 0, 0),
    "tiocsti": call(16, r, 0x5412, 0),
    "tiocsti_high_bits": call(16, r, 0x5412 | (1 << 32), 0),
    "x32_getpid": call(39 | 0x40000000),
    "getpid": call(39),
}
pid = os.fork()
if pid == 0:
    os._exit(0)
results["fork"] = "ok" if os.waitpid(pid, 0)[1] == 0 else "failed"
print(json.dumps(results))
"""


@pytest.mark.skipif(
    shutil.which("bwrap") is None, reason="bwrap is not installed (scripts/test.sh installs it)"
)
def test_seccomp_filter_denies_namespace_and_kernel_calls_but_not_ordinary_ones(tmp_path: Path) -> None:
    host = sandbox.detect(tmp_path / "data")
    assert host.usable, host.problem
    work = tmp_path / "work"
    work.mkdir()
    sandbox.give_to_agent(host, work)
    argv = sandbox.command(host, sandbox.SandboxSpec(work, work), [sys.executable, "-c", SYSCALLS])
    done = subprocess.run(
        ["/bin/sh", "-c", 'exec "$@" 9<"$0"', str(host.seccomp), *argv],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)
    for name in ("unshare_user", "clone_newuser", "mount", "keyctl", "bpf", "ptrace", "tiocsti"):
        assert results[name] == "EPERM", (name, results)
    assert results["tiocsti_high_bits"] == "EPERM"  # the kernel truncates the command to 32 bits
    assert results["x32_getpid"] == "EPERM"
    assert results["clone3"] == "ENOSYS"  # libc falls back to clone, whose flags the filter sees
    assert results["getpid"] == "ok" and results["fork"] == "ok"


def fake_v2(root: Path) -> Path:
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    service = root / "system.slice" / "orchestrator.service"
    service.mkdir(parents=True)
    (root / "system.slice" / "cgroup.subtree_control").write_text("")
    (root / "system.slice" / cgroups.PARENT_NAME).mkdir()  # the kernel makes a group's files on mkdir
    (root / "system.slice" / cgroups.PARENT_NAME / "cgroup.subtree_control").write_text("")
    return service


def test_cgroup_v2_writes_memory_max_pids_max_and_reads_oom_kills(tmp_path: Path) -> None:
    fake_v2(tmp_path)
    groups = cgroups.detect(tmp_path, "0::/system.slice/orchestrator.service\n")
    assert groups.version == "v2" and groups.usable
    base = tmp_path / "system.slice" / cgroups.PARENT_NAME
    assert groups.bases == {"": base}
    assert (base / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    assert (tmp_path / "system.slice" / "cgroup.subtree_control").read_text() == "+memory +pids +cpu"
    group = base / "w_1"
    group.mkdir()  # the kernel makes a group's files on mkdir; here the test does
    for name in ("memory.max", "memory.swap.max", "pids.max", "cgroup.procs"):
        (group / name).write_text("")
    procs = groups.create("w_1", Limits(memory_mb=256, pids=64))
    assert procs == [group / "cgroup.procs"]
    assert (group / "memory.max").read_text() == str(256 * 1024 * 1024)
    assert (group / "memory.swap.max").read_text() == "0"
    assert (group / "pids.max").read_text() == "64"
    assert groups.limit_of("w_1") == (256, 64)
    assert groups.limit_hit("w_1") == (False, False)
    (group / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\n")
    (group / "pids.events").write_text("max 3\n")
    assert groups.limit_hit("w_1") == (True, True)


def test_cgroup_v1_writes_limit_in_bytes_and_pids_max(tmp_path: Path) -> None:
    for controller in ("memory", "pids"):
        (tmp_path / controller / "srv").mkdir(parents=True)
    groups = cgroups.detect(tmp_path, "4:memory:/srv\n8:pids:/srv\n0::/\n")
    assert groups.version == "v1"
    memory = tmp_path / "memory" / "srv" / cgroups.PARENT_NAME / "w_2"
    pids = tmp_path / "pids" / "srv" / cgroups.PARENT_NAME / "w_2"
    for group, names in (
        (memory, ("memory.limit_in_bytes", "cgroup.procs")),
        (pids, ("pids.max", "cgroup.procs")),
    ):
        group.mkdir(parents=True)
        for name in names:
            (group / name).write_text("")
    procs = groups.create("w_2", Limits(memory_mb=100, pids=50))
    assert procs == [memory / "cgroup.procs", pids / "cgroup.procs"]
    assert (memory / "memory.limit_in_bytes").read_text() == str(100 * 1024 * 1024)
    assert not (memory / "memory.memsw.limit_in_bytes").exists()  # optional: no swap accounting here
    assert (pids / "pids.max").read_text() == "50"
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert groups.limit_hit("w_2") == (True, False)


def test_no_controllers_is_a_reason_not_a_crash(tmp_path: Path) -> None:
    groups = cgroups.detect(tmp_path, "0::/\n")
    assert not groups.usable and "no cgroup v2 hierarchy" in (groups.problem or "")


def test_host_available_memory(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683840 kB\nMemFree: 1 kB\nMemAvailable:   22716928 kB\n")
    assert cgroups.host_available_mb(meminfo) == 22184
    assert cgroups.host_available_mb(tmp_path / "missing") is None


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("memory_mb = 0", "memory_mb must be a positive integer"),
        ('pids = "many"', "pids must be a positive integer"),
        ('network = "off"', 'network must be "on" or "none"'),
        ('ro_binds = ["relative/path"]', "ro_binds must be a list of absolute paths"),
        ("memory_mb = 4096\nmax_memory_mb = 1024", "above its maximum"),
        ("max_output_mb = 0", "max_output_mb must be a positive integer"),
        ("max_file_mb = true", "max_file_mb must be a positive integer"),
        ("max_file_mb = 1.5", "max_file_mb must be a positive integer"),
    ],
)
def test_agents_toml_sandbox_settings_are_checked(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "agents.toml"
    path.write_text(f'[agents.x]\ncommand = ["true"]\n{line}\n')
    with pytest.raises(ValueError, match=message):
        load_profiles(path)


def test_agents_toml_sandbox_settings_are_read(tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    path.write_text(
        '[agents.x]\ncommand = ["true"]\nmemory_mb = 300\npids = 40\nnetwork = "none"\n'
        'ro_binds = ["/srv/cache"]\nrw_binds = ["/srv/scratch"]\n'
    )
    profile = load_profiles(path)["x"].sandbox
    assert (profile.memory_mb, profile.pids, profile.network) == (300, 40, False)
    assert profile.ro_binds == ("/srv/cache",) and profile.rw_binds == ("/srv/scratch",)
    assert profile.memory_ceiling == 1200 and profile.pids_ceiling == 160
    assert (profile.max_output_mb, profile.max_file_mb) == (256, 1024)  # the defaults
    path.write_text('[agents.x]\ncommand = ["true"]\nmax_output_mb = 5\nmax_file_mb = 7\n')
    profile = load_profiles(path)["x"].sandbox
    assert (profile.max_output_mb, profile.max_file_mb) == (5, 7)


def test_the_view_never_holds_the_server_checkout() -> None:
    paths = sandbox.python_paths()
    checkout = Path(__file__).resolve().parents[2]
    assert str(checkout) not in paths  # only its package directory and virtualenv
    assert all(os.path.isabs(p) for p in paths)
