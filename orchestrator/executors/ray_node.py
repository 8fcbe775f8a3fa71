"""The node side of the Ray executor: one actor per worker, running the local executor there.

The actor starts the worker with the same wrapper, sandbox and cgroup limits as a local worker
(executors/local.py) in a directory of its own node, and answers the engine's calls: signals,
output from an offset, exit status, whether its node is going away. It never touches the
database. Paths the engine chose (its run dir and worktree) are mapped to the node's own
directory, so nothing on the node relies on a filesystem shared with the engine.

Ray does not kill what an actor started (a killed actor leaves its children's process group
behind) and a node whose raylet dies can keep its processes running. So every worker gets a
fence: a tiny shell loop in a session of its own that kills the worker's process group as soon
as the actor or the node's raylet is gone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.agents.base import LaunchSpec
from orchestrator.executors import cgroups
from orchestrator.executors import sandbox as sandboxing
from orchestrator.executors.cgroups import MIB, Limits
from orchestrator.executors.local import (
    EXIT_FILE,
    OUTPUT_FILE,
    PID_FILE,
    STDIN_FILE,
    LocalExecutor,
    WorkerProcess,
    make_dirs,
    read_exit_code,
)
from orchestrator.executors.processes import stopped_process_groups
from orchestrator.executors.ray_push import disk_full, retried
from orchestrator.workspaces import remote
from orchestrator.workspaces import setup as worktree_setup
from orchestrator.workspaces.git import GitError, worktree_git_dirs
from orchestrator.workspaces.gitdirs import too_big
from orchestrator.workspaces.remote import RemoteCheckout

NODE_DIR_ENV = "ORCHESTRATOR_NODE_DIR"  # where a node keeps its workers' run dirs and worktrees
MAX_CHUNK = 1 << 20
GROUP_GONE_SECONDS = 30.0  # how long the final push waits for a killed process group to go
MAX_SHIPPED_BYTES = 8 * MIB  # run-dir files the agent profile wrote, sent along with the start
WRAPPER_FILES = frozenset({OUTPUT_FILE, EXIT_FILE, PID_FILE, STDIN_FILE, EXIT_FILE + ".tmp"})
GCS_CHECK_SECONDS = 5.0  # how often a worker's actor asks the GCS whether it was declared dead
# The fence: once the actor or the raylet is gone, kill the worker's process group; done when
# the group is empty. It watches the group, not its leader: a wrapper that ended may leave a
# member behind (a background job deaf to SIGTERM) that only the engine's `finish` would kill,
# and no engine calls it once the actor is gone. A process counts as gone once it is a zombie
# too (a raylet killed but not yet reaped by its parent); read with shell builtins only: the
# loop forks nothing but its `sleep`.
FENCE_SCRIPT = (
    'alive() { { read -r l < "/proc/$1/stat"; } 2>/dev/null || return 1; '
    's=${l##*") "}; [ "${s%% *}" != Z ]; }; '
    'a="$1"; r="$2"; w="$3"; '
    'while alive "$a" && alive "$r"; do kill -s 0 -- "-$w" 2>/dev/null || exit 0; sleep 1; done; '
    'kill -s KILL -- "-$w" 2>/dev/null'
)


@dataclass
class StartRequest:
    """What the engine sends to start one worker (plain data: pickled across nodes)."""

    worker_id: str
    spec: LaunchSpec
    workdir: str  # the engine's paths, mapped to the node's below
    run_dir: str
    sandbox: sandboxing.SandboxSpec | None
    limits: Limits | None
    sandboxed: bool
    sandbox_uid: int | None
    files: dict[str, bytes] = field(default_factory=dict)  # run-dir files the agent profile wrote
    checkout: RemoteCheckout | None = None  # a repository job: the worktree comes from a git remote
    sandbox_uid_count: int = sandboxing.DEFAULT_UID_COUNT  # the node leases a uid per worker from the range
    copied: dict[str, bytes] = field(default_factory=dict)  # the set-up's `copy` files, for the worktree


def files_to_ship(run_dir: Path) -> dict[str, bytes]:
    """The files the agent profile wrote into the run dir (an MCP config, say), for the node."""
    files: dict[str, bytes] = {}
    total = 0
    for top, dirs, names in os.walk(run_dir):
        dirs[:] = [d for d in dirs if d != "git-common"]
        for name in names:
            path = Path(top) / name
            relative = str(path.relative_to(run_dir))
            if relative in WRAPPER_FILES or not path.is_file() or path.is_symlink():
                continue
            total += path.stat().st_size
            if total > MAX_SHIPPED_BYTES:
                raise RuntimeError(
                    f"the run dir holds more than {MAX_SHIPPED_BYTES // MIB} MiB to send to a node"
                )
            files[relative] = path.read_bytes()
    return files


def copied_files(workdir: Path) -> dict[str, bytes]:
    """The files the repository's set-up copied into the worker's directory on the server (its
    `copy` list: workspaces/setup.py), for the node to put into the worktree it clones."""
    return files_to_ship(workdir) if workdir.is_dir() else {}


def _write_files(root: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def node_dir(node_id: str) -> Path:
    return (Path(os.environ.get(NODE_DIR_ENV) or "/tmp/orchestrator-ray") / node_id).resolve()


class PathMap:
    """Replaces the engine's run dir and worktree paths by the node's in every string."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def __call__(self, text: str) -> str:
        for old, new in self.pairs:
            text = re.sub(re.escape(old) + r"(?=/|$|[^\w.-])", new.replace("\\", r"\\"), text)
        return text


