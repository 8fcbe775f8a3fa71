"""Server-side commands: serve, engine, db upgrade, openapi, token.

These run on the server host and use its settings (environment and `.env`); their heavy imports
(uvicorn, SQLAlchemy, FastAPI) happen inside the command so the client commands stay fast.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from orchestrator.cli.output import CliError, console, err_console

if TYPE_CHECKING:
    from orchestrator.core.config import Settings

db_app = typer.Typer(help="Database schema.", no_args_is_help=True)


def serve(
    host: Annotated[str | None, typer.Option(help="Bind address (default: HOST or 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(min=1, max=65535, help="Port (default: PORT or 8000).")] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="API processes, each with an engine (default: WORKERS or 1).")
    ] = None,
    reload: Annotated[bool, typer.Option(help="Restart on code changes (development).")] = False,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    log_format: Annotated[
        str | None,
        typer.Option(help="text or json (one JSON object per line, with the request id on each)."),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Data directory (default: ORCHESTRATOR_DATA_DIR or ./.orchestrator).")
    ] = None,
) -> None:
    """Run the API and the engine (uvicorn on orchestrator.api.main:app)."""
    if log_format is not None:
        if log_format.lower() not in ("text", "json"):
            raise CliError(f"--log-format must be text or json, not {log_format!r}")
        os.environ["ORCHESTRATOR_LOG_FORMAT"] = log_format.lower()
    # Exported, not just passed to uvicorn: --workers/--reload child processes inherit the
    # environment. (Workers are handed the address of the socket the server really listens on.)
    if data_dir is not None:
        os.environ["ORCHESTRATOR_DATA_DIR"] = str(data_dir.resolve())
    if host is not None:
        os.environ["HOST"] = host
    if port is not None:
        os.environ["PORT"] = str(port)
    if workers is not None:
        os.environ["WORKERS"] = str(workers)

    from orchestrator.core.config import get_settings

    get_settings.cache_clear()
    settings = _settings()
    import uvicorn

    uvicorn.run(
        "orchestrator.api.main:app",
        host=settings.host,
        port=settings.port,
        workers=None if reload else settings.workers,
        reload=reload,
        log_level=log_level.lower(),
        # With a log format chosen, the app configures logging itself (request ids on every line).
        log_config=None if settings.orchestrator_log_format else uvicorn.config.LOGGING_CONFIG,
    )


def _settings() -> Settings:
    """The server settings, with a configuration mistake reported as lines, not a traceback."""
    from pydantic import ValidationError

    from orchestrator.core.config import get_settings

    try:
        return get_settings()
    except ValidationError as exc:
        problems = [f"{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" for e in exc.errors()]
        raise CliError("invalid configuration:", details=problems) from exc


def engine() -> None:
    """Run an engine without the API (other hosts sharing the database); stops on SIGINT/SIGTERM."""
    import asyncio

    settings = _settings()
    from orchestrator.api.main import StartupError, check_startup_settings

    try:
        check_startup_settings(settings)
    except StartupError as exc:
        raise CliError(str(exc)) from exc
    asyncio.run(_run_engine())


async def _run_engine() -> None:
    import asyncio
    import signal

    from orchestrator.agents.registry import AgentRegistry
    from orchestrator.bootstrap import prepare_database
    from orchestrator.core.logsafe import install_log_escaping
    from orchestrator.db.session import Database
    from orchestrator.engine.engine import Engine

    settings = _settings()
    install_log_escaping()
    database = Database.for_engine(settings)
    try:
        await prepare_database(database, settings)  # first: it makes the data dir private
        settings.signing_key()
        runner = Engine(settings, database, AgentRegistry.from_settings(settings))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await runner.start()
        console().print(
            f"Engine running on {database.engine.url.render_as_string(hide_password=True)}; Ctrl-C stops it."
        )
        try:
            await stop.wait()
        finally:
            try:
                await asyncio.wait_for(runner.stop(), timeout=20)
            except TimeoutError:
                import faulthandler

                faulthandler.dump_traceback(all_threads=True)  # what it was stuck on, for a bug report
                err_console().print("error: the engine did not stop within 20 s; exiting anyway")
        console().print("Engine stopped.")
    finally:
        await database.dispose()


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or upgrade the schema and apply the quotas (idempotent; the server does it at start)."""
    import asyncio

    url = asyncio.run(_upgrade())
    console().print(f"Database ready: {url}")


