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
from typing import Any

FINAL = {"COMPLETED", "FAILED", "CANCELED"}


def _api(method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    url = os.environ["ORCHESTRATOR_URL"].rstrip("/") + path
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {os.environ['ORCHESTRATOR_TOKEN']}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


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
    for child_id in children:
        while True:
            status = _api("GET", f"/api/jobs/{child_id}")["status"]
            if status in FINAL:
                break
            time.sleep(0.2)
        say(f"[simulated] child {child_id} finished: {status}")
        if status != "COMPLETED":
            failed.append(child_id)

    exit_code = int(options.get("exit_code", 0))
    if failed:
        say(f"[simulated] {len(failed)} child job(s) did not complete: {', '.join(failed)}")
        exit_code = exit_code or 1
    say(f"[simulated] done with exit code {exit_code}")
    return exit_code


if __name__ == "__main__":
    sys.exit(main())
