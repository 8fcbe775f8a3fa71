"""Worker commands: list, logs (optionally followed), and pause / resume / terminate."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.text import Text

from orchestrator.cli.client import (
    ApiClient,
    JsonOption,
    LimitOption,
    OffsetOption,
    TokenOption,
    UrlOption,
    WorkerArg,
    client,
)
from orchestrator.cli.common import fetch_and_show, list_page, workers_table
from orchestrator.cli.output import (
    CliError,
    console,
    elapsed,
    format_duration,
    format_time,
    id_status,
    print_json,
)
from orchestrator.core.states import WorkerStatus

if TYPE_CHECKING:
    from rich.table import Table

FOLLOW_INTERVAL = 0.5
WORKER_COLUMNS = ("WORKER", "JOB", "#", "DEPTH", "STATUS", "EXIT", "PID", "ELAPSED", "BRANCH", "RESULT")


def list_workers(
    status: Annotated[
        WorkerStatus | None, typer.Option(case_sensitive=False, help="Only workers in this status.")
    ] = None,
    job: Annotated[str | None, typer.Option("--job", help="Only workers of this job.")] = None,
    workspace: Annotated[
        str | None, typer.Option("--workspace", help="Only workers of this workspace.")
    ] = None,
    limit: LimitOption = 50,
    offset: OffsetOption = 0,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """List workers, newest first."""
    query = {"status": status.value if status else None, "job_id": job, "workspace_id": workspace}
    path = "/api/supervisor/workers"
    list_page(url, token, as_json, path, "workers", _workers_table, **query, limit=limit, offset=offset)


def _workers_table(workers: list[dict[str, Any]]) -> Table:
    return workers_table(workers, WORKER_COLUMNS, 50)


def logs(
    worker_id: WorkerArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the worker ends.")
    ] = False,
    offset: Annotated[int, typer.Option(min=0, help="First line number to print.")] = 0,
    timestamps: Annotated[
        bool, typer.Option("--timestamps", "-t", help="Prefix each line with its time.")
    ] = False,
    url: UrlOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print a worker's output (stdout and stderr, as captured); -f follows it live."""
    with client(url, token) as api:
        try:
            _print_logs(api, worker_id, offset=offset, follow=follow, timestamps=timestamps, as_json=as_json)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


def _print_logs(
    api: ApiClient, worker_id: str, *, offset: int, follow: bool, timestamps: bool, as_json: bool
) -> None:
    """Page through the log from `offset`; when following, poll from `next_offset` until complete.

    Lines go to stdout verbatim (no Rich markup), so the output can be piped.
    """
    path = f"/api/supervisor/workers/{worker_id}/logs"
    collected: list[dict[str, Any]] = []
    while True:
        data = api.get(path, offset=offset, limit=1000)
        lines = data.get("lines") or []
        if as_json and not follow:
            collected.extend(lines)
        else:
            for line in lines:
                if as_json:
                    sys.stdout.write(_json_line(worker_id, line))
                elif timestamps:
                    sys.stdout.write(f"{format_time(line.get('created_at'))} {line.get('text', '')}\n")
                else:
                    sys.stdout.write(f"{line.get('text', '')}\n")
            sys.stdout.flush()
        offset = int(data.get("next_offset", offset))
        if lines and len(lines) >= 1000:
            continue  # more is already there
        if not follow or data.get("complete"):
            break
        time.sleep(FOLLOW_INTERVAL)
    if as_json and not follow:
        print_json(
            {
                "worker_id": worker_id,
                "next_offset": offset,
                "lines": collected,
                "complete": data.get("complete"),
            }
        )


def _json_line(worker_id: str, line: dict[str, Any]) -> str:
    import json

    return json.dumps({"worker_id": worker_id, **line}) + "\n"


def _control(action: str, worker_id: str, url: str | None, token: str | None, as_json: bool) -> None:
    def show(worker: Any) -> None:
        if not isinstance(worker, dict) or "status" not in worker:
            raise CliError(f"unexpected answer to {action}: {worker!r}")
        console().print(id_status(worker))

    fetch_and_show(
        url, token, as_json, lambda api: api.post(f"/api/supervisor/workers/{worker_id}/{action}"), show
    )


def _control_command(action: str, doc: str) -> Callable[..., None]:
    """pause / resume / terminate: one command each, the same but for the action."""

    def command(
        worker_id: WorkerArg, url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False
    ) -> None:
        _control(action, worker_id, url, token, as_json)

    command.__doc__ = doc
    return command


pause = _control_command("pause", "Pause a running worker (SIGSTOP to its process group); it keeps its slot.")
resume = _control_command("resume", "Resume a paused worker (SIGCONT).")
terminate = _control_command(
    "terminate", "Terminate a worker (SIGTERM, then SIGKILL after the grace period); its job will fail."
)


def show_worker(
    worker_id: WorkerArg, url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """Show one worker in full: process, branch, commit, diff stat and result."""
    fetch_and_show(
        url, token, as_json, lambda api: api.get(f"/api/supervisor/workers/{worker_id}"), _print_worker
    )


def _print_worker(worker: dict[str, Any]) -> None:
    out = console()
    out.print(id_status(worker))
    for key in (
        "job_id",
        "worker_index",
        "depth",
        "agent",
        "workspace_id",
        "host",
        "pid",
        "exit_code",
        "status_reason",
        "branch",
        "commit",
    ):
        if worker.get(key) is not None:
            out.print(Text(f"{key.replace('_', ' ')}: {worker[key]}"), soft_wrap=True)
    out.print(f"created {format_time(worker.get('created_at'))}", style="dim")
    if worker.get("started_at"):
        out.print(f"ran {format_duration(elapsed(worker))}", style="dim")
    if worker.get("diff_stat"):
        out.print(Text(f"diff:\n{worker['diff_stat']}"))
    if worker.get("result"):
        import json

        out.print(Text(f"result: {json.dumps(worker['result'], indent=2, default=str)}"))


def register(app: typer.Typer) -> None:
    app.command("workers")(list_workers)
    app.command("worker")(show_worker)
    app.command("logs")(logs)
    app.command("pause")(pause)
    app.command("resume")(resume)
    app.command("terminate")(terminate)
