"""The `orchestrator` console script: Typer app, command registration, and the error boundary.

`main()` runs the app in non-standalone mode so that every failure passes through one place:
usage mistakes exit 2, operational errors exit 1, each as one red `error:` line on stderr; an
unexpected exception never shows a traceback unless ORCHESTRATOR_DEBUG=1.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence

import typer

from orchestrator.cli import demo, gc, jobs, mcp, resources, results, server, session, workers
from orchestrator.cli.output import CliError, print_error

app = typer.Typer(
    name="orchestrator",
    help="Run many AI coding agents in parallel, as a tree of supervised jobs.\n\n"
    "Client commands talk to ORCHESTRATOR_URL with ORCHESTRATOR_TOKEN (or --url/--token, or "
    "`orchestrator login`); serve, engine, db, openapi, token and gc run on the server host.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

for _module in (jobs, workers, resources, results, session, server, gc, demo, mcp):
    _module.register(app)


def _debug() -> bool:
    return os.environ.get("ORCHESTRATOR_DEBUG", "").lower() in ("1", "true", "yes")


def _usage_hint(exc: BaseException) -> str:
    ctx = getattr(exc, "ctx", None)
    path = getattr(ctx, "command_path", None) if ctx is not None else None
    return f" (see '{path} --help')" if path else ""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    try:
        result = app(
            args=list(argv) if argv is not None else None, prog_name="orchestrator", standalone_mode=False
        )
    except CliError as exc:
        print_error(exc.message, exc.details)
        return exc.code
    except (typer.Exit, typer.Abort) as exc:
        return int(getattr(exc, "exit_code", 1))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `orchestrator jobs | head`: the reader went away; not an error worth a message.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence the flush at exit
        return 1
    except Exception as exc:
        # Click/Typer usage errors (the exception classes differ between Typer versions).
        if hasattr(exc, "exit_code") and hasattr(exc, "format_message"):
            message = str(exc.format_message())
            code = int(exc.exit_code)
            if message:
                print_error(message + (_usage_hint(exc) if code == 2 else ""))
            return code
        if _debug():
            import traceback

            traceback.print_exc()
        print_error(
            f"{type(exc).__name__}: {exc}"
            + ("" if _debug() else " (ORCHESTRATOR_DEBUG=1 shows the traceback)")
        )
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
