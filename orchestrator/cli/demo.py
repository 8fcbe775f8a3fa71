"""`orchestrator demo`: the whole product in one command, on a fresh install, offline.

Starts a private server (own port, own data dir and SQLite file, run from that dir so a local
`.env` cannot leak in), submits a job whose simulated workers delegate four levels deep, shows
the live tree, then says where to look next.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.text import Text

from orchestrator.cli.client import ApiClient, Target
from orchestrator.cli.output import JOB_FINAL, CliError, console

if TYPE_CHECKING:
    from orchestrator.cli.tree import Snapshot

STARTUP_TIMEOUT = 60.0


def demo_options(levels: int, seconds: float) -> dict[str, Any]:
    """Agent options for a tree `levels` deep: two workers at the top and the next level, then one."""
    names = [
        "Implement a feature slice of the app",
        "Write the tests for that slice",
        "Review the tests and fix what they find",
        "Update the docs",
        "Polish",
    ]
    options: dict[str, Any] = {"duration_seconds": seconds, "progress_interval_seconds": 0.25}
    for level in range(levels - 1, 0, -1):
        subtask = {
            "task_description": names[(level - 1) % len(names)],
            "worker_count": 2 if level == 1 else 1,
            "agent_options": options,
        }
        options = {"duration_seconds": seconds, "progress_interval_seconds": 0.25, "subtasks": [subtask]}
    return options


def _run_demo_job(api: ApiClient, levels: int, seconds: float) -> tuple[str, Snapshot]:
    """Submit the demo's job tree and watch it live until it ends (Ctrl-C cancels it)."""
    out = console()
    job = api.post(
        "/api/jobs/submit",
        {
            "task_description": "Build a small TODO web app (demo)",
            "worker_count": 2,
            "depth": 0,
            "agent": "simulated",
            "agent_options": demo_options(levels, seconds),
        },
    )
    job_id: str = job["id"]
    out.print(
        Text.assemble(
            "Submitted ",
            (job_id, "bold"),
            f": 2 simulated workers that delegate {levels - 1} level(s) down, competing for the "
            "per-depth quotas.\n",
        )
    )
    from orchestrator.cli.live import watch

    try:
        return job_id, watch(api, job_id)
    except KeyboardInterrupt:
        out.print("\nInterrupted: canceling the demo job.", style="yellow")
        _cancel_and_settle(api, job_id)
        raise typer.Exit(130) from None


def _print_finished(job_id: str, snap: Snapshot) -> None:
    jobs = list(snap.walk())
    workers = snap.all_workers()
    depth = max(int(j.get("depth", 0)) for j in jobs)
    console().print()
    console().print(
        Text.assemble(
            "Demo finished: ",
            (job_id, "bold"),
            " ",
            (snap.root["status"], "green" if snap.root["status"] == "COMPLETED" else "bold red"),
            f" — {len(jobs)} jobs and {len(workers)} workers over {depth + 1} levels.",
        )
    )


