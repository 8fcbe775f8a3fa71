"""Delegation tools for a worker's agent: spawn sub-jobs, wait for them, read their results.

One server per worker, over stdio, started by the agent CLI (`--mcp-config`). It talks HTTP to the
orchestrator with the worker's delegated token (ORCHESTRATOR_URL, ORCHESTRATOR_TOKEN,
ORCHESTRATOR_JOB_ID, ORCHESTRATOR_DEPTH), so the server enforces depth, quotas and budgets; a
refusal comes back as a tool error whose text says what happened and what to do, never a crash.
Results are plain text (structured_output=False): that is what agents read best.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from contextvars import ContextVar
from typing import Any, cast

import httpx
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from orchestrator.core.unix_http import SOCKET_ENV

FINAL = {"COMPLETED", "FAILED", "CANCELED"}
POLL_SECONDS = 0.5  # a job whose events stream cannot be followed: its status read this often
STREAM_POLL_SECONDS = 5.0  # followed jobs: their status read again at least this often anyway
MAX_MESSAGE_CHARS = 2000

server = MCPServer(
    "orchestrator",
    instructions=(
        "Delegate parts of your task to sub-jobs run by other agents in parallel: spawn_subjob, then "
        "wait_for_jobs and get_job to read their results (final message, git branch, diff stat, cost). "
        "Sub-jobs work on their own git branches, started from yours; merge_subjob brings a finished "
        "sub-job's work into your worktree."
    ),
)


class Api:
    """The orchestrator's HTTP API as one worker sees it (its delegated token, its job)."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        job_id: str | None = None,
        depth: int | None = None,
        socket_path: str | None = None,
    ) -> None:
        # With `uvicorn --uds`, the URL is http://localhost and the socket says where to connect.
        self.socket_path = socket_path if url is not None else os.environ.get(SOCKET_ENV) or None
        self.url = (url if url is not None else os.environ.get("ORCHESTRATOR_URL", "")).rstrip("/")
        self.token = token if token is not None else os.environ.get("ORCHESTRATOR_TOKEN", "")
        self.job_id = job_id if job_id is not None else os.environ.get("ORCHESTRATOR_JOB_ID", "")
        self._depth = depth if depth is not None or url is not None else _env_int("ORCHESTRATOR_DEPTH")
        self._client: httpx.AsyncClient | None = None

    async def depth(self) -> int:
        """The worker's job depth (from the environment, or asked of the API once)."""
        if self._depth is None:
            self._depth = int((await self.call("GET", f"/api/jobs/{self.job_id}"))["depth"])
        return self._depth

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def client(self) -> httpx.AsyncClient:
        if not self.url or not self.token or not self.job_id:
            raise ToolError(
                "The orchestrator tools are not configured for this process (ORCHESTRATOR_URL, "
                "ORCHESTRATOR_TOKEN and ORCHESTRATOR_JOB_ID must be set); delegation is unavailable."
            )
        if self._client is None:
            transport = httpx.AsyncHTTPTransport(uds=self.socket_path) if self.socket_path else None
            self._client = httpx.AsyncClient(
                base_url=self.url,
                headers={"Authorization": f"Bearer {self.token}"},
                timeout=30.0,
                transport=transport,
            )
        return self._client

    async def follow_until_end(self, job_id: str, ended: asyncio.Event) -> bool:
        """Follow the job's events stream until it says the job's tree has ended (`end`) or the
        stream ends, then set `ended`. False if the stream could not be opened."""
        path = f"/api/jobs/{job_id}/events"
        try:
            async with self.client().stream(
                "GET",
                path,
                params={"follow": "true"},
                headers={"Accept": "text/event-stream"},
                timeout=httpx.Timeout(30.0, read=None),
            ) as response:
                if response.status_code >= 400:
                    return False
                async for line in response.aiter_lines():
                    if line == "event: end":
                        break
        except httpx.HTTPError:
            return False
        finally:
            ended.set()
        return True

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = await self.client().request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ToolError(f"Cannot reach the orchestrator at {self.url}: {exc}. Try again later.") from exc
        if response.status_code < 400:
            return response.json()
        raise ToolError(explain(response.status_code, _detail(response)))


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        return response.text[:500]
    if isinstance(detail, list):  # validation errors
        return "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', [])[1:])}: {item.get('msg')}"
            if isinstance(item, dict)
            else str(item)
            for item in detail
        )
    return str(detail)


