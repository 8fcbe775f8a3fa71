"""The sandbox's seccomp filter: a classic BPF program bwrap installs (`--seccomp 9`).

A deny list, like Codex's and Claude Code's: the agent may run any ordinary program, but not
the system calls that reach past the namespaces (mount API, setns/unshare, kernel modules,
kexec, BPF, perf, keyrings, userfaultfd, io_uring, ptrace of other processes, terminal input
injection with TIOCSTI/TIOCLINUX) and not the 32-bit or x32 system call tables, where the
numbers differ and the deny list would not apply. Denied calls fail with EPERM, so a program that
probes for a feature carries on; a foreign architecture kills the process.

Hand-written (a dozen instructions) rather than a binding to libseccomp: no compiler or extra
system library is needed to build it, and the program is small enough to read.
"""

from __future__ import annotations

import errno
import os
import platform
import struct
from pathlib import Path

AUDIT_ARCH_X86_64 = 0xC000003E
X32_SYSCALL_BIT = 0x40000000
SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
# BPF opcodes
LD_W_ABS = 0x20
JEQ_K = 0x15
JGE_K = 0x35
JSET_K = 0x45
RET_K = 0x06

IOCTL = 16
CLONE = 56
CLONE3 = 435
# CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET: no new namespaces (a
# user namespace would give the agent capabilities again, inside it).
CLONE_NEW_FLAGS = 0x7E020000
TIOCSTI = 0x5412
TIOCLINUX = 0x541C

# x86-64 system call numbers denied inside the sandbox.
DENIED_X86_64: dict[str, int] = {
    "ptrace": 101,
    "syslog": 103,
    "personality": 135,
    "pivot_root": 155,
    "adjtimex": 159,
    "acct": 163,
    "settimeofday": 164,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "iopl": 172,
    "ioperm": 173,
    "init_module": 175,
    "delete_module": 176,
    "quotactl": 179,
    "lookup_dcookie": 212,
    "clock_settime": 227,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "perf_event_open": 298,
    "name_to_handle_at": 303,
    "open_by_handle_at": 304,
    "clock_adjtime": 305,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "userfaultfd": 323,
    "io_uring_setup": 425,
    "io_uring_enter": 426,
    "io_uring_register": 427,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "mount_setattr": 442,
}


class UnsupportedArchitecture(RuntimeError):
    pass


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def build_filter(denied: dict[str, int] | None = None) -> bytes:
    """The BPF program (struct sock_filter[]) for x86-64."""
    numbers = sorted(set((denied or DENIED_X86_64).values()))
    deny = SECCOMP_RET_ERRNO | errno.EPERM
    prog: list[tuple[int, int, int, int]] = [
        (LD_W_ABS, 0, 0, 4),  # arch
        (JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        (RET_K, 0, 0, SECCOMP_RET_KILL_PROCESS),
        (LD_W_ABS, 0, 0, 0),  # nr
    ]
    # Layout after the checks: [clone3, clone, ioctl blocks, ALLOW, ENOSYS, DENY].
    checks = [(JGE_K, X32_SYSCALL_BIT), *((JEQ_K, nr) for nr in numbers)]
    tail = 11  # instructions after the checks
    for i, (code, k) in enumerate(checks):
        to_deny = (len(checks) - i - 1) + tail - 1  # instructions to skip to reach DENY
        prog.append((code, to_deny, 0, k))
    prog += [
        # clone3 hides its flags in memory a filter cannot read: ENOSYS makes libc use clone.
        (JEQ_K, 8, 0, CLONE3),  # -> ENOSYS
        (JEQ_K, 0, 2, CLONE),  # not clone: to the ioctl check
        (LD_W_ABS, 0, 0, 16),  # low 32 bits of args[0], the flags
        (JSET_K, 6, 4, CLONE_NEW_FLAGS),  # -> DENY / ALLOW
        (JEQ_K, 0, 3, IOCTL),  # not ioctl: to ALLOW
        (LD_W_ABS, 0, 0, 24),  # low 32 bits of args[1] (the kernel truncates the command to 32)
        (JEQ_K, 3, 0, TIOCSTI),
        (JEQ_K, 2, 0, TIOCLINUX),
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),
        (RET_K, 0, 0, SECCOMP_RET_ERRNO | errno.ENOSYS),
        (RET_K, 0, 0, deny),
    ]
    if len(prog) > 255:
        raise AssertionError("jump offsets exceed 255")
    return b"".join(_insn(*insn) for insn in prog)


def write_filter(path: Path) -> None:
    """Compile the filter for this machine into `path` (0600), replacing it atomically."""
    if platform.machine() not in ("x86_64", "AMD64"):
        raise UnsupportedArchitecture(f"no seccomp filter for {platform.machine()} (x86-64 only)")
    data = build_filter()
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(draft, path)
