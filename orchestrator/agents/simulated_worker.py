"""The `simulated` agent's process: behaves like a coding agent, without an LLM.

It prints progress, works for `duration_seconds`, delegates each of its `subtasks` as a child job
through the API with its own delegated token, waits for them, and exits with `exit_code` (or 1 if
a child did not complete). Standard library only, so it starts in a few milliseconds.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.core.unix_http import api_socket, opener

FINAL = {"COMPLETED", "FAILED", "CANCELED"}
RETRY_SECONDS = 0.2
# Connection errors, torn answers and 5xx are retried with backoff (doubling from the first to
# the last delay) for as long as the worker's token is valid: a server killed and restarted (or
# a proxy that dropped an answer) must not fail a tree.
BACKOFF_FIRST_SECONDS = 0.2
BACKOFF_MAX_SECONDS = 5.0
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
T = TypeVar("T")


class Transient(Exception):
    """The request may not have been served, or its answer was lost: worth trying again."""


class GaveUp(Exception):
    """Retried until the worker's token expires."""


def _open(request: urllib.request.Request, timeout: float) -> Any:
    """urlopen, over the API's unix socket when the server listens on one (`uvicorn --uds`)."""
    socket_path = api_socket()
    if socket_path:
        return opener(socket_path).open(request, timeout=timeout)
    return urllib.request.urlopen(request, timeout=timeout)


def _request(path: str, method: str = "GET", data: bytes | None = None) -> urllib.request.Request:
    """A request to the orchestrator with this worker's delegated token."""
    url = os.environ["ORCHESTRATOR_URL"].rstrip("/") + path
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {os.environ['ORCHESTRATOR_TOKEN']}")
    return request


