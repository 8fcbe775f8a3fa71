"""The launcher: starts a pass's workers (a worktree first if the job has a repository, then
the process in its sandbox) and returns what each start is to record, typed (`Launched`).
It records nothing itself: the next pass's transaction does (engine/ledger.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from orchestrator.agents.base import Agent, LaunchSpec, SandboxProfile, WorkerContext
from orchestrator.core.auth import create_access_token
from orchestrator.db.availability import OUTAGES
from orchestrator.db.models import utcnow
from orchestrator.engine.queries import workers as worker_queries
from orchestrator.engine.queries.rows import JobRow, WorkerRow
from orchestrator.engine.remote_workspace import add_worktree, is_remote
from orchestrator.engine.remote_workspace import checkpoint as remote_checkpoint
from orchestrator.engine.supervision import (
    LAUNCH_CHUNK,
    LAUNCH_THREADS,
    WORKER_TOKEN_SCOPES,
    WRAPPER_FILES,
    EngineContext,
    Supervisor,
    log,
    worker_limits,
)
from orchestrator.executors import sandbox as sandboxing
from orchestrator.executors.local import WorkerProcess, make_dirs
from orchestrator.executors.ray_cluster import Lost, NotPlaced
from orchestrator.workspaces import git, gitdirs, refs
from orchestrator.workspaces import setup as worktree_setup


@dataclass(frozen=True)
class Spawned:
    """A started process and the memory it may grow to (its limit)."""

    proc: WorkerProcess
    memory_mb: int


@dataclass(frozen=True)
class Launched:
    """One worker the launcher tried to start; `spawned` None: it could not (`error` says why)."""

    worker: WorkerRow
    job: JobRow
    spawned: Spawned | None
    started_at: datetime | None = None  # the real time of the spawn (recorded a pass later)
    run_dir: str | None = None
    workdir: str | None = None
    branch: str | None = None
    base_commit: str | None = None
    error: str | None = None
    waiting: str | None = None  # not started, not failed: no cluster node had room (it waits IDLE)

    @property
    def proc(self) -> WorkerProcess | None:
        return self.spawned.proc if self.spawned is not None else None

    def values(self, *, host: str, engine_id: str) -> dict[str, Any]:
        """The worker's columns its start records."""
        assert self.spawned is not None
        proc = self.spawned.proc
        values: dict[str, Any] = {"run_dir": self.run_dir, "workdir": self.workdir}
        if self.branch is not None:
            values.update(branch=self.branch, result={"base_commit": self.base_commit})
        values.update(started_at=self.started_at, pid=proc.pid, pid_start_time=proc.start_time)
        values.update(host=proc.host or host, engine_id=engine_id)
        return values


@dataclass(frozen=True)
class _Prepared:
    worker: WorkerRow
    job: JobRow
    run_dir: Path
    workdir: Path
    branch: str | None
    base_commit: str | None
    start: Callable[[], Spawned]


