"""`login` / `logout`: remember the server URL and token so commands need neither flag nor env."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from orchestrator.cli.client import ApiClient, Target, config_path, load_config, save_config
from orchestrator.cli.output import CliError, console, err_console


def login(
    url: Annotated[
        str, typer.Option("--url", envvar="ORCHESTRATOR_URL", help="Server URL.", show_default=True)
    ] = "http://127.0.0.1:8000",
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar="ORCHESTRATOR_TOKEN",
            help="Bearer token (asked for if omitted).",
            show_default=False,
        ),
    ] = None,
    check: Annotated[bool, typer.Option(help="Verify the server and the token before saving.")] = True,
) -> None:
    """Save the server URL and token to ~/.config/orchestrator/config.json (mode 0600)."""
    if not token:
        token = typer.prompt("Token", hide_input=True).strip()
    if not token:
        raise CliError("an empty token cannot be saved", code=2)
    url = url.rstrip("/")
    if check:
        with ApiClient(Target(url=url, token=token)) as api:
            try:
                api.get("/api/jobs", limit=1)
            except CliError as exc:
                if "(403)" not in exc.message:
                    raise
                # Valid token, narrower scopes: worth saving, worth saying.
                err_console().print(Text(f"warning: {exc.message}", style="yellow"), soft_wrap=True)
    data = load_config()
    data.update({"url": url, "token": token})
    path = save_config(data)
    console().print(f"Saved {url} and the token to {path} (mode 0600).")


def logout() -> None:
    """Forget the saved token (the URL is kept)."""
    path = config_path()
    data = load_config()
    if "token" not in data:
        console().print("No saved token.", style="dim")
        return
    del data["token"]
    save_config(data)
    console().print(f"Removed the token from {path}.")


def register(app: typer.Typer) -> None:
    app.command("login")(login)
    app.command("logout")(logout)