# What a refusal's detail mentions, or else its HTTP status, says what happened and what to do.
_REFUSALS_BY_WORD = (
    (
        ("budget", "max_cost_usd"),
        "Budget exhausted",
        "Do the remaining work yourself, or ask for less (a smaller max_cost_usd).",
    ),
    (
        ("quota", "worker_count"),
        "Quota exhausted",
        "Use fewer workers (a smaller worker_count), or wait for running sub-jobs to finish.",
    ),
    (
        ("depth",),
        "Depth limit reached",
        "Sub-jobs cannot delegate further at this depth: do the work yourself.",
    ),
)
_REFUSALS_BY_STATUS = {
    401: ("Token refused", "Your delegated token works only while your worker runs."),
    403: ("Not allowed", "You may act only on your own job's sub-jobs."),
    404: ("Not found", "Check the id (list_subjobs shows your sub-jobs)."),
    422: ("Invalid arguments", "Fix the arguments and call the tool again."),
}


def explain(status: int, detail: str) -> str:
    """A refusal in words an agent can act on."""
    lowered = detail.lower()
    kind, advice = next(
        ((kind, advice) for words, kind, advice in _REFUSALS_BY_WORD if any(w in lowered for w in words)),
        _REFUSALS_BY_STATUS.get(status, (f"Refused (HTTP {status})", "")),
    )
    return f"{kind}: {detail}" + (f" {advice}" if advice else "")


def _env_int(name: str) -> int:
    try:
        return int(os.environ.get(name, "0") or 0)
    except ValueError:
        return 0


# Over stdio the process serves one worker, configured by its environment. Over HTTP
# (orchestrator.mcp.http, inside the API server) each request sets the worker it comes from.
current_api: ContextVar[Api | None] = ContextVar("orchestrator_mcp_api", default=None)
_process_api: Api | None = None


class _CurrentApi:
    def __getattr__(self, name: str) -> Any:
        global _process_api
        chosen = current_api.get()
        if chosen is None:
            if _process_api is None:
                _process_api = Api()
            chosen = _process_api
        return getattr(chosen, name)


api = cast(Api, _CurrentApi())


def _money(value: Any) -> str:
    return f"${float(value):.4f}" if isinstance(value, int | float) else "$0"


def _clip(text: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more characters]"


async def describe(job_id: str) -> str:
    job = await api.call("GET", f"/api/jobs/{job_id}")
    workers = (await api.call("GET", "/api/supervisor/workers", params={"job_id": job_id, "limit": 1000}))[
        "workers"
    ]
    usage = await api.call("GET", f"/api/jobs/{job_id}/usage")
    lines = [
        f"Job {job['id']}: {job['status']}"
        + (f" ({job['status_reason']})" if job.get("status_reason") else ""),
        f"  task: {_clip(job['task_description'], 300)}",
        f"  agent {job['agent']}, depth {job['depth']}, {job['worker_count']} worker(s)",
        f"  cost of its whole subtree: {_money(usage['cost_usd'])} "
        f"(tokens in {usage['input_tokens']}, out {usage['output_tokens']}, {usage['jobs']} job(s))"
        + (
            f"; budget {_money(usage['max_cost_usd'])}, remaining {_money(usage['remaining_usd'])}"
            if usage.get("max_cost_usd") is not None
            else ""
        ),
    ]
    for worker in sorted(workers, key=lambda w: w["worker_index"]):
        result = worker.get("result") or {}
        own: dict[str, Any] = next((w for w in usage["workers"] if w["worker_id"] == worker["id"]), {})
        lines.append(
            f"  worker {worker['id']}: {worker['status']}"
            + (f" ({worker['status_reason']})" if worker.get("status_reason") else "")
            + f", cost {_money(own.get('cost_usd', 0))}"
        )
        if worker.get("branch"):
            lines.append(
                f"    branch {worker['branch']}"
                + (f" at commit {worker['commit'][:12]}" if worker.get("commit") else "")
            )
        if worker.get("diff_stat"):
            lines.append("    diff: " + worker["diff_stat"].strip().replace("\n", "\n          "))
        message = result.get("result")
        if isinstance(message, str) and message.strip():
            lines.append("    final message: " + _clip(message.strip()).replace("\n", "\n      "))
    return "\n".join(lines)


