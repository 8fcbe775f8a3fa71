"""Console helpers shared by every command: one error style, status colours, times, raw JSON.

Only `rich.console` and `rich.text` are imported here (cheap); tables and trees are imported by
the commands that draw them, so `orchestrator --help` stays fast.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from rich.console import Console
from rich.text import Text

JOB_FINAL = frozenset({"COMPLETED", "FAILED", "CANCELED"})
WORKER_FINAL = frozenset({"COMPLETED", "FAILED", "TERMINATED"})

STATUS_STYLES: dict[str, str] = {
    "PENDING": "yellow",
    "IDLE": "dim",
    "RUNNING": "bold cyan",
    "PAUSED": "bold yellow",
    "COMPLETED": "green",
    "FAILED": "bold red",
    "CANCELED": "magenta",
    "TERMINATED": "red",
}


class CliError(Exception):
    """A failure the operator can act on: printed as one red line, never as a traceback.

    `details` are extra indented lines (the fields of a 422); `code` is the exit status
    (2 for usage mistakes, 1 for everything else); `transient` marks failures worth retrying
    while following a job (connection lost, timeout, 5xx).
    """

    def __init__(
        self, message: str, *, code: int = 1, details: list[str] | None = None, transient: bool = False
    ) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = details or []
        self.transient = transient


def _width() -> int | None:
    """Pipes and files get wide lines (no COLUMNS there), so tables are not cut at 80 columns."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return None
    return 200


@lru_cache(maxsize=1)
def console() -> Console:
    return Console(highlight=False, width=_width())


@lru_cache(maxsize=1)
def err_console() -> Console:
    return Console(stderr=True, highlight=False)


def print_error(message: str, details: list[str] | None = None) -> None:
    """`error: ...` in red on stderr; Text (not markup) so server-provided text is shown verbatim."""
    out = err_console()
    out.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
    for line in details or []:
        out.print(Text(f"  {line}", style="red"), soft_wrap=True)


def print_json(data: Any) -> None:
    """Raw JSON on stdout, no colours or wrapping, so scripts can parse it."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def status_text(status: str | None) -> Text:
    value = status or "?"
    return Text(value, style=STATUS_STYLES.get(value, ""))


def id_status(item: dict[str, Any]) -> Text:
    """A job's or worker's id in bold, then its status in its colour."""
    return Text.assemble((item["id"], "bold"), " ", status_text(item["status"]))


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def format_time(value: str | None) -> str:
    """Local wall-clock time; the date only when it is not today."""
    parsed = parse_time(value)
    if parsed is None:
        return "-"
    local = parsed.astimezone()
    if local.date() == datetime.now().astimezone().date():
        return local.strftime("%H:%M:%S")
    return local.strftime("%Y-%m-%d %H:%M")


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def elapsed(item: dict[str, Any], now: datetime | None = None) -> float | None:
    """Run time of a job or worker: started (else created) to finished (else now)."""
    start = parse_time(item.get("started_at")) or parse_time(item.get("created_at"))
    if start is None:
        return None
    end = parse_time(item.get("finished_at")) or now or datetime.now(UTC)
    return (end - start).total_seconds()


def shorten(text: str | None, width: int) -> str:
    if not text:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: max(1, width - 1)] + "…"


def result_summary(result: dict[str, Any] | None, width: int = 60) -> str:
    """The gist of a worker's result: a summary field if the agent gave one, else compact JSON."""
    if not result:
        return ""
    for key in ("summary", "result", "message", "text"):
        value = result.get(key)
        if isinstance(value, str) and value.strip():
            return shorten(value, width)
    return shorten(json.dumps(result, separators=(",", ":"), default=str), width)


def worker_cost(worker: dict[str, Any]) -> float:
    result = worker.get("result") or {}
    for key in ("cost_usd", "total_cost_usd"):
        value = result.get(key)
        if isinstance(value, int | float):
            return float(value)
    return 0.0