def demo(
    keep: Annotated[
        bool, typer.Option("--keep", help="Leave the server running afterwards to explore.")
    ] = False,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Data directory (default: a new temporary one).")
    ] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port (default: a free one).")] = None,
    levels: Annotated[int, typer.Option(min=1, max=6, help="Depth of the job tree.")] = 4,
    seconds: Annotated[float, typer.Option(min=0, help="How long each simulated worker works.")] = 1.0,
) -> None:
    """Start a private server, run a job tree of simulated agents live, and show where to go next."""
    temporary = data_dir is None
    root = Path(tempfile.mkdtemp(prefix="orchestrator-demo-")) if data_dir is None else data_dir.resolve()
    root.mkdir(parents=True, exist_ok=True)
    port = port or _free_port()
    url = f"http://127.0.0.1:{port}"
    env = _server_env(root, url)
    out = console()
    out.print(
        Text.assemble(("Parallel AI Orchestrator demo", "bold"), f" — starting a private server on {url}")
    )
    out.print(f"data dir {root}, server log {root / 'server.log'}", style="dim")
    server = _start_server(root, port, env)
    leave_running = False
    try:
        _wait_healthy(server, url, root)
        token = _token(root, env)
        with ApiClient(Target(url=url, token=token)) as api:
            job_id, snap = _run_demo_job(api, levels, seconds)
        _print_finished(job_id, snap)
        leave_running = keep
        _where_next(url, token, job_id, snap.all_workers(), root, server.pid if keep else None)
        if snap.root["status"] != "COMPLETED":
            raise typer.Exit(1)
    finally:
        if not leave_running:
            _stop_server(server)
            if temporary:
                shutil.rmtree(root, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _server_env(root: Path, url: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ORCHESTRATOR_") and k not in ("DATABASE_URL", "SECRET_KEY", "ENVIRONMENT")
    }
    env.update(
        {
            "ORCHESTRATOR_DATA_DIR": str(root),
            "DATABASE_URL": f"sqlite:///{root / 'orchestrator.db'}",
            "ORCHESTRATOR_PUBLIC_URL": url,
            "ORCHESTRATOR_TERMINATE_GRACE_SECONDS": "2",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _start_server(root: Path, port: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "orchestrator.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--log-level", "warning"]
    with (root / "server.log").open("ab") as log:
        # Its own session: Ctrl-C reaches the demo, which then shuts the server down in order.
        return subprocess.Popen(
            argv, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_healthy(server: subprocess.Popen[bytes], url: str, root: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise CliError(f"the demo server exited with code {server.returncode}", details=_log_tail(root))
        try:
            with ApiClient(Target(url=url, token=None), timeout=2.0) as probe:
                probe.get("/health")
            return
        except CliError:
            time.sleep(0.1)
    raise CliError(
        f"the demo server did not answer on {url} within {STARTUP_TIMEOUT:.0f}s", details=_log_tail(root)
    )


def _log_tail(root: Path, lines: int = 15) -> list[str]:
    try:
        return (root / "server.log").read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


def _token(root: Path, env: dict[str, str]) -> str:
    """Ask the CLI itself, in the server's directory and environment, so the keys agree."""
    argv = [sys.executable, "-m", "orchestrator.cli", "token", "--user", "demo"]
    done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise CliError("could not make a token for the demo server", details=done.stderr.splitlines()[-5:])
    return done.stdout.strip()


def _cancel_and_settle(api: ApiClient, job_id: str, timeout: float = 15.0) -> None:
    """Cancel so no worker outlives the demo server, and wait until the tree is final."""
    with contextlib.suppress(CliError):
        api.post(f"/api/jobs/{job_id}/cancel")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if api.get(f"/api/jobs/{job_id}").get("status") in JOB_FINAL:
                time.sleep(0.5)  # let the cascade reach the last workers
                return
        except CliError:
            return
        time.sleep(0.3)


def _stop_server(server: subprocess.Popen[bytes]) -> None:
    if server.poll() is not None:
        return
    server.send_signal(signal.SIGTERM)
    try:
        server.wait(20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def _where_next(
    url: str, token: str, job_id: str, workers: list[dict[str, Any]], root: Path, pid: int | None
) -> None:
    out = console()
    worker = workers[-1]["id"] if workers else "<worker-id>"
    out.print()
    out.print(Text("Where to look next", style="bold"))
    if pid is not None:
        out.print(
            f"  The demo server keeps running on {url} (pid {pid}, data in {root}); stop it: kill {pid}"
        )
        out.print(f"  API docs    {url}/docs")
        out.print(f"  Dashboard   {url}/")
        out.print("  Use it from this shell:")
        out.print(f"    export ORCHESTRATOR_URL={url}")
        out.print(f"    export ORCHESTRATOR_TOKEN={token}")
        out.print(f"    orchestrator job {job_id}       # the tree, workers and results")
        out.print(f"    orchestrator events {job_id}    # every state change, who and why")
        out.print(f"    orchestrator logs {worker}      # what a worker printed")
        out.print("    orchestrator usage              # slots per depth")
    else:
        out.print("  The demo server has been stopped. To explore the same run: orchestrator demo --keep")
    out.print("  Your own server:   make run  (or: orchestrator serve); docs at /docs, dashboard at /")
    out.print(
        "  A token for it:    export ORCHESTRATOR_TOKEN=$(orchestrator token)  (in the server's directory)"
    )
    out.print('  Then:              orchestrator submit "your task" --workers 3 --wait')


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