def _call(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One request; Transient if it failed in a way a retry may mend, HTTPError for a refusal."""
    request = _request(path, method, json.dumps(body).encode() if body is not None else None)
    request.add_header("Content-Type", "application/json")
    try:
        with _open(request, timeout=30) as response:
            result: dict[str, Any] = json.loads(response.read())
            return result
    except urllib.error.HTTPError as exc:
        if exc.code in RETRY_STATUSES or exc.code >= 500:
            raise Transient(f"{exc.code} {exc.reason}") from exc
        raise
    except (OSError, http.client.HTTPException, ValueError) as exc:  # refused, reset, torn, timed out
        raise Transient(f"{type(exc).__name__}: {exc}") from exc


def token_expires_at() -> float:
    """When this worker's token expires (its `exp` claim, read without checking the signature:
    the server checks it); a week from now if it cannot be read."""
    try:
        payload = os.environ["ORCHESTRATOR_TOKEN"].split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (KeyError, IndexError, ValueError, TypeError):
        return time.time() + 7 * 24 * 3600


def retrying(attempt: Callable[[], T], what: str) -> T:
    """`attempt()` until it does not raise Transient, sleeping 0.2 s, 0.4 s, ... 5 s between tries,
    as long as the token stays valid."""
    delay = BACKOFF_FIRST_SECONDS
    deadline = token_expires_at()
    while True:
        try:
            return attempt()
        except Transient as exc:
            if time.time() + delay >= deadline:
                raise GaveUp(f"{what}: {exc}; gave up, this worker's token expires") from exc
            say(f"[simulated] {what} failed ({exc}); retrying in {delay:.1f}s")
            time.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX_SECONDS)


def _api(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """A request that is safe to repeat (a read), retried through server restarts."""
    return retrying(lambda: _call(method, path, body), f"{method} {path}")


def find_child(parent_job_id: str, key: str) -> dict[str, Any] | None:
    """The child this worker submitted with `key`, if the server has it."""
    query = urllib.parse.urlencode({"parent_job_id": parent_job_id, "delegation_key": key})
    jobs = _call("GET", f"/api/jobs?{query}")["jobs"]
    return jobs[0] if jobs else None


def delegate(body: dict[str, Any]) -> dict[str, Any]:
    """Submit a child exactly once. Once a submit was sent, its answer may have been lost after
    the server committed it (killed, connection cut): the child is looked up by its
    `delegation_key` before the submit is sent again, and a 409 (the key is taken: a submit of
    ours that raced) is answered by the lookup too."""
    sent = False

    def attempt() -> dict[str, Any]:
        nonlocal sent
        if sent and (found := find_child(body["parent_job_id"], body["delegation_key"])) is not None:
            return found
        sent = True
        try:
            return _call("POST", "/api/jobs/submit", body)
        except urllib.error.HTTPError as exc:
            if exc.code != 409:
                raise
            raise Transient("409: the delegation key is taken; looking the child up") from exc

    return retrying(attempt, f"delegating {body['task_description']!r}")


def wait_for(job_id: str, poll_seconds: float) -> str:
    """The job's final status. Its events stream says when its tree is final (`end`), so the
    wait ends within milliseconds of the job's; the status is read again at least every
    `poll_seconds` (a quiet or broken stream), and a stream that cannot be opened at all falls
    back to reading it every RETRY_SECONDS."""
    cursor: str | None = None
    while True:
        status = str(_api("GET", f"/api/jobs/{job_id}")["status"])
        if status in FINAL:
            return status
        cursor = _until_end(job_id, cursor, poll_seconds)


def _until_end(job_id: str, cursor: str | None, timeout: float) -> str | None:
    """Follow the job's events stream until it ends (or says `end`), breaks, or is quiet for
    `timeout`; returns the cursor to resume from, so nothing is read twice."""
    request = _request(f"/api/jobs/{job_id}/events?follow=true")
    request.add_header("Accept", "text/event-stream")
    if cursor is not None:
        request.add_header("Last-Event-ID", cursor)
    deadline = time.monotonic() + timeout  # keep-alive pings must not make the wait endless
    try:
        with _open(request, timeout=timeout) as response:
            for raw in response:
                line = raw.decode(errors="replace").rstrip("\r\n")
                if line.startswith("id:"):
                    cursor = line[3:].strip()
                elif line == "event: end" or time.monotonic() > deadline:
                    break
    except TimeoutError:
        pass  # quiet for `timeout`: read the status again
    except (OSError, ValueError, http.client.HTTPException):
        time.sleep(RETRY_SECONDS)  # no stream (or it broke): read the status again shortly
    return cursor


class WorkClock:
    """Work time only: a paused worker (SIGSTOP ... SIGCONT to its process group) must not count
    the pause as work. A stopped process cannot note when it was stopped, but it learns when it
    is resumed (SIGCONT runs this handler), so a step during which it was resumed counts only
    from the resume: the work done before the stop within that step (at most one progress
    interval) is not counted, so the run may be a little longer than asked, never shorter."""

    def __init__(self) -> None:
        self.worked = 0.0
        self.resumed_at: float | None = None
        signal.signal(signal.SIGCONT, self._resumed)

    def _resumed(self, signum: int, frame: object) -> None:
        self.resumed_at = time.monotonic()

    def step(self, seconds: float) -> None:
        """Sleep `seconds` and add the part of it spent running (from the last resume, if any)."""
        began = time.monotonic()
        time.sleep(seconds)
        resumed = self.resumed_at
        self.worked += time.monotonic() - (resumed if resumed is not None and resumed > began else began)


def say(message: str) -> None:
    print(message, flush=True)


def _delegate(subtasks: list[Any], depth: int, job_id: str, worker_id: str) -> list[str] | None:
    """Submit each subtask as a child job; their ids, or None when one could not be submitted."""
    children: list[str] = []
    for subtask in subtasks:
        spec = {"task_description": subtask} if isinstance(subtask, str) else dict(subtask)
        body = {
            "task_description": spec["task_description"],
            "worker_count": spec.get("worker_count", 1),
            "depth": depth + 1,
            "parent_job_id": job_id,
            "agent": "simulated",
            "agent_options": spec.get("agent_options", {}),
            # This worker's n-th child: the same key on every retry of its submit.
            "delegation_key": f"{worker_id}:{len(children)}",
        }
        try:
            child = delegate(body)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            say(f"[simulated] could not delegate {body['task_description']!r}: {exc.code} {detail}")
            return None
        except GaveUp as exc:
            say(f"[simulated] could not delegate {body['task_description']!r}: {exc}")
            return None
        children.append(child["id"])
        say(f"[simulated] delegated {child['id']} at depth {depth + 1}: {body['task_description']}")
    return children


def main() -> int:
    options: dict[str, Any] = json.loads(sys.stdin.read() or "{}")  # the agent options, on stdin
    task = os.environ.get("ORCHESTRATOR_TASK", "")
    index = int(os.environ.get("WORKER_INDEX", "0"))
    count = int(os.environ.get("WORKER_COUNT", "1"))
    depth = int(os.environ.get("ORCHESTRATOR_DEPTH", "0"))
    job_id = os.environ.get("ORCHESTRATOR_JOB_ID", "")
    worker_id = os.environ.get("ORCHESTRATOR_WORKER_ID", "")
    duration = float(options.get("duration_seconds", 2.0))
    interval = float(options.get("progress_interval_seconds", 0.5))
    say(f"[simulated] worker {index + 1}/{count} at depth {depth} starting: {task}")
    if os.environ.get("ORCHESTRATOR_ROLE") == "resolver":
        return resolve(
            options.get("resolve"), json.loads(os.environ.get("ORCHESTRATOR_CONFLICT_FILES", "[]"))
        )
    for name, content in dict(options.get("files", {})).items():
        # "{index}" in a path or content is the worker's index: workers of one job can differ.
        path = Path(name.replace("{index}", str(index)))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content.replace("{index}", str(index)))
        say(f"[simulated] wrote {name}")

    clock = WorkClock()
    step = 0
    while (elapsed := clock.worked) < duration:
        step += 1
        say(f"[simulated] working... step {step} ({elapsed:.1f}s of {duration:.1f}s)")
        clock.step(min(interval, max(0.0, duration - elapsed)))

    children = _delegate(options.get("subtasks", []), depth, job_id, worker_id)
    if children is None:
        return 1

    failed = []
    poll = float(options.get("wait_poll_seconds", 5.0))
    for child_id in children:
        try:
            status = wait_for(child_id, poll)
        except (GaveUp, urllib.error.HTTPError) as exc:
            say(f"[simulated] could not follow child {child_id}: {exc}")
            return 1
        say(f"[simulated] child {child_id} finished: {status}")
        if status != "COMPLETED":
            failed.append(child_id)

    exit_code = int(options.get("exit_code", 0))
    if failed:
        say(f"[simulated] {len(failed)} child job(s) did not complete: {', '.join(failed)}")
        exit_code = exit_code or 1
    say(f"[simulated] done with exit code {exit_code}")
    return exit_code


def resolve(mode: str | None, files: list[str]) -> int:
    """Resolve conflict markers in `files` by keeping ours, theirs, or both (ours first)."""
    if mode not in ("ours", "theirs", "both"):
        say("[simulated] cannot resolve conflicts: no resolve option")
        return 1
    for name in files:
        kept: list[str] = []
        side = None
        for line in Path(name).read_text().splitlines(keepends=True):
            if line.startswith("<<<<<<< "):
                side = "ours"
            elif side == "ours" and line.rstrip("\n") == "=======":
                side = "theirs"
            elif side == "theirs" and line.startswith(">>>>>>> "):
                side = None
            elif side is None or mode == "both" or side == mode:
                kept.append(line)
        Path(name).write_text("".join(kept))
        say(f"[simulated] resolved {name} ({mode})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