async def _upgrade() -> str:
    from orchestrator.bootstrap import prepare_database
    from orchestrator.db.session import Database

    settings = _settings()
    database = Database(settings)
    try:
        await prepare_database(database, settings)
        return database.engine.url.render_as_string(hide_password=True)
    except Exception as exc:
        if type(exc).__module__.startswith(("sqlalchemy", "asyncpg", "sqlite3", "alembic")) or isinstance(
            exc, OSError
        ):
            raise CliError(f"could not initialise the database: {' '.join(str(exc).split())[:300]}") from exc
        raise
    finally:
        await database.dispose()


def openapi(
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")
    ] = None,
) -> None:
    """Print the OpenAPI document (the committed openapi.json is this output)."""
    from orchestrator.api.main import export_openapi

    document = export_openapi()
    if output is None:
        sys.stdout.write(document)
        return
    output.write_text(document)
    console().print(f"Wrote {output}", style="dim")


def token(
    user: Annotated[str, typer.Option(help="Who the token names (sub).")] = "admin",
    scope: Annotated[
        list[str] | None,
        typer.Option("--scope", "-s", help="A scope to grant; repeatable (default: all six)."),
    ] = None,
    expires_minutes: Annotated[
        int | None, typer.Option(min=1, help="Lifetime (default: ACCESS_TOKEN_EXPIRE_MINUTES, 30).")
    ] = None,
    hint: Annotated[
        bool, typer.Option("--hint", help="Print how to get a token and use it, instead.")
    ] = False,
) -> None:
    """Print a signed token, made with this host's SECRET_KEY (or the key stored in the data dir)."""
    if hint:
        _print_hint()
        return
    from datetime import timedelta

    from orchestrator.core.auth import ALL_SCOPES, create_access_token

    scopes = scope or list(ALL_SCOPES)
    unknown = sorted(set(scopes) - set(ALL_SCOPES))
    if unknown:
        raise CliError(f"unknown scope(s): {', '.join(unknown)}; known: {', '.join(ALL_SCOPES)}", code=2)
    _settings()
    expires = timedelta(minutes=expires_minutes) if expires_minutes else None
    sys.stdout.write(create_access_token(user_id=user, scopes=scopes, expires_delta=expires) + "\n")


def _print_hint() -> None:
    """The paragraph `make run` prints before starting the server."""
    settings = _settings()
    url = settings.public_url
    program = _program()
    text = f"""
Parallel AI Orchestrator is starting on {url}
  API docs:  {url}/docs        dashboard: {url}/
  Every API call needs a bearer token. In another terminal (same directory):
    export ORCHESTRATOR_TOKEN=$({program} token)     # all scopes, {settings.access_token_expire_minutes} min
    export ORCHESTRATOR_URL={url}
    {program} submit "Say hello" --workers 2 --wait
    {program} jobs; {program} usage; {program} --help
    curl -H "Authorization: Bearer $ORCHESTRATOR_TOKEN" {url}/api/jobs
  Or try the whole thing at once: {program} demo
"""
    sys.stdout.write(text.lstrip("\n"))


def _program() -> str:
    """How the operator should call us: the bare name if it is on PATH, else the path used."""
    argv0 = Path(sys.argv[0])
    found = shutil.which("orchestrator")
    if argv0.name != "orchestrator" or (found and Path(found).resolve() == argv0.resolve()):
        return "orchestrator"
    try:
        return str(argv0.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(argv0.absolute())


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("engine")(engine)
    app.command("openapi")(openapi)
    app.command("token")(token)
    app.add_typer(db_app, name="db")
