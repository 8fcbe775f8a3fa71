"""Red team of the worker sandbox, the kernel and process side (docs/SANDBOX.md): real sandboxed
`command` workers run attack scripts the way a hostile agent would, and each attack's outcome is
reported by the script itself in the worker's log, so no test passes because the attack did not
run. tests/integration/test_sandbox.py covers the file-system view, limits and the classic
escapes; these go at the system calls (raw, past libc), setuid and file-capability binaries, the
cgroup files, other namespaces' processes, and processes that leave the worker's process group."""

from __future__ import annotations

import json
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import httpx

from tests.integration.test_engine_lifecycle import log_lines, submit, wait_final, workers_of
from tests.support.listeners import stop_accepting
from tests.support.servers import ServerFactory
from tests.support.wait import wait_until

# Raw system calls through libc's syscall(): what seccomp must answer, whatever libc would do.
SYSCALLS = r"""
import ctypes, errno, fcntl, json, mmap, os, select, signal, struct, subprocess, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
report = {}
# Descriptors it was started with besides stdin/out/err (the seccomp filter's, a server socket…).
report["inherited_fds"] = {n: os.readlink(f"/proc/self/fd/{n}") for n in os.listdir("/proc/self/fd")
                           if n not in ("0", "1", "2") and os.path.exists(f"/proc/self/fd/{n}")
                           and not os.readlink(f"/proc/self/fd/{n}").startswith("/proc/")}

def raw(name, nr, *args):
    ctypes.set_errno(0)
    result = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    if result == 0 and name.startswith("clone"):
        os._exit(0)  # a clone that worked: the child leaves at once
    err = ctypes.get_errno()
    report[name] = errno.errorcode.get(err, str(err)) if result == -1 else f"ok:{result}"

KEEP = []  # buffers whose addresses go to the kernel live until the end

def buf(size):
    b = ctypes.create_string_buffer(size)
    KEEP.append(b)
    return b, ctypes.addressof(b)

def cstr(data):
    return buf(data)[1]

CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET, SIGCHLD = 0x10000000, 0x00020000, 0x40000000, 17
raw("unshare_user", 272, CLONE_NEWUSER)
raw("unshare_net", 272, CLONE_NEWNET)
raw("clone_newuser", 56, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)
raw("clone_newns", 56, CLONE_NEWNS | SIGCHLD, 0, 0, 0, 0)
args, args_ptr = buf(88)
struct.pack_into("=QQQQQQQQ", args, 0, CLONE_NEWUSER, 0, 0, 0, SIGCHLD, 0, 0, 0)
raw("clone3_newuser", 435, args_ptr, 64)
struct.pack_into("=QQQQQQQQ", args, 0, 0, 0, 0, 0, SIGCHLD, 0, 0, 0)
raw("clone3_plain", 435, args_ptr, 64)
ns = os.open("/proc/self/ns/user", os.O_RDONLY)
raw("setns", 308, ns, 0)
raw("ptrace_traceme", 101, 0, 0, 0, 0)
child = os.fork()
if child == 0:
    signal.pause()
    os._exit(0)
raw("ptrace_attach_own_child", 101, 16, child, 0, 0)
local, local_ptr = buf(16)
struct.pack_into("=QQ", local, 0, local_ptr, 8)
raw("process_vm_readv", 310, child, local_ptr, 1, local_ptr, 1, 0)
os.kill(child, signal.SIGKILL)
os.waitpid(child, 0)
params, params_ptr = buf(120)
raw("io_uring_setup", 425, 4, params_ptr)
raw("keyctl", 250, 1, 0)
raw("add_key", 248, cstr(b"user"), cstr(b"k"), 0, 0, -2)
attr, attr_ptr = buf(128)
struct.pack_into("=II", attr, 0, 1, 128)  # PERF_TYPE_SOFTWARE, size
raw("perf_event_open", 298, attr_ptr, 0, -1, -1, 0)
raw("bpf", 321, 0, attr_ptr, 64)
raw("userfaultfd", 323, 0)
raw("personality", 135, 0x0400000)  # READ_IMPLIES_EXEC
raw("mount", 165, 0, cstr(b"/tmp"), 0, 0x1000, 0)
raw("umount2", 166, cstr(b"/usr"), 2)
raw("open_tree", 428, -100, cstr(b"/"), 1)
raw("fsopen", 430, cstr(b"tmpfs"), 0)
raw("init_module", 175, 0, 0, 0)
raw("kexec_load", 246, 0, 0, 0, 0)
raw("open_by_handle_at", 304, -100, attr_ptr, 0)
raw("x32_getpid", 0x40000000 | 39)
master, slave = os.openpty()
letter = ctypes.create_string_buffer(b"x")
raw("tiocsti", 16, slave, 0x5412, ctypes.addressof(letter))
raw("tiocsti_high_bits", 16, slave, 0x1_0000_5412, ctypes.addressof(letter))
raw("tioclinux", 16, slave, 0x541C, ctypes.addressof(letter))
# Syscalls with no capability: refused by the kernel even where seccomp lets them through.
raw("chroot", 161, cstr(b"."))
raw("setuid0", 105, 0)
raw("mknod_mem", 133, cstr(b"mem"), 0o20600, os.makedev(1, 1))
raw("prctl_set_mm", 157, 35, 1, 0, 0, 0)
raw("prctl_cap_ambient_raise", 157, 47, 2, 21, 0, 0)  # PR_CAP_AMBIENT_RAISE CAP_SYS_ADMIN
raw("kill_namespace_init", 62, 1, 9)

# The 32-bit system call table (int 0x80) from a 64-bit process: the filter kills the process.
child = os.fork()
if child == 0:
    code = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    code.write(bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3]))  # mov eax, 20 (getpid); int 0x80; ret
    address = ctypes.addressof(ctypes.c_char.from_buffer(code))
    ctypes.CFUNCTYPE(ctypes.c_long)(address)()
    os._exit(0)
_, status = os.waitpid(child, 0)
report["int80"] = signal.Signals(os.WTERMSIG(status)).name if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"

# A setuid-root binary (su): its effective uid while it waits for a password on a terminal.
master, slave = os.openpty()
su = subprocess.Popen(["su", "root", "-c", "id"], stdin=slave, stdout=slave, stderr=slave, start_new_session=True)
seen = b""
while b"assword" not in seen and select.select([master], [], [], 60)[0]:
    try:
        seen += os.read(master, 1024)
    except OSError:
        break
uids = [l for l in open(f"/proc/{su.pid}/status").read().splitlines() if l.startswith("Uid:")]
report["su_prompted"] = b"assword" in seen
report["su_uids"] = uids[0].split()[1:] if uids else None
su.kill()
su.wait()
# Binaries that would make namespaces or mounts for it.
for name, argv in (("unshare_bin", ["unshare", "-Ur", "true"]), ("bwrap_bin", ["bwrap", "--dev-bind", "/", "/", "true"]),
                   ("mount_bin", ["mount", "-t", "tmpfs", "none", "/tmp"])):
    done = subprocess.run(argv, capture_output=True)
    report[name] = done.returncode

# Files of the host that would give the agent more: cgroup limits (its own and others'), the
# processes of the namespace's init, kernel knobs.
def try_write(path, value):
    try:
        with open(path, "w") as handle:
            handle.write(value)
        return "written"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))

cgroup_writes = {}
for top, dirs, files in os.walk("/sys/fs/cgroup"):
    for name in ("memory.limit_in_bytes", "memory.max", "pids.max", "cgroup.procs", "cgroup.freeze", "freezer.state"):
        if name in files and len(cgroup_writes) < 400:
            cgroup_writes[os.path.join(top, name)] = try_write(os.path.join(top, name), "max" if "max" in name else str(os.getpid()))
report["cgroup_files_tried"] = len(cgroup_writes)
report["cgroup_written"] = sorted(p for p, r in cgroup_writes.items() if r == "written")
report["sys_write"] = try_write("/sys/kernel/mm/transparent_hugepage/enabled", "always")
report["sysrq"] = try_write("/proc/sysrq-trigger", "h")
for name, action in (("init_root", lambda: os.listdir("/proc/1/root")), ("init_environ", lambda: open("/proc/1/environ", "rb").read()),
                     ("init_cwd", lambda: os.listdir("/proc/1/cwd")), ("init_mem", lambda: open("/proc/1/mem", "rb").read(1))):
    try:
        action()
        report[name] = "read"
    except OSError as exc:
        report[name] = errno.errorcode.get(exc.errno, str(exc.errno))
report["devices"] = sorted(os.listdir("/dev"))
report["block_devices"] = sorted(n for n in os.listdir("/dev") if os.path.exists("/dev/" + n) and (os.stat("/dev/" + n).st_mode & 0o170000) == 0o060000)
status = dict(l.split(":", 1) for l in open("/proc/self/status").read().splitlines() if ":" in l)
report["seccomp_mode"] = status["Seccomp"].strip()
report["cap_bnd"] = status["CapBnd"].strip()
report["cap_amb"] = status["CapAmb"].strip()
print("REPORT " + json.dumps(report), flush=True)
"""

