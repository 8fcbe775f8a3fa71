"""Resource commands: per-depth quotas, and slot usage drawn as bars."""

from __future__ import annotations

from typing import Any

import typer
from rich.text import Text

from orchestrator.cli.client import JsonOption, TokenOption, UrlOption
from orchestrator.cli.common import fetch_and_show, plain_table
from orchestrator.cli.output import console


def quotas(url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Show how many workers may run at each depth."""
    fetch_and_show(url, token, as_json, lambda api: api.get("/api/resources/quotas"), _print_quotas)


def _print_quotas(data: dict[str, Any]) -> None:
    table = plain_table()
    table.add_column("DEPTH", justify="right")
    table.add_column("MAX WORKERS", justify="right")
    for quota in data["quotas"]:
        table.add_row(str(quota["depth"]), str(quota["max_workers"]))
    console().print(table)


def usage(url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False) -> None:
    """Show slots allocated and available per depth, as bars."""
    fetch_and_show(url, token, as_json, lambda api: api.get("/api/resources/usage"), _print_usage)


def _print_usage(data: dict[str, Any]) -> None:
    from rich.progress_bar import ProgressBar

    table = plain_table()
    table.add_column("DEPTH", justify="right")
    table.add_column("USAGE", width=32)
    for column in ("ALLOCATED", "AVAILABLE", "MAX"):
        table.add_column(column, justify="right")
    total_allocated = total_max = 0
    for row in data["usage"]:
        allocated = int(row["allocated"])
        maximum = int(row.get("max_workers", allocated + int(row["available"])))
        total_allocated += allocated
        total_max += maximum
        full = maximum > 0 and allocated >= maximum
        bar = ProgressBar(
            total=max(maximum, 1),
            completed=allocated,
            width=30,
            complete_style="red" if full else "cyan",
            finished_style="red",
        )
        table.add_row(str(row["depth"]), bar, str(allocated), str(row["available"]), str(maximum))
    out = console()
    out.print(table)
    out.print(Text(f"{total_allocated} of {total_max} slots in use", style="dim"))


def register(app: typer.Typer) -> None:
    app.command("quotas")(quotas)
    app.command("usage")(usage)
