"""What the commands share: one request answered raw (--json) or drawn, and the tables of lists.

Tables are imported on first use (see output.py), so `orchestrator --help` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from orchestrator.cli.client import ApiClient, client
from orchestrator.cli.output import (
    console,
    elapsed,
    format_duration,
    print_json,
    result_summary,
    shorten,
    status_text,
)

if TYPE_CHECKING:
    from rich.table import Table
    from rich.text import Text


def fetch_and_show(
    url: str | None,
    token: str | None,
    as_json: bool,
    call: Callable[[ApiClient], Any],
    show: Callable[[Any], object],
) -> Any:
    """Every command's shape: one call to the API, its body printed raw for scripts or drawn by
    `show` for people; the body is returned for what the command does after (an exit status)."""
    with client(url, token) as api:
        body = call(api)
    if as_json:
        print_json(body)
    else:
        show(body)
    return body


def plain_table(*columns: str, wrap: Sequence[str] = ()) -> Table:
    """The borderless table of every listing; only the `wrap` columns may break their lines."""
    from rich.table import Table

    table = Table(box=None, header_style="bold", pad_edge=False)
    for column in columns:
        table.add_column(column, no_wrap=column not in wrap)
    return table


def list_page(
    url: str | None,
    token: str | None,
    as_json: bool,
    path: str,
    key: str,
    draw: Callable[[list[dict[str, Any]]], Table],
    **params: Any,
) -> None:
    """A list command: one page of the `{key: [...], total, offset}` listing at `path`, its items
    drawn as a table by `draw` (unless --json)."""
    fetch_and_show(
        url, token, as_json, lambda api: api.get(path, **params), lambda d: print_listing(d, key, draw)
    )


def print_listing(data: dict[str, Any], key: str, draw: Callable[[list[dict[str, Any]]], Table]) -> None:
    """A page of a `{key: [...], total, offset}` listing: its table, and a hint when more exist."""
    out = console()
    items = data[key]
    if not items:
        out.print(f"No {key} match.", style="dim")
        return
    out.print(draw(items))
    shown = len(items)
    if data.get("total", shown) > data.get("offset", 0) + shown:
        out.print(f"{shown} of {data['total']} shown; use --limit/--offset for more.", style="dim")


def _worker_cells(worker: dict[str, Any], width: int) -> dict[str, str | Text]:
    reason = worker.get("status_reason") if worker.get("status") in ("FAILED", "TERMINATED") else None
    return {
        "WORKER": worker["id"],
        "JOB": worker["job_id"],
        "#": str(worker.get("worker_index", "")),
        "DEPTH": str(worker.get("depth", "")),
        "STATUS": status_text(worker["status"]),
        "EXIT": "-" if worker.get("exit_code") is None else str(worker["exit_code"]),
        "PID": str(worker.get("pid") or "-"),
        "ELAPSED": format_duration(elapsed(worker)) if worker.get("started_at") else "-",
        "BRANCH": worker.get("branch") or "-",
        "COMMIT": (worker.get("commit") or "-")[:10],
        "RESULT": shorten(reason, width) if reason else result_summary(worker.get("result"), width) or "-",
    }


def workers_table(workers: list[dict[str, Any]], columns: Sequence[str], width: int) -> Table:
    """Workers as rows, in the given columns; RESULT is the failure reason, else the result's gist."""
    table = plain_table(*columns, wrap=("RESULT", "BRANCH"))
    for worker in workers:
        cells = _worker_cells(worker, width)
        table.add_row(*(cells[column] for column in columns))
    return table
