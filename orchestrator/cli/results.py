"""Getting a job's result back: `result` (summary), `diff` (the change), `apply` (merge it in)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from orchestrator.cli.client import ApiClient, JobArg, JsonOption, TokenOption, UrlOption, client
from orchestrator.cli.common import fetch_and_show
from orchestrator.cli.output import CliError, console


def print_result_summary(data: dict[str, Any]) -> None:
    out = console()
    head = Text.assemble(
        ("Result ", "bold"), (data["branch"], "bold cyan"), f" at {str(data['commit'])[:12]}"
    )
    head.append(f" (base {str(data.get('base_commit') or '')[:12]}, {data['repository']})", style="dim")
    out.print(head)
    out.print(
        f"{data['files_changed']} file(s) changed, {data['insertions']} insertion(s)(+), "
        f"{data['deletions']} deletion(s)(-); {len(data['merged'])} branch(es) merged"
    )
    if data.get("status") == "failed":
        out.print(Text(f"Integration failed: {data.get('reason')}", style="red"))
    for conflict in data.get("conflicts") or []:
        how = conflict.get("resolution") or "unresolved"
        out.print(
            f"  conflict in {', '.join(conflict.get('files') or [])}: {conflict.get('branch')} "
            f"into {conflict.get('into')} — {how}"
            + (f" by {conflict['resolver']}" if conflict.get("resolver") else "")
        )
    if data.get("diff_stat"):
        out.print(data["diff_stat"], markup=False, highlight=False)
    out.print(f"Apply it with: orchestrator apply {data['job_id']}", style="dim")


def result(
    job_id: JobArg, url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """Show a job's result branch: what was merged, conflicts, and the diff stat."""
    fetch_and_show(
        url, token, as_json, lambda api: api.get(f"/api/jobs/{job_id}/result"), print_result_summary
    )


def show_final_result(api: ApiClient, job: dict[str, Any]) -> None:
    """After `submit --wait`: the result summary of a job that has a repository (if integrated)."""
    if not job.get("repository"):
        return
    try:
        data = api.get(f"/api/jobs/{job['id']}/result")
    except CliError:
        return  # not integrated (the job failed before): nothing to show
    print_result_summary(data)


def diff(
    job_id: JobArg,
    path: Annotated[str | None, typer.Argument(help="Only this file.", show_default=False)] = None,
    max_bytes: Annotated[
        int, typer.Option("--max-bytes", min=1, help="Cut the diff at this size.")
    ] = 1_000_000,
    color: Annotated[bool | None, typer.Option("--color/--no-color", help="Default: on a terminal.")] = None,
    pager: Annotated[bool, typer.Option("--pager/--no-pager", help="Page it on a terminal.")] = True,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Show the unified diff of a job's result against its base (coloured, paged on a terminal)."""
    params: dict[str, Any] = {"max_bytes": max_bytes}
    if path is not None:
        params["path"] = path
    with client(url, token) as api:
        text, headers = api.get_text(f"/api/jobs/{job_id}/diff", params)
    tty = sys.stdout.isatty()
    if color if color is not None else tty:
        text = colorize(text)
    if headers.get("x-diff-truncated") == "true":
        text += f"\n[diff cut at {max_bytes} bytes; use --max-bytes or a PATH]\n"
    if tty and pager:
        pager_cmd = os.environ.get("PAGER") or "less -R -F -X"
        try:
            subprocess.run(pager_cmd, shell=True, input=text.encode(), check=False)
            return
        except OSError:
            pass
    sys.stdout.write(text)


def colorize(text: str) -> str:
    """ANSI colours like git's: headers bold, hunks cyan, additions green, deletions red."""
    out = []
    for line in text.splitlines(keepends=True):
        if line.startswith(("diff --git", "index ", "+++ ", "--- ")):
            out.append(f"\x1b[1m{line.rstrip(chr(10))}\x1b[0m\n")
        elif line.startswith("@@"):
            out.append(f"\x1b[36m{line.rstrip(chr(10))}\x1b[0m\n")
        elif line.startswith("+"):
            out.append(f"\x1b[32m{line.rstrip(chr(10))}\x1b[0m\n")
        elif line.startswith("-"):
            out.append(f"\x1b[31m{line.rstrip(chr(10))}\x1b[0m\n")
        else:
            out.append(line)
    return "".join(out)


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)


def apply(
    job_id: JobArg,
    into: Annotated[
        str | None, typer.Option("--into", help="Branch to merge into (default: the checked-out one).")
    ] = None,
    repo: Annotated[
        str | None,
        typer.Option("--repo", help="Repository (default: the job's, else the current directory)."),
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
) -> None:
    """Merge a job's result into your branch (refuses a working tree with uncommitted changes)."""
    with client(url, token) as api:
        data = api.get(f"/api/jobs/{job_id}/result")
    where = Path(repo or (data["repository"] if Path(data["repository"]).is_dir() else ".")).resolve()
    if _git(where, "rev-parse", "--git-dir").returncode != 0:
        raise CliError(f"{where} is not a git repository; pass --repo")
    if _git(where, "cat-file", "-e", f"{data['commit']}^{{commit}}").returncode != 0:
        raise CliError(
            f"{where} does not have the result commit {data['commit']}; fetch {data['branch']} first"
        )
    dirty = _git(where, "status", "--porcelain", "--untracked-files=no").stdout.strip()
    if dirty:
        raise CliError(
            f"{where} has uncommitted changes; commit or stash them first (apply merges into a clean tree)",
            details=dirty.splitlines()[:10],
        )
    if _git(where, "rev-parse", "-q", "--verify", "MERGE_HEAD").returncode == 0:
        raise CliError(f"{where} has a merge in progress; finish or abort it first")
    if into is not None:
        current = _git(where, "symbolic-ref", "-q", "--short", "HEAD").stdout.strip()
        if current != into:
            switched = _git(where, "switch", into)
            if switched.returncode != 0:
                raise CliError(f"cannot switch to {into}: {switched.stderr.strip()}")
    branch = _git(where, "symbolic-ref", "-q", "--short", "HEAD").stdout.strip() or "HEAD"
    done = _git(
        where,
        "merge",
        "--no-ff",
        "--no-edit",
        "-m",
        f"Merge result of orchestrator job {job_id}",
        data["commit"],
    )
    if done.returncode != 0:
        unmerged = _git(where, "diff", "--name-only", "--diff-filter=U").stdout.split()
        if unmerged:
            raise CliError(
                f"merging {data['branch']} into {branch} conflicts; resolve and commit, "
                "or `git merge --abort`",
                details=unmerged,
            )
        raise CliError(f"git merge failed: {done.stderr.strip() or done.stdout.strip()}")
    head = _git(where, "rev-parse", "HEAD").stdout.strip()
    console().print(Text.assemble("Merged ", (data["branch"], "bold"), f" into {branch} ({head[:12]})"))


def merge_subjob(
    job_id: JobArg, url: UrlOption = None, token: TokenOption = None, as_json: JsonOption = False
) -> None:
    """(For a worker, with its token) merge a finished sub-job's result into your worktree."""
    from orchestrator.mcp.server import merge_summary

    body = fetch_and_show(
        url,
        token,
        as_json,
        lambda api: api.post(f"/api/jobs/{job_id}/merge"),
        lambda body: console().print(merge_summary(body), markup=False, highlight=False),
    )
    if body["status"] == "conflict":
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("merge-subjob")(merge_subjob)
    app.command("result")(result)
    app.command("diff")(diff)
    app.command("apply")(apply)