def _mapped_sandbox(box: sandboxing.SandboxSpec, remap: PathMap) -> sandboxing.SandboxSpec:
    return dataclasses.replace(
        box,
        workdir=Path(remap(str(box.workdir))),
        home=Path(remap(str(box.home))),
        ro_binds=[remap(p) for p in box.ro_binds],
        rw_binds=[remap(p) for p in box.rw_binds],
        ro_files=[(remap(s), remap(t)) for s, t in box.ro_files],
        # A path the node does not have (the engine's API socket) cannot be bound.
        rw_extra=[remap(p) for p in box.rw_extra if os.path.exists(remap(p))],
        mounts=[(remap(s), remap(t), w) for s, t, w in box.mounts],
        owned=[remap(p) for p in box.owned],
    )


class WorkerNode:
    """The body of one worker's actor (made a Ray actor class by executors/ray_executor.py)."""

    def __init__(self) -> None:
        import ray

        self.node_id: str = ray.get_runtime_context().get_node_id()
        self.raylet = os.getppid()  # the raylet started this worker process
        self.executor: LocalExecutor | None = None
        self.proc: WorkerProcess | None = None
        self.fence: int | None = None
        self.ended = False
        self.finished: dict[str, Any] | None = None  # finish's answer, once given
        self.dead = False  # the GCS declared this actor dead: nothing of the worker is wanted any more
        self.checkout: RemoteCheckout | None = None
        self.workdir: Path | None = None
        self.push_lock = threading.Lock()
        self.file_mb: int | None = None  # files of this size or more stay out of the final commit

    def _make_executor(self, request: StartRequest, base: Path) -> LocalExecutor:
        groups = cgroups.detect()
        # One worker per actor: no parked wrappers (each would hold a uid lease for nothing).
        if not request.sandboxed:
            return LocalExecutor(None, groups if groups.usable else None, pool_size=0)
        host = sandboxing.detect(base, uid=request.sandbox_uid, uid_count=request.sandbox_uid_count)
        if host.usable and not groups.usable:
            host = dataclasses.replace(host, problem=f"no worker limits: {groups.problem}")
        return LocalExecutor(host, groups, pool_size=0)

    def start(self, request: StartRequest) -> dict[str, Any]:
        """Start the worker once: a second call (an engine that restarted before recording the
        first) answers with the process already running. A full disk says so first (git's own
        words, with their paths, come after it and may be cut)."""
        if self.proc is not None:
            return self.identity()
        try:
            return self._start(request)
        except (OSError, GitError) as exc:
            if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc):
                raise RuntimeError(f"no space left on device in {node_dir(self.node_id)}: {exc}") from None
            raise

    def _start(self, request: StartRequest) -> dict[str, Any]:
        base = node_dir(self.node_id)
        run_dir = base / "runs" / request.worker_id
        workdir = base / "workspaces" / request.worker_id
        remap = PathMap([(request.run_dir, str(run_dir)), (request.workdir, str(workdir))])
        make_dirs(base, base / "runs", base / "workspaces", run_dir)
        self.checkout, self.workdir = request.checkout, workdir
        self.file_mb = request.limits.file_mb if request.limits is not None else None
        if request.checkout is not None:
            remote.clone_worktree(request.checkout, workdir)
            _write_files(workdir, request.copied)
        else:
            make_dirs(workdir)
        _write_files(run_dir, request.files)
        self.executor = executor = self._make_executor(request, base)
        spec = LaunchSpec(
            [remap(a) for a in request.spec.argv],
            {k: remap(v) for k, v in request.spec.env.items()},
            request.spec.stdin_text,
        )
        box = _mapped_sandbox(request.sandbox, remap) if request.sandbox is not None else None
        if box is not None:
            make_dirs(box.home)
            _git_view(executor, box, spec.env, run_dir)  # the executor hands it to the worker's uid
        self.proc = executor.start(
            request.worker_id, spec, workdir, run_dir, sandbox=box, limits=request.limits
        )
        self._start_fence()
        threading.Thread(target=self._watch_gcs, name="gcs-watch", daemon=True).start()
        return self.identity()

    def _start_fence(self) -> None:
        assert self.proc is not None
        argv = ["/bin/sh", "-c", FENCE_SCRIPT, "orchestrator-fence"]
        argv += [str(os.getpid()), str(self.raylet), str(self.proc.pid)]
        null = [(os.POSIX_SPAWN_OPEN, fd, os.devnull, os.O_RDWR, 0) for fd in (0, 1, 2)]
        self.fence = os.posix_spawn(
            "/bin/sh", argv, {"PATH": "/usr/bin:/bin"}, file_actions=null, setsid=True
        )

    def _watch_gcs(self) -> None:
        """Kill the worker's process group, and end this actor, once the GCS has declared it dead
        (its node declared dead by the health check: a raylet that hangs, a node cut off): the
        engine has ended the worker then, so nothing of it may run on, also when the node comes
        back. A GCS that does not answer says nothing: the fence covers a raylet or an actor
        that is gone."""
        import ray
        from ray._private import state

        actor_id = ray.get_runtime_context().get_actor_id()
        while not self.ended:
            time.sleep(GCS_CHECK_SECONDS)
            try:
                dead = state.actors(actor_id).get("State") == "DEAD"
            except Exception:
                continue
            if dead:
                self.dead = True
                self._kill_group()
                self._wait_group_gone()  # and reaped: nobody polls this actor any more
                # A dead actor whose raylet resumed (and exited) would linger on: go too.
                os._exit(0)

    def identity(self) -> dict[str, Any]:
        proc = self.proc
        return {
            "node_id": self.node_id,
            "pid": proc.pid if proc else None,
            "start_time": proc.start_time if proc else None,
            "checkout": self.checkout is not None,
        }

    def _reap(self) -> int | None:
        """The wrapper's status once it has ended (reaped here: it is this actor's child)."""
        assert self.proc is not None
        if self.fence is not None:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(self.fence, os.WNOHANG)[0]:
                    self.fence = None
        return self.proc.reap()

    def node_gone(self) -> bool:
        """Whether this node's raylet is gone (the node is dying: its workers with it)."""
        return os.getppid() != self.raylet

    def poll(self, offset: int) -> dict[str, Any]:
        """Output from `offset` on (at most a chunk), and whether the worker has ended: its exit
        status read only once the wrapper is gone and all output was handed over."""
        assert self.proc is not None
        status = self._reap()
        chunk = b""
        with contextlib.suppress(FileNotFoundError), open(self.proc.output_path, "rb") as handle:
            handle.seek(offset)
            chunk = handle.read(MAX_CHUNK)
        ended = status is not None and len(chunk) < MAX_CHUNK
        return {
            "output": chunk,
            "ended": ended,
            "exit_code": read_exit_code(self.proc.run_dir) if ended else None,
            "setup_failed": worktree_setup.failure(self.proc.run_dir) if ended else None,
            "node_gone": self.node_gone(),
        }

    def signal(self, signum: int) -> bool:
        assert self.executor is not None and self.proc is not None
        if self._reap() is not None:
            return False
        return self.executor.send(self.proc, signal.Signals(signum))

    def stopped(self) -> bool:
        """Whether the worker's process group has a stopped member (a pause that took)."""
        assert self.proc is not None
        return self.proc.pid in stopped_process_groups()

    def finish(self) -> dict[str, Any]:
        """The worker has ended: kill what is left of its process group (children that outlived
        the agent), push its branch (a repository job), remove its cgroups and say whether a
        limit ended it."""
        assert self.executor is not None and self.proc is not None
        if self.finished is not None:  # asked again (a new engine driver): the same answer
            return self.finished
        self._kill_group()
        self.ended = True
        pushed = self.push()
        limit = self.executor.ending(self.proc.worker_id) or disk_full(
            self.node_id, node_dir(self.node_id), pushed
        )
        self.finished = {"limit": limit, **pushed}
        return self.finished

    def kill_group(self) -> dict[str, Any]:
        """SIGKILL the worker's whole process group (before the actor itself is killed), then
        push what its worktree holds: a terminated worker's work comes back too."""
        self._kill_group()
        return self.push()

    def _kill_group(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.proc.pid, signal.SIGCONT)

    def checkpoint(self) -> dict[str, Any]:
        """A delegating worker's live worktree committed and pushed onto its branch (its child
        starts from its work so far), its processes stopped meanwhile (as the engine's own
        checkpoint: `hold`), unless paused already; the worktree stays."""
        if self.checkout is None or self.workdir is None or self.proc is None or self.executor is None:
            return {"commit": None, "push_error": "no worktree of a repository on this node"}
        with self.push_lock:
            held = not self.stopped() and self.executor.hold(self.proc)
            try:
                return self._push_work()
            finally:
                if held:
                    self.executor.send(self.proc, signal.SIGCONT)

    def push(self) -> dict[str, Any]:
        """Commit the worktree onto the worker's branch and push it to the remote, as the node
        user, once no process of the agent can still write to it; one push at a time."""
        if self.checkout is None or self.workdir is None or self.proc is None:
            return {"commit": None, "push_error": None}
        with self.push_lock:
            self._wait_group_gone()
            pushed = self._push_work()
            if pushed["commit"] is not None:
                remote.remove_checkout(self.workdir)  # the remote holds the work now
        return pushed

    def _push_work(self) -> dict[str, Any]:
        assert self.checkout is not None and self.workdir is not None
        # Left out, unread: git would read a sparse terabyte whole (as gitdirs.commit_worker).
        big = too_big(self.workdir, self.file_mb << 20) if self.file_mb and self.workdir.is_dir() else []
        checkout, workdir = self.checkout, self.workdir
        try:
            commit = retried(lambda: remote.push_branch(checkout, workdir, big), lambda: self.dead)
        except (GitError, OSError) as exc:
            # Its worktree stays on the node: the work is not lost, only not back yet.
            return {"commit": None, "push_error": f"on node {self.node_id}: {exc}"[:500]}
        return {"commit": commit, "push_error": None, "skipped": big}

    def _wait_group_gone(self) -> None:
        """SIGKILL is delivered asynchronously: wait (bounded) until the group has no member."""
        assert self.proc is not None
        deadline = time.monotonic() + GROUP_GONE_SECONDS
        while time.monotonic() < deadline:
            self._reap()  # a zombie leader still counts as a member
            try:
                os.killpg(self.proc.pid, 0)
            except (ProcessLookupError, PermissionError):
                return
            time.sleep(0.05)


def _git_view(
    executor: LocalExecutor, box: sandboxing.SandboxSpec, env: dict[str, str], run_dir: Path
) -> None:
    """The private git view the engine gives a sandboxed worker on one machine (engine
    `_start_process`), over the node's linked worktree of its node repository: the agent's own
    commits and refs stay in its view; the node repository is read-only to it."""
    dirs = worktree_git_dirs(box.workdir)
    if dirs is None or executor.sandbox is None:
        return
    sandboxing.add_git_view(executor.sandbox, box, env, dirs, run_dir)
