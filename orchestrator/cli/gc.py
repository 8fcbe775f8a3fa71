"""`orchestrator gc`: reclaim disk from workers that are over.

Worktrees and scratch dirs are kept after a worker ends so people can inspect them; their work is
safe on the worker's branch, so once the job is final they can go. gc reads the database (it runs
on the server host, like `db upgrade`), never touches a worker that is not final or whose job is
still running, removes git worktrees with `git worktree remove` (branches stay), other dirs only
inside the data dir, and then runs `git worktree prune` on the repositories involved.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.text import Text

from orchestrator.cli.output import CliError, console
from orchestrator.workspaces.git import GitError, run_git

if TYPE_CHECKING:
    from orchestrator.core.config import Settings

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_age(text: str) -> float:
    """'0', '90', '90s', '15m', '2h', '7d', '1w' -> seconds."""
    match = _AGE.match(text)
    if not match:
        raise CliError(f"--older-than: cannot read {text!r}; use e.g. 0, 90s, 15m, 2h, 7d", code=2)
    return float(match.group(1)) * _UNITS[match.group(2).lower()]


@dataclass
class Candidate:
    worker_id: str
    job_id: str
    ended_at: datetime | None
    repository: str | None
    branch: str | None
    paths: list[Path] = field(default_factory=list)


@dataclass
class Report:
    worktrees: int = 0
    dirs: int = 0
    freed_bytes: int = 0
    skipped: list[str] = field(default_factory=list)
    pruned: set[Path] = field(default_factory=set)


def gc(
    older_than: Annotated[
        str,
        typer.Option("--older-than", help="Only jobs final for at least this long (0, 90s, 15m, 2h, 7d)."),
    ] = "0",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", "-n", help="Show what would be removed, remove nothing.")
    ] = False,
) -> None:
    """Remove worktrees and scratch dirs of workers whose jobs are final (branches are kept)."""
    import asyncio

    age = parse_age(older_than)
    from orchestrator.cli.server import _settings

    settings = _settings()
    data_dir = settings.data_dir
    rows = asyncio.run(_finished_workers(settings))
    candidates = _candidates(rows, data_dir, datetime.now(UTC) - timedelta(seconds=age))
    report = Report()
    out = console()
    repositories: set[Path] = set()
    for candidate in candidates:
        _collect(candidate, data_dir=data_dir, dry_run=dry_run, report=report, repositories=repositories)
    if not dry_run:
        _prune(repositories, report, min_age_seconds=max(age, 60.0))
    for note in report.skipped:
        out.print(Text(f"kept {note}", style="yellow"), soft_wrap=True)
    total = report.worktrees + report.dirs
    if total == 0:
        out.print(f"Nothing to collect ({len(candidates)} finished worker(s) checked).", style="dim")
        return
    pruned = f"; pruned {len(report.pruned)} repository(ies)" if report.pruned else ""
    action = "Would remove" if dry_run else "Removed"
    out.print(
        f"{action} {report.worktrees} worktree(s) and {report.dirs} dir(s), "
        f"{_human(report.freed_bytes)}{pruned}."
    )


def _collect(
    candidate: Candidate, *, data_dir: Path, dry_run: bool, report: Report, repositories: set[Path]
) -> None:
    """Remove (or, dry, list) one finished worker's worktree and scratch dirs, counting in `report`."""
    verb = "would remove" if dry_run else "removed"
    out = console()
    if candidate.repository:
        repositories.add(Path(candidate.repository))
    for path in candidate.paths:
        size = _size(path)
        kind, repo = _classify(path)
        if kind == "dir" and not _inside(path, data_dir):
            report.skipped.append(
                f"{path} ({candidate.worker_id}): not a git worktree and outside {data_dir}"
            )
            continue
        if not dry_run:
            try:
                _remove(path, kind, repo)
            except OSError as exc:
                report.skipped.append(f"{path} ({candidate.worker_id}): {exc}")
                continue
        if repo is not None:
            repositories.add(repo)
        if kind == "worktree":
            report.worktrees += 1
        else:
            report.dirs += 1
        report.freed_bytes += size
        line = Text(f"{verb} {kind} {path}", style="dim" if dry_run else "")
        line.append(f"  ({candidate.worker_id}, job {candidate.job_id}", style="dim")
        line.append(
            f", branch {candidate.branch})" if candidate.branch and kind == "worktree" else ")",
            style="dim",
        )
        out.print(line, soft_wrap=True)


def _prune(repositories: set[Path], report: Report, *, min_age_seconds: float) -> None:
    """After a removal: empty cgroups of ended workers, and the repositories' worktree lists."""
    out = console()
    from orchestrator.executors import cgroups

    groups = cgroups.detect()
    if groups.usable:  # empty groups of ended workers (a running worker's group is never empty)
        for name in groups.remove_stale(set(), min_age_seconds=min_age_seconds):
            out.print(f"removed the empty cgroup of worker {name}", style="dim")
    for repo in sorted(repositories):
        if (repo / ".git").exists() or (repo / "HEAD").exists():
            _git(repo, "worktree", "prune")
            report.pruned.add(repo)


