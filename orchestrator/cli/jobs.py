"""Job commands: submit (optionally watching the tree), list, show, cancel, events."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.text import Text

from orchestrator.cli.client import (
    ApiClient,
    JobArg,
    JsonOption,
    LimitOption,
    OffsetOption,
    TokenOption,
    UrlOption,
    client,
)
from orchestrator.cli.common import fetch_and_show, list_page, plain_table, workers_table
from orchestrator.cli.output import (
    CliError,
    console,
    elapsed,
    format_duration,
    format_time,
    id_status,
    print_json,
    shorten,
    status_text,
)
from orchestrator.core.states import JobStatus

if TYPE_CHECKING:
    from rich.table import Table


def parse_options(pairs: list[str]) -> dict[str, Any]:
    """`k=v` pairs; a value that is valid JSON is taken as JSON (numbers, lists, objects), else as text."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--option expects key=value, got {pair!r}", code=2)
        try:
            value: Any = json.loads(raw)
        except ValueError:
            value = raw
        options[key.strip()] = value
    return options


def submit(
    task: Annotated[str, typer.Argument(help="What the workers should do.", show_default=False)],
    workers: Annotated[int, typer.Option("--workers", "-w", min=1, help="Workers to run in parallel.")] = 1,
    depth: Annotated[
        int | None, typer.Option(min=0, help="Depth of the job (default 0, or the parent's + 1).")
    ] = None,
    parent: Annotated[str | None, typer.Option("--parent", help="Parent job id (for a child job).")] = None,
    agent: Annotated[str | None, typer.Option(help="Agent profile (server default if omitted).")] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(
            "--option", "-o", help="Agent option key=value (value parsed as JSON when valid); repeatable."
        ),
    ] = None,
    repo: Annotated[
        str | None, typer.Option("--repo", help="Local git repository the workers work in.")
    ] = None,
    base_ref: Annotated[
        str | None, typer.Option("--base-ref", help="Branch or commit to start from.")
    ] = None,
    timeout: Annotated[
        float | None, typer.Option("--timeout", min=0, help="Seconds before a worker is stopped.")
    ] = None,
    budget: Annotated[float | None, typer.Option("--budget", min=0, help="Maximum cost in USD.")] = None,
    max_turns: Annotated[int | None, typer.Option("--max-turns", min=1, help="Maximum agent turns.")] = None,
    priority: Annotated[int, typer.Option(help="Higher runs first within a depth.")] = 0,
    wait: Annotated[
        bool, typer.Option("--wait", help="Follow the job tree live; exit 0 only if it COMPLETED.")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the job id.")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Submit a job; with --wait, watch its whole tree until it ends."""
    body: dict[str, Any] = {"task_description": task, "worker_count": workers, "priority": priority}
    optional: dict[str, Any] = {"agent": agent, "parent_job_id": parent, "base_ref": base_ref}
    optional |= {"max_turns": max_turns, "agent_options": parse_options(option or []) or None}
    optional |= {"timeout_seconds": timeout, "max_cost_usd": budget, "repository": _repository(repo)}
    body |= {key: value for key, value in optional.items() if value is not None}
    with client(url, token) as api:
        if depth is None and parent is not None:
            depth = int(api.get(f"/api/jobs/{parent}").get("depth", 0)) + 1
        body["depth"] = depth or 0
        submitted = time.monotonic()  # the --wait view's stamps count from here
        job = api.post("/api/jobs/submit", body)
        if not wait:
            _print_submitted(job, quiet=quiet, as_json=as_json)
            return
        final = _follow(api, job, quiet=quiet or as_json, submitted=submitted)
    if as_json:
        print_json(final)
    elif quiet:
        console().print(f"{final['id']} {final['status']}")
    if final.get("status") != "COMPLETED":
        raise typer.Exit(1)


def _repository(repo: str | None) -> str | None:
    """The server resolves paths against its own working directory: send an absolute one."""
    if repo is None:
        return None
    local = Path(repo).expanduser()
    return str(local.resolve()) if local.exists() else repo


def _follow(api: ApiClient, job: dict[str, Any], *, quiet: bool, submitted: float) -> dict[str, Any]:
    """`submit --wait`: watch the job's tree until it ends, then show its result; the final job."""
    if not quiet:
        console().print(
            Text.assemble("Submitted ", (job["id"], "bold"), " — following it; Ctrl-C stops watching only.")
        )
    final = _wait(api, job["id"], quiet=quiet, submitted=submitted)
    if not quiet:
        from orchestrator.cli.results import show_final_result

        show_final_result(api, final)
    return final


def _print_submitted(job: dict[str, Any], *, quiet: bool, as_json: bool) -> None:
    if as_json:
        print_json(job)
    elif quiet:
        console().print(job["id"])
    else:
        console().print(
            Text.assemble(
                "Submitted ", (job["id"], "bold"), " ", status_text(job.get("status")), f"  d{job['depth']}"
            )
        )
        console().print(f"See it with: orchestrator job {job['id']}", style="dim")


def _wait(api: ApiClient, job_id: str, *, quiet: bool, submitted: float) -> dict[str, Any]:
    """Until final, quietly (for --json/-q) or with the live tree; woken by the server's events."""
    from orchestrator.cli.live import wait_until_final, watch

    try:
        if quiet:
            return wait_until_final(api, job_id)
        return watch(api, job_id, submitted=submitted).root
    except KeyboardInterrupt:
        console().print(f"\nStopped watching; {job_id} keeps running. See it with: orchestrator job {job_id}")
        raise typer.Exit(130) from None


def list_jobs(
    status: Annotated[
        JobStatus | None, typer.Option(case_sensitive=False, help="Only jobs in this status.")
    ] = None,
    depth: Annotated[int | None, typer.Option(min=0, help="Only jobs at this depth.")] = None,
    parent: Annotated[str | None, typer.Option("--parent", help="Only children of this job.")] = None,
    limit: LimitOption = 50,
    offset: OffsetOption = 0,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List jobs, newest first."""
    query = {"status": status.value if status else None, "depth": depth, "parent_job_id": parent}
    list_page(url, token, as_json, "/api/jobs", "jobs", _jobs_table, **query, limit=limit, offset=offset)


def _jobs_table(jobs: list[dict[str, Any]]) -> Table:
    # Columns that would be the same on every row are left out, so the task keeps some room.
    with_parent = any(job.get("parent_job_id") for job in jobs)
    with_agent = len({job.get("agent") for job in jobs}) > 1
    columns = ["JOB", "STATUS", "DEPTH", "WORKERS"]
    columns += ["PARENT"] if with_parent else []
    columns += ["AGENT"] if with_agent else []
    columns += ["CREATED", "ELAPSED"]
    table = plain_table(*columns)
    table.add_column("TASK", min_width=12)
    for job in jobs:
        row: list[str | Text] = [
            job["id"],
            status_text(job["status"]),
            str(job["depth"]),
            str(job["worker_count"]),
        ]
        row += [job.get("parent_job_id") or "-"] if with_parent else []
        row += [job.get("agent") or "-"] if with_agent else []
        row += [
            format_time(job.get("created_at")),
            format_duration(elapsed(job)) if job.get("started_at") else "-",
            shorten(job.get("task_description"), 60),
        ]
        table.add_row(*row)
    return table


def show_job(
    job_id: JobArg,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a job: its tree of descendants and every worker with status, exit, branch and result."""
    from orchestrator.cli.live import render_tree, summary_line
    from orchestrator.cli.tree import TreeFetcher

    with client(url, token) as api:
        snap = TreeFetcher(api, job_id, tail_logs=False).snapshot()
    workers = snap.all_workers()
    if as_json:
        descendants = [job for job in snap.walk() if job["id"] != job_id]
        print_json({"job": snap.root, "descendants": descendants, "workers": workers})
        return
    root = snap.root
    out = console()
    header = id_status(root)
    header.append(f"  depth {root['depth']}  agent {root.get('agent')}  workers {root['worker_count']}")
    out.print(header)
    out.print(Text(f"task: {root['task_description']}"), soft_wrap=True)
    times = f"created {format_time(root.get('created_at'))}"
    if root.get("started_at"):
        times += f"  started {format_time(root['started_at'])}"
    if root.get("finished_at"):
        times += f"  finished {format_time(root['finished_at'])}"
    if root.get("started_at"):
        times += f"  ({format_duration(elapsed(root))})"
    out.print(times, style="dim")
    for key in ("status_reason", "repository", "base_ref", "workspace_id", "parent_job_id"):
        if root.get(key):
            out.print(f"{key.replace('_', ' ')}: {root[key]}", style="dim")
    if root.get("agent_options"):
        options = shorten(json.dumps(root["agent_options"]), 200)
        out.print(Text(f"agent options: {options}", style="dim"), soft_wrap=True)
    out.print()
    out.print(render_tree(snap))
    out.print(summary_line(snap))
    if workers:
        out.print()
        out.print(workers_table(workers, WORKER_COLUMNS, 60))


WORKER_COLUMNS = ("WORKER", "JOB", "#", "STATUS", "EXIT", "ELAPSED", "BRANCH", "COMMIT", "RESULT")


def cancel(
    job_id: JobArg,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel a job: its workers are terminated and its descendants canceled."""
    fetch_and_show(
        url,
        token,
        as_json,
        lambda api: api.post(f"/api/jobs/{job_id}/cancel"),
        lambda job: console().print(id_status(job)),
    )


def events(
    job_id: JobArg,
    after: Annotated[int, typer.Option("--after", min=0, help="Only events with a larger id.")] = 0,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show a job's history: every state change, who made it and why."""
    collected: list[dict[str, Any]] = []
    with client(url, token) as api:
        while True:
            page = api.get(f"/api/jobs/{job_id}/events", after_id=after, limit=1000)
            batch = page.get("events") or []
            collected.extend(batch)
            if len(batch) < 1000:
                break
            after = int(batch[-1]["id"])
    if as_json:
        print_json({"job_id": job_id, "events": collected})
        return
    out = console()
    if not collected:
        out.print("No events.", style="dim")
        return
    table = plain_table("ID", "TIME", "KIND", "SUBJECT", "CHANGE", "ACTOR", "REASON", wrap=("REASON",))
    for event in collected:
        change = Text()
        if event.get("from_status") or event.get("to_status"):
            change.append_text(status_text(event.get("from_status") or "-"))
            change.append(" → ")
            change.append_text(status_text(event.get("to_status") or "-"))
        table.add_row(
            str(event["id"]),
            format_time(event.get("created_at")),
            event.get("kind", ""),
            event.get("worker_id") or event.get("job_id", ""),
            change,
            event.get("actor", ""),
            shorten(event.get("reason"), 80),
        )
    out.print(table)


def register(app: typer.Typer) -> None:
    app.command("submit")(submit)
    app.command("jobs")(list_jobs)
    app.command("job")(show_job)
    app.command("cancel")(cancel)
    app.command("events")(events)
