"""How a worker's wrapper is launched: the wrapper script, its environment, and the two ways to
start it (spawned now, or a parked one from the pool). Shared by executors that run workers as
processes on a host."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.agents.base import LaunchSpec
from orchestrator.executors import spawn
from orchestrator.executors.cgroups import Limits
from orchestrator.executors.pool import Parked, WrapperPool, launch_script
from orchestrator.executors.processes import STDIN_FILE, WRAPPER_NAME, record_uid
from orchestrator.executors.sandbox import SandboxHost, SandboxSpec, command, give_to_agent
from orchestrator.executors.uids import LEASE_FD, Lease

# What a start needs once it knows the worker's uid lease (None: no uid range, or unsandboxed):
# the agent's argv, the seccomp filter file ("" for none) and the working directory.
Prepare = Callable[[Lease | None], tuple[list[str], str, Path]]

# $1 = run dir, $2 = a file for the agent's stdin ("-": the wrapper's own stdin, a pipe the engine
# fills), $3 = the working directory, $4 = the cgroup.procs files to join ("" for none), $5 = the
# seccomp filter to open on descriptor 9 for bwrap ("" for none), $6 = the largest file the agent
# may write, in 512-byte blocks (`ulimit -f`: RLIMIT_FSIZE, soft and hard, so its output.log too;
# "" for none); then the agent's argv (under bwrap when sandboxed). The wrapper joins the worker's
# cgroups first, so every descendant is counted against its limits, enters the working directory
# itself (posix_spawn has no chdir here) and records its PID (an engine that dies before writing
# the PID to the database still finds the worker), then runs the agent, then writes its exit
# status. A handled TERM/INT/HUP trap keeps the wrapper alive to record that status (handled traps
# reset to default in the agent, so it still dies). The exit file is read only once the wrapper is
# gone; a wrapper killed mid-write leaves it empty, which reads as "no exit status". Its own files
# are private (umask 077), and the agent's too: it shares a profile's rw_binds with workers of
# other uids, whose files must not be readable by default. Descriptor 8 (uids.LEASE_FD) holds the
# lease of the worker's uid for the wrapper's lifetime; the agent does not get it (it could unlock
# it). Only shell built-ins besides the agent: no extra process, and no file the engine must create.
WRAPPER_SCRIPT = (
    'umask 077; d="$1"; i="$2"; g="$4"; s="$5"; '
    'for f in $g; do printf "%s\\n" "$$" >"$f" || { printf "126\\n" >"$d/exit"; exit 126; }; done; '
    'cd "$3" || { printf "127\\n" >"$d/exit"; exit 127; }; z="$6"; shift 6; '
    'if [ -n "$z" ]; then ulimit -f "$z" || { printf "126\\n" >"$d/exit"; exit 126; }; fi; '
    'trap ":" TERM INT HUP; printf "%s\\n" "$$" >"$d/pid"; : >>"$d/output.log"; '
    'if [ -n "$s" ]; then exec 9<"$s" || { printf "126\\n" >"$d/exit"; exit 126; }; fi; '
    'if [ "$i" = - ]; then "$@" 8<&- >>"$d/output.log" 2>&1; '
    'else "$@" 8<&- <"$i" >>"$d/output.log" 2>&1; fi; '
    'r=$?; printf "%s\\n" "$r" >"$d/exit"'
)
# Stdin up to this size goes through a pipe (it fits the pipe buffer, so writing never blocks);
# larger stdin is written to a file first.
PIPE_STDIN_BYTES = 64 * 1024
# The server's own secrets: never in a worker's environment, even if an agent profile names them.
SERVER_ONLY_ENV = ("SECRET_KEY", "DATABASE_URL", "ORCHESTRATOR_DATA_DIR")


def confine(
    host: SandboxHost | None, spec: LaunchSpec, box: SandboxSpec, lease: Lease | None, run_dir: Path
) -> tuple[list[str], str]:
    """The agent's argv (under bwrap when sandboxed) and the seccomp filter file ("" for none).
    With a uid lease: the worker's files are handed to its uid, the uid is recorded (re-adoption
    reads it) and the profile's shared rw_binds noted in the lease, for the uid's next holder to
    sweep (executors/uids.py)."""
    if host is None:
        return list(spec.argv), ""
    uid = None
    if lease is not None:
        uid = lease.uid
        lease.assign(box.rw_binds)
        files = [Path(source) for source, _ in box.ro_files]
        give_to_agent(host, box.workdir, box.home, *map(Path, box.owned), *files, uid=uid)
        record_uid(run_dir, uid)
    return command(host, box, list(spec.argv), uid=uid), str(host.seccomp or "")


def environment(spec: LaunchSpec) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": os.environ.get("LANG", "C.UTF-8")}
    env.update(spec.env)
    for name in SERVER_ONLY_ENV:
        env.pop(name, None)  # whatever a profile says: the server's secrets never reach a worker
    return env


def wrapper_argv(
    run_dir: Path, stdin_arg: str, workdir: Path, procs_files: str, seccomp: str, limits: Limits | None
) -> list[str]:
    blocks = str(limits.file_mb * 2048) if limits is not None and limits.file_mb else ""
    return [
        "/bin/sh",
        "-c",
        WRAPPER_SCRIPT,
        WRAPPER_NAME,
        str(run_dir),
        stdin_arg,
        str(workdir),
        procs_files,
        seccomp,
        blocks,
    ]


def start_parked(
    pool: WrapperPool,
    worker_id: str,
    limits: Limits,
    run_dir: Path,
    prepare: Prepare,
    env: dict[str, str],
    data: bytes,
) -> tuple[int, Lease | None] | None:
    """Make a parked wrapper this worker's: its PID and the uid lease it holds; None to spawn
    one. `prepare` hands the worker's files to the parked shell's uid and gives the agent's argv.
    The launch script goes down the parked shell's descriptor 3 and a small stdin down its stdin,
    both pipes whose buffer they fit, so the writes never block; nothing of it is written to disk."""
    if launch_script([], env) is None:
        return None  # a variable name the shell cannot export
    parked: Parked | None = pool.take(worker_id, limits)
    if parked is None:
        return None
    try:
        stdin_arg = "-"
        if len(data) > PIPE_STDIN_BYTES:
            stdin_arg, data = write_stdin(run_dir, data), b""
        agent_argv, seccomp_file, workdir = prepare(parked.lease)
        script = launch_script(
            wrapper_argv(run_dir, stdin_arg, workdir, "", seccomp_file, limits) + agent_argv, env
        )
        if script is None or len(script.encode()) > PIPE_STDIN_BYTES:
            pool.discard(parked)
            return None
        if data:
            os.write(parked.stdin, data)
        os.close(parked.stdin)
        parked.stdin = -1
        os.write(parked.control, script.encode())
        os.close(parked.control)
        parked.control = -1
    except OSError:  # it died after it was taken: its groups go, the worker starts the usual way
        pool.discard(parked)
        return None
    except BaseException:
        pool.discard(parked)
        raise
    lease, parked.lease = parked.lease, None
    return parked.pid, lease


def spawn_wrapper(
    run_dir: Path,
    workdir: Path,
    procs_files: str,
    seccomp_file: str,
    agent_argv: list[str],
    env: dict[str, str],
    data: bytes,
    inheritable: list[int],
    lease_fd: int = -1,
    limits: Limits | None = None,
) -> int:
    """Spawn a wrapper: posix_spawn (vfork + exec in the C library) instead of
    subprocess.Popen, whose Python set-up cost more than the spawn itself. The child gets
    only stdin, stdout and stderr: Python opens descriptors close-on-exec, and those marked
    inheritable are closed in the child; `lease_fd`, the worker's uid lease, becomes its
    descriptor LEASE_FD."""
    stdin_arg = "-"
    pipe: tuple[int, int] | None = None
    actions: list[tuple[Any, ...]] = []
    if data and len(data) <= PIPE_STDIN_BYTES:
        pipe = os.pipe()
        actions.append((os.POSIX_SPAWN_DUP2, pipe[0], 0))
    else:
        actions.append((os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0))
        if data:
            stdin_arg = write_stdin(run_dir, data)
    actions += [(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0), (os.POSIX_SPAWN_DUP2, 1, 2)]
    if lease_fd >= 0:  # before the closes: a stale entry of the cached list may reuse its number
        actions.append((os.POSIX_SPAWN_DUP2, lease_fd, LEASE_FD))
    actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in inheritable if lease_fd < 0 or fd != LEASE_FD]
    argv = wrapper_argv(run_dir, stdin_arg, workdir, procs_files, seccomp_file, limits)
    try:
        pid = spawn.posix_spawn("/bin/sh", argv + agent_argv, env, file_actions=actions, setsid=True)
    finally:
        if pipe is not None:
            os.close(pipe[0])
    if pipe is not None:
        # Fits the pipe buffer: never blocks, even if the agent never reads its stdin.
        with contextlib.suppress(BrokenPipeError):
            os.write(pipe[1], data)
        os.close(pipe[1])
    return pid


def write_stdin(run_dir: Path, data: bytes) -> str:
    """The task or options in a file readable by the worker's user only (too big for a pipe)."""
    path = str(run_dir / STDIN_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return path
