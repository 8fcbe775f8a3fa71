"""The worker sandbox: bubblewrap around the agent, with the per-worker wrapper as its parent.

The wrapper (executors/local.py) stays the leader of the worker's session and process group and
runs `[setpriv …] bwrap … -- agent…` in the foreground: bwrap does not start a new session, so
the engine's signals to the group (pause, resume, terminate) reach every process inside, the
wrapper still writes the exit file, and adoption by PID + start time is unchanged.

The view is built from nothing (bwrap starts from an empty tmpfs root): the system directories
read-only, the worker's worktree, HOME and a private /tmp writable, and nothing else. The data
dir (secret key, database, every run and worktree), other repositories and the server's working
directory are simply not there. Own user, PID, IPC, UTS and cgroup namespaces; no capabilities;
no further user namespaces; no new privileges; a seccomp filter (executors/seccomp.py). When
the server runs as root, the agent runs as an unprivileged host uid of its own (`setpriv`; one
per live worker, leased in executors/uids.py), so even a file that is visible (say /etc/shadow)
keeps its host permissions, and nothing one worker leaves is another's.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.executors.uids import LEASE_DIR

log = logging.getLogger(__name__)

# Read-only system directories, bound when they exist. /bin, /lib… are symlinks into /usr on
# current distributions: those are recreated as symlinks, not bound.
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt", "/sys")
# Files under /etc that hold secrets of the host, masked even though the uid could not read most.
MASKED_ETC = ("/etc/shadow", "/etc/gshadow", "/etc/shadow-", "/etc/gshadow-", "/etc/ssh")
DEFAULT_UID = 61000  # the first of the unprivileged host uids for agents when the server is root
DEFAULT_UID_COUNT = 4096


@dataclass(frozen=True)
class SandboxHost:
    """What this host's sandbox uses, found once at start-up."""

    bwrap: str | None
    setpriv: str | None
    uid: int | None  # the first host uid agents run as (only when the server is root)
    seccomp: Path | None  # the compiled filter (a file bwrap reads on fd 9)
    problem: str | None  # why sandboxed workers cannot start here, or None
    ro_paths: tuple[str, ...] = ()  # the interpreter and package the built-in agents need
    uid_count: int = DEFAULT_UID_COUNT  # a worker leases one of uid … uid + uid_count - 1 (uids.py)

    @property
    def usable(self) -> bool:
        return self.problem is None


@dataclass
class SandboxSpec:
    """One worker's sandbox."""

    workdir: Path
    home: Path
    network: bool = True
    ro_binds: list[str] = field(default_factory=list)
    rw_binds: list[str] = field(default_factory=list)
    # (host source, target inside): read-only file binds, such as a worktree's private .git file
    ro_files: list[tuple[str, str]] = field(default_factory=list)
    rw_extra: list[str] = field(default_factory=list)  # writable paths the engine adds (git view)
    # (host source, target inside, writable), mounted in this order after every other bind: the
    # git view stacks a private common dir, the shared objects and the worktree's own git dir.
    mounts: list[tuple[str, str, bool]] = field(default_factory=list)
    # Paths handed to the worker's uid at its start besides the worktree and HOME (its git view).
    owned: list[str] = field(default_factory=list)


def _outermost(paths: list[str]) -> list[str]:
    """The paths, without those inside another of them (bound once, with the outer one)."""
    unique = sorted(set(paths))
    return [p for p in unique if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in unique)]


def python_paths() -> tuple[str, ...]:
    """The interpreter, its standard library, the virtualenv and this package, read-only: the
    simulated agent and MCP helpers run `python -m orchestrator…`. The package is bound alone, so
    an editable install does not expose its whole checkout (the server's working directory)."""
    import orchestrator

    paths = {sys.base_prefix, sys.prefix, str(Path(orchestrator.__file__).resolve().parent)}
    paths.add(str(Path(sys.executable).resolve().parent))  # normally inside sys.base_prefix
    return tuple(sorted(p for p in paths if p and not p.startswith("/usr/")))


