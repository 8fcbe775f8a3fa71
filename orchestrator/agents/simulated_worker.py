"""The `simulated` agent's process: behaves like a coding agent, without an LLM.

It prints progress, works for `duration_seconds`, delegates each of its `subtasks` as a child job
through the API with its own delegated token, waits for them, and exits with `exit_code` (or 1 if
a child did not complete). Standard library only, so it starts in a few milliseconds.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

FINAL = {"COMPLETED", "FAILED", "CANCELED"}
RETRY_SECONDS = 0.2


def _request(path: str, method: str = "GET", data: bytes | None = None) -> urllib.request.Request:
    """A request to the orchestrator with this worker's delegated token."""
    url = os.environ["ORCHESTRATOR_URL"].rstrip("/") + path
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {os.environ['ORCHESTRATOR_TOKEN']}")
    return request


def _api(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    request = _request(path, method, json.dumps(body).encode() if body is not None else None)
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


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
        with urllib.request.urlopen(request, timeout=timeout) as response:
            for raw in response:
                line = raw.decode(errors="replace").rstrip("\r\n")
                if line.startswith("id:"):
                    cursor = line[3:].strip()
                elif line == "event: end" or time.monotonic() > deadline:
                    break
    except TimeoutError:
        pass  # quiet for `timeout`: read the status again
    except (OSError, ValueError):
        time.sleep(RETRY_SECONDS)  # no stream (or it broke): read the status again shortly
    return cursor


def say(message: str) -> None:
    print(message, flush=True)


def main() -> int:
    options: dict[str, Any] = json.loads(os.environ.get("ORCHESTRATOR_SIMULATED_OPTIONS", "{}"))
    task = os.environ.get("ORCHESTRATOR_TASK", "")
    index = int(os.environ.get("WORKER_INDEX", "0"))
    count = int(os.environ.get("WORKER_COUNT", "1"))
    depth = int(os.environ.get("ORCHESTRATOR_DEPTH", "0"))
    job_id = os.environ.get("ORCHESTRATOR_JOB_ID", "")
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

    started = time.monotonic()
    step = 0
    while (elapsed := time.monotonic() - started) < duration:
        step += 1
        say(f"[simulated] working... step {step} ({elapsed:.1f}s of {duration:.1f}s)")
        time.sleep(min(interval, max(0.0, duration - elapsed)))

    children: list[str] = []
    for subtask in options.get("subtasks", []):
        spec = {"task_description": subtask} if isinstance(subtask, str) else dict(subtask)
        body = {
            "task_description": spec["task_description"],
            "worker_count": spec.get("worker_count", 1),
            "depth": depth + 1,
            "parent_job_id": job_id,
            "agent": "simulated",
            "agent_options": spec.get("agent_options", {}),
        }
        try:
            child = _api("POST", "/api/jobs/submit", body)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            say(f"[simulated] could not delegate {body['task_description']!r}: {exc.code} {detail}")
            return 1
        children.append(child["id"])
        say(f"[simulated] delegated {child['id']} at depth {depth + 1}: {body['task_description']}")

    failed = []
    poll = float(options.get("wait_poll_seconds", 5.0))
    for child_id in children:
        status = wait_for(child_id, poll)
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
