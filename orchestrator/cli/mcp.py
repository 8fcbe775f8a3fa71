"""`orchestrator mcp`: the delegation tools for one worker's agent, as a stdio MCP server."""

from __future__ import annotations

import typer


def mcp() -> None:
    """Serve the delegation tools (spawn_subjob, wait_for_jobs, get_job, ...) over stdio (MCP).

    Started by an agent CLI inside a worker; uses ORCHESTRATOR_URL, ORCHESTRATOR_TOKEN and
    ORCHESTRATOR_JOB_ID from the worker's environment. Same as `python -m orchestrator.mcp`.
    """
    from orchestrator.mcp.server import main

    main()


def register(app: typer.Typer) -> None:
    app.command("mcp")(mcp)