def detect(
    data_dir: Path, *, uid: int | None = DEFAULT_UID, uid_count: int = DEFAULT_UID_COUNT
) -> SandboxHost:
    """Find bwrap, compile the seccomp filter and run one real sandboxed command: a host where
    that fails says why, and workers fail with that reason instead of running unconfined."""
    from orchestrator.executors import seccomp

    bwrap = shutil.which("bwrap")
    setpriv = shutil.which("setpriv")
    run_as = uid if os.geteuid() == 0 and uid is not None else None
    ro_paths = python_paths()
    if bwrap is None:
        return SandboxHost(None, setpriv, run_as, None, "bwrap (bubblewrap) is not installed", ro_paths)
    if run_as is not None and setpriv is None:
        return SandboxHost(bwrap, None, run_as, None, "setpriv (util-linux) is not installed", ro_paths)
    filter_path = data_dir / "seccomp.bpf"
    try:
        seccomp.write_filter(filter_path)
    except (OSError, seccomp.UnsupportedArchitecture) as exc:
        return SandboxHost(bwrap, setpriv, run_as, None, f"no seccomp filter: {exc}", ro_paths)
    if run_as is not None:
        try:  # where the uid leases live (executors/uids.py): without it no worker can start
            LEASE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            return SandboxHost(bwrap, setpriv, run_as, None, f"no uid lease directory: {exc}", ro_paths)
    host = SandboxHost(bwrap, setpriv, run_as, filter_path, None, ro_paths, uid_count)
    probe_dir = data_dir / "sandbox-probe"
    probe_dir.mkdir(parents=True, exist_ok=True)
    if run_as is not None:
        os.chown(probe_dir, run_as, run_as)
    argv = command(host, SandboxSpec(probe_dir, probe_dir, network=False), ["/bin/true"])
    try:
        # The filter goes in on fd 9 as the worker wrapper passes it (local.py).
        done = subprocess.run(
            ["/bin/sh", "-c", 'exec "$@" 9<"$0"', str(filter_path), *argv],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        problem = None if done.returncode == 0 else f"bwrap failed: {done.stderr.strip()[:300]}"
    except (OSError, subprocess.TimeoutExpired) as exc:
        problem = f"bwrap could not run: {exc}"
    if problem is not None:
        return SandboxHost(bwrap, setpriv, run_as, filter_path, problem, ro_paths)
    return host


def command(host: SandboxHost, spec: SandboxSpec, argv: list[str], *, uid: int | None = None) -> list[str]:
    """The command line that runs `argv` in the sandbox (the seccomp filter is read on fd 9), as
    `uid` (the worker's leased uid; the range's first by default, for probes and benchmarks)."""
    assert host.bwrap is not None
    uid = host.uid if uid is None or host.uid is None else uid
    args = [host.bwrap, "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    args += ["--die-with-parent", "--hostname", "worker"]
    inner: list[str] = []
    if uid is not None:
        # A root server: bwrap builds the view with root's rights (it can bind a directory only
        # root may enter, such as a pyenv under /root), keeps only the three capabilities the
        # inner setpriv needs to become the agent's uid (and DAC_READ_SEARCH, below), and
        # setpriv then drops every capability (a uid change from root clears them), the bounding
        # set and the group list. The agent ends as a plain host uid: no user namespace maps it.
        assert host.setpriv is not None
        args += ["--cap-drop", "ALL"]
        args += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
        # bwrap enters the worktree (`--chdir`) with these capabilities only, as uid 0: the
        # worktree and HOME are the agent's uid's, 0700 under the server's umask 077, so it needs
        # DAC_READ_SEARCH to cross them. setpriv's uid change drops it with every other one.
        args += ["--cap-add", "CAP_DAC_READ_SEARCH"]
        inner = [host.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
        inner += ["--inh-caps=-all", "--bounding-set=-all", "--no-new-privs", "--"]
    else:
        # Not root: bwrap itself needs a user namespace; the agent keeps the server's uid.
        args += ["--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
    if not spec.network:
        args.append("--unshare-net")
    system, bound = _system_view()
    args += system
    ro = [p for p in _outermost([*host.ro_paths, *spec.ro_binds]) if os.path.exists(p)]
    rw = [str(spec.workdir), str(spec.home), *spec.rw_binds, *spec.rw_extra]
    # bwrap makes a bind target's missing parents 0700 (the agent could not reach its own
    # worktree): make them first, 0711, so they can be crossed but not listed. The parents of
    # the interpreter's and this package's paths are 0755: Python finds a module on a sys.path
    # entry by listing it (an editable install puts the checkout's directory on sys.path, and
    # only the package and the virtualenv are bound in it, so the listing shows nothing more).
    made: set[str] = set()
    listable = _parents(host.ro_paths)
    targets = [*(target for _, target, _ in spec.mounts), *(target for _, target in spec.ro_files)]
    for path in [*ro, *rw, *targets]:
        for parent in reversed(Path(path).parents[:-1] if len(Path(path).parents) > 1 else []):
            name = str(parent)
            if name in made or (name + "/").startswith(bound):
                continue
            made.add(name)
            args += ["--perms", "0755" if name in listable else "0711", "--dir", name]
    for path in ro:
        args += ["--ro-bind", path, path]
    for path in rw:
        args += ["--bind", path, path]
    for source, target, writable in spec.mounts:
        args += ["--bind" if writable else "--ro-bind", source, target]
    for source, target in spec.ro_files:
        args += ["--ro-bind", source, target]
    # (bwrap's --proc already keeps /proc/sys, /proc/sysrq-trigger & co read-only.)
    if host.seccomp is not None:
        args += ["--seccomp", "9"]
    args += ["--chdir", str(spec.workdir), "--"]
    return args + inner + list(argv)


@functools.cache
def _system_view() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The system part of every sandbox's command line (the read-only system directories, the
    masked secrets of /etc, /proc, /dev and the tmpfs ones), and the read-only mount points
    nothing can be made under (as prefixes, with a trailing slash, and as themselves). Found once
    per process: it is the host's layout, the same for every worker, and a start reads it often."""
    args: list[str] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    for path in MASKED_ETC:
        if os.path.isdir(path):
            args += ["--tmpfs", path, "--remount-ro", path]
        elif os.path.exists(path):
            args += ["--ro-bind", "/dev/null", path]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/run"]
    args += ["--perms", "1777", "--tmpfs", "/tmp", "--perms", "1777", "--tmpfs", "/var/tmp"]
    # Read-only mounts: nothing can be made inside them (the tmpfs ones are fine).
    bound = [p for p in SYSTEM_DIRS if os.path.isdir(p) and not os.path.islink(p)] + ["/proc", "/dev"]
    return tuple(args), tuple(b + "/" for b in bound)


@functools.cache
def _parents(paths: tuple[str, ...]) -> frozenset[str]:
    return frozenset(str(parent) for path in paths for parent in Path(path).parents)


def give_to_agent(host: SandboxHost, *paths: Path, uid: int | None = None) -> None:
    """Hand the worker's writable directories to its uid (the server creates them): `uid`, the
    worker's lease, or the range's first (probes, benchmarks)."""
    if host.uid is None:
        return
    for path in paths:
        _chown_tree(path, host.uid if uid is None else uid)


def _chown_tree(root: Path, uid: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.lchown(root, uid, uid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            with contextlib.suppress(FileNotFoundError):
                os.lchown(os.path.join(dirpath, name), uid, uid)


# What a private common git dir holds besides refs (objects and worktrees are mount points).
_COMMON_FILES = ("HEAD", "config", "packed-refs", "shallow", "description")
_COMMON_DIRS = ("refs", "info")


def private_git_common(common: Path, own: Path, dest: Path) -> None:
    """A private copy of a repository's common git dir for one sandboxed worktree: its refs,
    packed-refs, HEAD, config and info, an empty `objects` (the shared store is mounted over it,
    read-only) and `worktrees/<own>` (the worktree's own git dir is mounted there). Mounted over
    the common dir inside the sandbox, it lets the agent's own `git commit`, `branch` and `tag`
    work on refs only it sees: the repository's refs, config and hooks stay as they are. Its
    new objects go to a private store (GIT_OBJECT_DIRECTORY); the engine commits the worktree's
    final state onto the worker's branch when it ends."""
    if (dest / "worktrees" / own.name).is_dir():
        return  # a resumed worker keeps its view (its own commits and branches)
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in _COMMON_FILES:
        if (common / name).is_file():
            shutil.copyfile(common / name, dest / name, follow_symlinks=False)
    for name in _COMMON_DIRS:
        if (common / name).is_dir():
            # Lock files come and go while other workers' branches are committed.
            skip = shutil.ignore_patterns("*.lock")
            shutil.copytree(common / name, dest / name, symlinks=True, ignore=skip)
    (dest / "objects").mkdir()
    (dest / "worktrees" / own.name).mkdir(parents=True)
    for top, dirs, files in os.walk(dest):  # copytree kept the repository's modes: private, as the data dir
        for name in (*dirs, *files):
            path = os.path.join(top, name)
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode):
                os.chmod(path, stat.S_IMODE(mode) & ~0o077)


def add_git_view(
    host: SandboxHost, box: SandboxSpec, env: dict[str, str], dirs: tuple[Path, Path], run_dir: Path
) -> None:
    """Git in the sandbox, for a worktree whose (own, common) git dirs are `dirs`: a private copy
    of the common dir (refs, HEAD, config) is mounted over it, so the agent's own commits and
    branches work on refs only it sees; the shared objects are mounted read-only inside it, the
    worktree's own dir (HEAD, index) writable, and new objects go to a private store in its HOME.
    Its work reaches its branch through the engine's (or the node's) commit at its end."""
    own, common = dirs
    objects, private = box.home / ".git-objects", run_dir / "git-common"
    objects.mkdir(parents=True, exist_ok=True)
    private_git_common(common, own, private)
    box.mounts += [
        (str(private), str(common), True),
        (str(common / "objects"), str(common / "objects"), False),
        (str(own), str(common / "worktrees" / own.name), True),
    ]
    env["GIT_OBJECT_DIRECTORY"] = str(objects)
    env["GIT_ALTERNATE_OBJECT_DIRECTORIES"] = str(common / "objects")
    box.owned += [str(own), str(private)]  # handed to the worker's uid when it starts