class Launcher:
    def __init__(self, ctx: EngineContext, sup: Supervisor) -> None:
        self.ctx = ctx
        self.sup = sup
        self.threads = ThreadPoolExecutor(max_workers=LAUNCH_THREADS, thread_name_prefix="launch")

    def shutdown(self) -> None:
        self.threads.shutdown(wait=False)

    async def launch_all(self, ready: list[tuple[WorkerRow, JobRow]]) -> list[Launched]:
        """Start the pass's workers: each is prepared in the event loop (a worktree, if any, in a
        thread), then the blocking part (directories, files, the spawn) runs in the launcher
        threads, a chunk of workers per call: per-worker thread hand-offs cost more than the
        spawns on a small host, but a slow disk makes each directory costly, so a big pass is
        still split across the threads."""
        prepared: list[_Prepared] = []
        launched: list[Launched] = []
        for worker, job in ready:
            try:
                prepared.append(await self._prepare(worker, job))
            except Exception as exc:
                if OUTAGES.report(exc, f"preparing worker {worker.id}") is not None:
                    continue  # not its fault: it keeps its slot, IDLE, and a later pass starts it
                launched.append(_not_started(worker, job, exc))
        size = max(LAUNCH_CHUNK, -(-len(prepared) // LAUNCH_THREADS))
        chunks = [prepared[i : i + size] for i in range(0, len(prepared), size)]
        loop = asyncio.get_running_loop()
        for chunk_result in await asyncio.gather(
            *(loop.run_in_executor(self.threads, self._start_chunk, chunk) for chunk in chunks)
        ):
            launched.extend(chunk_result)
        return launched

    def _start_chunk(self, chunk: list[_Prepared]) -> list[Launched]:
        """Runs in a launcher thread: one worker that cannot start does not stop the others."""
        pool = self.ctx.executor.pool  # refilled after the chunk, not during it (WrapperPool.batch)
        with pool.batch() if pool is not None else contextlib.nullcontext():
            launched = [self._start_one(item) for item in chunk]
        for result in launched:
            if result.spawned is not None:  # the execs ran meanwhile: no wait for each
                self.ctx.executor.read_start_time(result.spawned.proc)
        return launched

    @staticmethod
    def _start_one(item: _Prepared) -> Launched:
        try:
            spawned = item.start()
        except NotPlaced as exc:
            return Launched(item.worker, item.job, None, waiting=str(exc))
        except Exception as exc:
            return _not_started(item.worker, item.job, exc)
        return Launched(
            item.worker,
            item.job,
            spawned,
            started_at=utcnow(),  # recorded by the next pass: keep the real time
            run_dir=str(item.run_dir),
            workdir=str(item.workdir),
            branch=item.branch,
            base_commit=item.base_commit,
        )

    async def _prepare(self, worker: WorkerRow, job: JobRow) -> _Prepared:
        """The worktree (if any), and the blocking call that starts the worker."""
        agent = self.ctx.agents.get(job.agent)
        run_dir = self.ctx.runs_dir / worker.id
        workdir = self.ctx.workspaces_dir / worker.id
        branch = base = None
        if job.repository:
            branch = git.branch_name(job.id, worker.id)
            async with self.sup.repo_lock(job.repository):
                repository = await self._checked_repository(job.repository)
                base = await self._start_point(repository, job)
                await asyncio.to_thread(
                    add_worktree, self.ctx.executor, self.ctx.settings, repository, workdir, branch, base
                )
        context = self.worker_context(worker, job, workdir, run_dir / "home", run_dir)

        def start() -> Spawned:
            # Before the agent writes its files there; a remote node makes its own worktree.
            make_dirs(run_dir, context.home, *([] if is_remote(self.ctx.executor) else [workdir]))
            spec = worktree_setup.prepare(
                self.ctx.settings.orchestrator_agents_file,
                job.repository,
                workdir,
                run_dir,
                agent.launch(context),
            )
            return self.start_process(
                worker.id, agent, spec, context, job.limits, read_start_time=False, git=bool(job.repository)
            )

        return _Prepared(worker, job, run_dir, workdir, branch, base, start)

    def start_process(
        self,
        worker_id: str,
        agent: Agent,
        spec: LaunchSpec,
        context: WorkerContext,
        job_limits: dict[str, Any] | None,
        *,
        read_start_time: bool = True,
        git: bool = True,
    ) -> Spawned:
        """Start a worker in its sandbox (docs/SANDBOX.md) with its profile's limits: the view
        is its worktree, its HOME (both handed to the agent's uid), the profile's binds and the
        programs the agent needs. `git` False: the job has no repository, so its scratch
        directory is never a worktree and gets no git view (nothing to record either)."""
        box = self._sandbox_spec(agent, context, job_limits)
        if git:
            self._git_view(box, spec, context)
        executor = self.ctx.executor  # it hands the worktree, HOME and git view to the worker's uid
        limits = worker_limits(agent, job_limits)
        proc = executor.start(
            worker_id,
            spec,
            context.workdir,
            context.run_dir,
            read_start_time=read_start_time,
            sandbox=box,
            limits=limits,
        )
        return Spawned(proc, limits.memory_mb)

    def _sandbox_spec(
        self, agent: Agent, context: WorkerContext, job_limits: dict[str, Any] | None
    ) -> sandboxing.SandboxSpec:
        profile = agent.sandbox
        box = sandboxing.SandboxSpec(
            context.workdir,
            context.home,
            network=profile.network and (job_limits or {}).get("network") != "none",
            ro_binds=[*agent.sandbox_paths(), *profile.ro_binds],
            rw_binds=list(profile.rw_binds),
        )
        # Files the agent profile wrote into the run dir for the agent (an MCP config, say):
        # read-only in the sandbox, at the paths its command line names. The wrapper's own files
        # (output, exit status, PID) stay out of reach.
        for entry in os.scandir(context.run_dir):
            if entry.is_file(follow_symlinks=False) and entry.name not in WRAPPER_FILES:
                box.ro_files.append((entry.path, entry.path))  # given to the worker's uid at its start
        if context.api_socket and os.path.exists(context.api_socket):
            # `uvicorn --uds`: the worker reaches the API through the server's unix socket (uvicorn
            # makes it 0666), bound in at its own path; a path socket is reachable whatever the
            # network namespace, so also with network "none".
            box.rw_extra.append(context.api_socket)
        return box

    def _git_view(self, box: sandboxing.SandboxSpec, spec: LaunchSpec, context: WorkerContext) -> None:
        """Git in the sandbox (`sandbox.add_git_view`), over the git dirs recorded at the worker's
        first start: the engine commits the worktree's final state onto the worker's branch when
        it ends (the agent's own commit history stays in its private view)."""
        sandbox = self.ctx.executor.sandbox
        dirs = gitdirs.record(context.workdir, context.run_dir)  # the .git file is the agent's later
        if dirs is None or sandbox is None:
            return
        sandboxing.add_git_view(sandbox, box, spec.env, dirs, context.run_dir)

    def worker_context(
        self,
        worker: WorkerRow,
        job: JobRow,
        workdir: Path,
        home: Path,
        run_dir: Path,
        resume_session: str | None = None,
    ) -> WorkerContext:
        """What the agent is told: its task, where it works, and a token scoped to its job."""
        expires = timedelta(seconds=job.timeout_seconds + 3600) if job.timeout_seconds else timedelta(days=7)
        token = create_access_token(
            user_id=job.created_by,
            scopes=WORKER_TOKEN_SCOPES,
            expires_delta=expires,
            worker_id=worker.id,
            job_id=job.id,
            settings=self.ctx.settings,
        )
        return WorkerContext(
            job_id=job.id,
            worker_id=worker.id,
            worker_index=worker.worker_index,
            worker_count=job.worker_count,
            depth=job.depth,
            task=job.task_description,
            options=job.agent_options or {},
            workdir=workdir,
            home=home,
            run_dir=run_dir,
            api_url=self.ctx.address.url,
            api_socket=self.ctx.address.socket_path,
            token=token,
            max_turns=job.max_turns,
            resume_session=resume_session,
        )

    async def _checked_repository(self, recorded: str) -> Path:
        """The job's repository, checked as at the submit (roots, real git dirs, top level): its
        files may have changed since (a `.git` file or a symlink swapped in)."""
        repository = await asyncio.to_thread(git.resolve_repository, self.ctx.settings, recorded)
        if repository != Path(recorded):
            raise git.GitError(f"repository {recorded} now resolves to {repository}")
        return repository

    async def _start_point(self, repository: Path, job: JobRow) -> str:
        """The commit a worker starts from: base_ref (else HEAD) with the submit's checks repeated
        on what it resolves to now. Only the delegating worker's own branch is checkpointed (its
        live worktree committed first, so the child sees its work so far); no other worktree."""
        if not job.base_ref:
            return (await asyncio.to_thread(refs.resolve, repository, "HEAD")).commit
        by_worker = job.created_by_worker_id
        subtree = job.path.removesuffix(f"{job.id}/") if by_worker else None
        resolved = await refs.resolve_checked(
            repository, job.base_ref, subtree=subtree, path_of=self._job_path
        )
        own = git.branch_name(job.parent_job_id or "", by_worker or "")
        if by_worker and job.parent_job_id and refs.is_branch(resolved, own):
            worktree = self.ctx.workspaces_dir / by_worker
            if (worktree / ".git").exists():
                # On the worker's own branch (HEAD put back on it, the index rebuilt): a sandboxed
                # agent may have pointed HEAD at another branch or staged objects only its
                # private object store holds. Its processes are stopped meanwhile (`hold`).
                await self._with_worker_held(
                    by_worker,
                    gitdirs.commit_worker,
                    worktree,
                    self.ctx.runs_dir / by_worker,
                    "orchestrator: checkpoint before delegating",
                    None,
                    own,
                    None,
                    self._max_file_mb(by_worker),
                )
            else:  # on its Ray node, if it runs on one: committed there, fetched here
                await asyncio.to_thread(
                    remote_checkpoint, self.ctx.executor, self.ctx.settings, repository, by_worker, own
                )
            resolved = await asyncio.to_thread(refs.resolve, repository, resolved.full_name)
        return resolved.commit

    def _max_file_mb(self, worker_id: str) -> int:
        """The worker's profile's max_file_mb: a checkpoint leaves bigger files out, unread."""
        record = self.sup.live.get(worker_id)
        agent = self.ctx.agents.agents.get(record.agent) if record is not None else None
        return agent.sandbox.max_file_mb if agent is not None else SandboxProfile.max_file_mb

    async def _with_worker_held(self, worker_id: str, call: Callable[..., Any], *args: Any) -> Any:
        """`call(*args)` in a thread with the worker's processes stopped, if this engine runs it
        on this host (executor `hold`); a pause or terminate recorded meanwhile is left as is."""
        record = self.sup.live.get(worker_id)
        hold = getattr(self.ctx.executor, "hold", None)
        held = False
        if record is not None and hold is not None and not record.proc.applied_paused:
            held = await asyncio.to_thread(hold, record.proc)
        try:
            return await asyncio.to_thread(call, *args)
        finally:
            if held and record is not None and not record.proc.applied_paused:
                await asyncio.to_thread(self.ctx.executor.send, record.proc, signal.SIGCONT)

    async def _job_path(self, job_id: str) -> str | None:
        async with self.ctx.db.session() as session:
            job = await worker_queries.job(session, job_id)
            return job.path if job is not None else None


def _not_started(worker: WorkerRow, job: JobRow, exc: Exception) -> Launched:
    """A worker that could not start: the next pass records it FAILED with the reason."""
    log.warning("worker %s could not start: %s", worker.id, exc)
    if isinstance(exc, Lost):  # its Ray node died meanwhile: `lost: node <id> died`
        return Launched(worker, job, None, error=str(exc))
    return Launched(worker, job, None, error=f"could not start: {exc}")