# An agent whose grandchild leaves the worker's session and process group (setsid + double
# fork), the way a daemon would, then reports it is up.
DAEMON = r"""
import os, sys, time
r, w = os.pipe()
agent_session = os.getsid(0)
first = os.fork()
if first == 0:
    os.setsid()
    if os.fork() == 0:
        os.close(r)
        print("DAEMON up in its own session", os.getsid(0) != agent_session, flush=True)
        os.write(w, b"x")
        os.close(w)
        while True:
            time.sleep(0.05)
    os._exit(0)
os.waitpid(first, 0)
os.close(w)
os.read(r, 1)
print("AGENT waits", flush=True)
time.sleep(600)
"""


# A service of the host on loopback (PostgreSQL with trust auth, Redis, the Ray dashboard…): the
# port is in the task.
LOOPBACK = (
    "import socket, sys; port = int(sys.stdin.read()); "
    "s = socket.create_connection(('127.0.0.1', port), 10); "
    "print('LOOPBACK got', s.recv(64).decode(), flush=True)"
)


def agents(root: Path) -> str:
    scripts = root / "redteam-scripts"  # bound read-only into the sandbox (ro_binds)
    scripts.mkdir(exist_ok=True)
    for name, body in (("syscalls.py", SYSCALLS), ("daemon.py", DAEMON)):
        (scripts / name).write_text(body)
    py, binds = sys.executable, f'ro_binds = ["{scripts}"]\n'
    path = root / "redteam-agents.toml"
    path.write_text(
        f'[agents.syscalls]\ncommand = ["{py}", "{scripts / "syscalls.py"}"]\n{binds}'
        f'[agents.daemon]\ncommand = ["{py}", "{scripts / "daemon.py"}"]\n{binds}'
        f'[agents.loopback]\ncommand = ["{py}", "-c", {json.dumps(LOOPBACK)}]\n'
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


SECCOMP_DENIED = (
    "unshare_user", "unshare_net", "clone_newuser", "clone_newns", "setns", "ptrace_traceme",
    "ptrace_attach_own_child", "process_vm_readv", "io_uring_setup", "keyctl", "add_key",
    "perf_event_open", "bpf", "userfaultfd", "personality", "mount", "umount2", "open_tree", "fsopen",
    "init_module", "kexec_load", "open_by_handle_at", "x32_getpid", "tiocsti", "tiocsti_high_bits",
    "tioclinux",
)  # fmt: skip


def test_raw_system_calls_setuid_and_host_files_are_refused(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents(servers.root))
    with server.client() as client:
        job = submit(client, agent="syscalls")
        done = wait_final(client, job["id"], timeout=120)
        worker = workers_of(client, job["id"])[0]
        report = report_of(client, worker["id"])  # the script ran to its end: its report is there
        assert done["status"] == "COMPLETED", (done, report)
        for name in SECCOMP_DENIED:
            assert report[name] == "EPERM", (name, report[name])
        # clone3 hides its flags from the filter: every clone3 is ENOSYS (libc falls back to clone).
        assert report["clone3_newuser"] == report["clone3_plain"] == "ENOSYS"
        assert report["int80"] == "SIGSYS"  # the 32-bit table kills the process
        for name in ("chroot", "setuid0", "mknod_mem", "prctl_set_mm", "prctl_cap_ambient_raise"):
            assert report[name] == "EPERM", (name, report[name])
        assert report["kill_namespace_init"] == "EPERM"  # pid 1 is bwrap's, another uid
        # The setuid-root `su` ran and asked for a password, as the agent's uid: no_new_privs.
        assert report["su_prompted"] is True
        assert report["su_uids"] is not None and "0" not in report["su_uids"], report["su_uids"]
        assert report["unshare_bin"] != 0 and report["bwrap_bin"] != 0 and report["mount_bin"] != 0
        assert report["cgroup_files_tried"] > 0 and report["cgroup_written"] == []
        assert report["sys_write"] in ("EROFS", "EACCES") and report["sysrq"] in ("EROFS", "EACCES", "ENOENT")
        for name in ("init_root", "init_environ", "init_cwd", "init_mem"):
            assert report[name] in ("EACCES", "EPERM"), (name, report[name])
        assert report["block_devices"] == [] and "mem" not in report["devices"]
        assert "kmsg" not in report["devices"]
        assert report["inherited_fds"] == {}, report["inherited_fds"]
        assert report["seccomp_mode"] == "2"
        assert report["cap_bnd"] == report["cap_amb"] == "0000000000000000"
        assert client.get("/health").status_code == 200


def worker_cgroup_procs(wrapper_pid: int) -> Path:
    """The `cgroup.procs` of the worker's pids group (v1) or its group (v2), from the host."""
    for line in Path(f"/proc/{wrapper_pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "pids" in controllers.split(","):
            return Path("/sys/fs/cgroup/pids") / path.lstrip("/") / "cgroup.procs"
    (v2,) = (
        line
        for line in Path(f"/proc/{wrapper_pid}/cgroup").read_text().splitlines()
        if line.startswith("0::")
    )
    return Path("/sys/fs/cgroup") / v2[3:].lstrip("/") / "cgroup.procs"


def states(procs: Path) -> dict[int, str]:
    """Host PID -> state of every process in the worker's cgroup."""
    found: dict[int, str] = {}
    try:
        pids = [int(p) for p in procs.read_text().split()]
    except FileNotFoundError:
        return found
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            continue
        if state not in ("Z", "X"):  # an ended process not reaped yet runs nothing
            found[pid] = state
    return found


def test_pause_stops_processes_that_left_the_process_group_and_terminate_ends_them(
    servers: ServerFactory,
) -> None:
    server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents(servers.root))
    with server.client() as client:
        job = submit(client, agent="daemon")
        worker = wait_until(
            lambda: next((w for w in workers_of(client, job["id"]) if w["status"] == "RUNNING"), None),
            what="worker running",
        )
        wait_until(lambda: "AGENT waits" in log_lines(client, worker["id"]), what="agent and daemon up")
        assert "DAEMON up in its own session True" in log_lines(client, worker["id"])
        procs = worker_cgroup_procs(worker["pid"])
        running = states(procs)
        assert len(running) >= 5, running  # wrapper, bwrap x2, agent, daemon
        assert client.post(f"/api/supervisor/workers/{worker['id']}/pause").status_code == 200
        # Every process of the worker stops, the daemon in its own session too.
        wait_until(lambda: set(states(procs).values()) == {"T"}, timeout=30, what=f"all stopped: {procs}")
        assert client.post(f"/api/supervisor/workers/{worker['id']}/resume").status_code == 200
        wait_until(lambda: "T" not in states(procs).values(), timeout=30, what="all continued")
        assert client.post(f"/api/supervisor/workers/{worker['id']}/terminate").status_code == 200
        assert wait_final(client, job["id"])["status"] == "FAILED"
        # Nothing of the worker is left: the daemon died with the sandbox's PID namespace.
        wait_until(lambda: not states(procs), timeout=30, what="no process left in the worker's cgroup")


def test_a_worker_does_not_reach_host_services_on_loopback(servers: ServerFactory) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"HOST-SERVICE")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        server = servers.start(ORCHESTRATOR_AGENTS_FILE=agents(servers.root))
        with server.client() as client:
            job = submit(client, agent="loopback", task_description=str(port))
            wait_final(client, job["id"], timeout=120)
            worker = workers_of(client, job["id"])[0]
            lines = log_lines(client, worker["id"])
            assert "LOOPBACK got HOST-SERVICE" not in lines, lines
            assert any("Error" in line or "refused" in line for line in lines), lines  # it tried
    finally:
        stop_accepting(listener, thread)