async def _wait(job_ids: list[str], timeout_seconds: float) -> tuple[dict[str, str], list[str]]:
    """Wait for the jobs to end: each pending job's events stream says when its tree has ended,
    and its status is then read again (also every STREAM_POLL_SECONDS, or every POLL_SECONDS for
    a job whose stream could not be opened)."""
    deadline = time.monotonic() + max(0.0, timeout_seconds)
    statuses: dict[str, str] = {}
    ended = asyncio.Event()
    followers: dict[str, asyncio.Task[bool]] = {}
    try:
        while True:
            ended.clear()
            for job_id in job_ids:
                if statuses.get(job_id) not in FINAL:
                    statuses[job_id] = (await api.call("GET", f"/api/jobs/{job_id}"))["status"]
            pending = [j for j in job_ids if statuses[j] not in FINAL]
            remaining = deadline - time.monotonic()
            if not pending or remaining <= 0:
                return statuses, pending
            for job_id in pending:
                follower = followers.get(job_id)
                if follower is None or (follower.done() and follower.result()):  # ended: follow again
                    followers[job_id] = asyncio.create_task(api.follow_until_end(job_id, ended))
            unfollowed = any(followers[j].done() and not followers[j].result() for j in pending)
            poll = POLL_SECONDS if unfollowed else STREAM_POLL_SECONDS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), timeout=min(poll, remaining))
    finally:
        for follower in followers.values():
            follower.cancel()
        await asyncio.gather(*followers.values(), return_exceptions=True)


@server.tool(structured_output=False)
async def spawn_subjob(
    task_description: str,
    worker_count: int = 1,
    agent: str | None = None,
    wait: bool = False,
    max_cost_usd: float | None = None,
    agent_options: dict[str, Any] | None = None,
    timeout_seconds: float = 3600,
) -> str:
    """Start a sub-job: `worker_count` agents work on `task_description` in parallel, each on its own
    git branch started from yours. `agent` is an agent profile (default: your own). With wait=True,
    block until it ends (at most `timeout_seconds`) and return its results; otherwise return its id
    at once (then use wait_for_jobs / get_job). `max_cost_usd` reserves that much of your budget."""
    client_agent = agent
    if client_agent is None:
        client_agent = (await api.call("GET", f"/api/jobs/{api.job_id}"))["agent"]
    body: dict[str, Any] = {
        "task_description": task_description,
        "worker_count": worker_count,
        "depth": await api.depth() + 1,
        "parent_job_id": api.job_id,
        "agent": client_agent,
    }
    if max_cost_usd is not None:
        body["max_cost_usd"] = max_cost_usd
    if agent_options:
        body["agent_options"] = agent_options
    job = await api.call("POST", "/api/jobs/submit", json=body)
    if not wait:
        return (
            f"Submitted sub-job {job['id']} ({worker_count} worker(s), agent {job['agent']}, depth "
            f"{job['depth']}). It runs in parallel; call wait_for_jobs(['{job['id']}']) to collect "
            "its result."
        )
    _, pending = await _wait([job["id"]], timeout_seconds)
    text = await describe(job["id"])
    if pending:
        text = f"Still running after {timeout_seconds:g}s:\n{text}"
    return text