@dataclass(frozen=True)
class FinishedWorker:
    worker_id: str
    job_id: str
    ended_at: datetime | None
    repository: str | None
    branch: str | None
    workdir: str | None
    run_dir: str | None


async def _finished_workers(settings: Settings) -> list[FinishedWorker]:
    """Final workers of final jobs, with when their job ended, read from the database."""
    from sqlalchemy import func, select
    from sqlalchemy.exc import OperationalError, ProgrammingError

    from orchestrator.core.states import JOB_FINAL, WORKER_FINAL
    from orchestrator.db.models import Job, Worker
    from orchestrator.db.session import Database

    database = Database(settings)
    ended = func.coalesce(Job.finished_at, Worker.finished_at, Worker.updated_at)
    stmt = (
        select(Worker, Job.repository, ended)
        .join(Job, Job.id == Worker.job_id)
        .where(
            Worker.status.in_([s.value for s in WORKER_FINAL]), Job.status.in_([s.value for s in JOB_FINAL])
        )
        .order_by(Worker.created_at)
    )
    try:
        async with database.session() as session:
            rows = (await session.execute(stmt)).all()
    except (OperationalError, ProgrammingError) as exc:
        raise CliError(
            f"cannot read workers from {database.engine.url.render_as_string(hide_password=True)}: "
            f"{' '.join(str(exc.orig).split())[:200]}; is it initialised (`orchestrator db upgrade`)?"
        ) from exc
    finally:
        await database.dispose()
    found = []
    for worker, repository, ended_at in rows:
        when = ended_at if isinstance(ended_at, datetime) else None
        if when is not None and when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        found.append(
            FinishedWorker(
                worker.id, worker.job_id, when, repository, worker.branch, worker.workdir, worker.run_dir
            )
        )
    return found


def _candidates(rows: list[FinishedWorker], data_dir: Path, cutoff: datetime) -> list[Candidate]:
    """Those that ended before `cutoff` and still have something on disk."""
    result = []
    for worker in rows:
        if worker.ended_at is not None and worker.ended_at > cutoff:
            continue
        candidate = Candidate(
            worker.worker_id, worker.job_id, worker.ended_at, worker.repository, worker.branch
        )
        seen: set[Path] = set()
        for raw in (
            worker.workdir,
            data_dir / "workspaces" / worker.worker_id,
            worker.run_dir,
            data_dir / "runs" / worker.worker_id,
        ):
            if not raw:
                continue
            path = Path(raw).absolute()
            if path in seen or not (path.exists() or path.is_symlink()):
                continue
            if any(_inside(path, other) for other in seen):
                continue
            seen.add(path)
            candidate.paths.append(path)
        if candidate.paths:
            result.append(candidate)
    return result


def _classify(path: Path) -> tuple[str, Path | None]:
    """('worktree', its main repository) for a linked git worktree, else ('dir', None)."""
    marker = path / ".git"
    if not marker.is_file():
        return "dir", None
    try:
        content = marker.read_text().strip()
    except OSError:
        return "dir", None
    if not content.startswith("gitdir:"):
        return "dir", None
    gitdir = Path(content.split(":", 1)[1].strip())
    if not gitdir.is_absolute():
        gitdir = (path / gitdir).resolve()
    # <repo>/.git/worktrees/<name>  ->  <repo>/.git  ->  <repo> (or the bare repository itself)
    common = gitdir.parent.parent if gitdir.parent.name == "worktrees" else None
    if common is None or not common.exists():
        return "worktree", None
    return "worktree", common.parent if common.name == ".git" else common


def _remove(path: Path, kind: str, repo: Path | None) -> None:
    if kind == "worktree" and repo is not None:
        done = _git(repo, "worktree", "remove", "--force", "--force", "--end-of-options", str(path))
        if done or not path.exists():
            return
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        shutil.rmtree(path)


def _git(repo: Path, *args: str) -> bool:
    """Whether git succeeded (through the one runner: hooks off, GIT_* from the environment ignored)."""
    try:
        run_git(*args, cwd=repo)
    except (OSError, GitError):
        return False
    return True


def _inside(path: Path, root: Path) -> bool:
    try:
        resolved, base = path.resolve(), root.resolve()
    except OSError:
        return False
    return resolved != base and resolved.is_relative_to(base)


def _size(path: Path) -> int:
    if path.is_symlink() or path.is_file():
        return path.lstat().st_size
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _human(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def register(app: typer.Typer) -> None:
    app.command("gc")(gc)