@server.tool(structured_output=False)
async def wait_for_jobs(job_ids: list[str], timeout_seconds: float = 600) -> str:
    """Wait until all the given sub-jobs have ended (or `timeout_seconds` passed); return their results."""
    if not job_ids:
        raise ToolError("Invalid arguments: job_ids is empty; pass the ids spawn_subjob returned.")
    _, pending = await _wait(list(job_ids), timeout_seconds)
    parts = [await describe(job_id) for job_id in job_ids]
    head = (
        f"Timed out after {timeout_seconds:g}s; still running: {', '.join(pending)}"
        if pending
        else f"All {len(job_ids)} job(s) ended."
    )
    return head + "\n\n" + "\n\n".join(parts)


@server.tool(structured_output=False)
async def get_job(job_id: str) -> str:
    """Status of a sub-job and each worker's result: final message, branch, diff stat, cost."""
    return await describe(job_id)


@server.tool(structured_output=False)
async def list_subjobs() -> str:
    """Your job's direct sub-jobs with their status."""
    body = await api.call("GET", "/api/jobs", params={"parent_job_id": api.job_id, "limit": 1000})
    if not body["jobs"]:
        return f"Job {api.job_id} has no sub-jobs."
    return "\n".join(
        f"{job['id']}: {job['status']}, {job['worker_count']} worker(s), agent {job['agent']}: "
        f"{_clip(job['task_description'], 120)}"
        for job in body["jobs"]
    )


@server.tool(structured_output=False)
async def cancel_subjob(job_id: str) -> str:
    """Cancel one of your sub-jobs and everything under it (its workers are stopped)."""
    job = await api.call("POST", f"/api/jobs/{job_id}/cancel")
    return f"Job {job['id']} is {job['status']}."


@server.tool(structured_output=False)
async def read_worker_log(worker_id: str, offset: int = 0, limit: int = 200) -> str:
    """Output lines of a sub-job's worker, from line `offset` (get_job lists worker ids)."""
    body = await api.call(
        "GET",
        f"/api/supervisor/workers/{worker_id}/logs",
        params={"offset": max(0, offset), "limit": min(max(1, limit), 2000)},
    )
    lines = [f"{line['seq']}: {_clip(line['text'], 1000)}" for line in body["lines"]]
    tail = "(end of log)" if body.get("complete") else f"(next offset {body['next_offset']})"
    return "\n".join([*lines, tail]) if lines else f"No lines from offset {offset}. {tail}"


@server.tool(structured_output=False)
async def merge_subjob(job_id: str) -> str:
    """Merge a finished sub-job's result branch (its whole subtree's work) into your own worktree,
    with a merge commit. On a conflict the markers are left in the listed files: edit them to keep
    both intents, then `git add` them and `git commit` (or tell the orchestrator you are done)."""
    body = await api.call("POST", f"/api/jobs/{job_id}/merge")
    return merge_summary(body)


def merge_summary(body: dict[str, Any]) -> str:
    if body["status"] == "conflict":
        return (
            f"Merging {body['branch']} (job {body['job_id']}) into your worktree conflicts in: "
            f"{', '.join(body['files'])}. The conflict markers are in those files: resolve them, "
            "`git add` the files and `git commit` to finish the merge."
        )
    if body["status"] == "already merged":
        return f"{body['branch']} (job {body['job_id']}) is already merged into your branch."
    files = ", ".join(body["files"]) or "no files"
    return (
        f"Merged {body['branch']} (job {body['job_id']}) into your worktree as "
        f"{str(body['merge_commit'])[:12]}: {files}\n{body['diff_stat']}"
    )


def main() -> None:
    server.run("stdio")
