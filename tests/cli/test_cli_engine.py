"""The CLI against a server with its engine: jobs really run, workers are real processes."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli.support import ORCHESTRATOR, cli_env, ok, ok_json, run
from tests.support.servers import Server, server_factory
from tests.support.wait import wait_until


@pytest.fixture(scope="module")
def engine_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with server_factory(tmp_path_factory.mktemp("cli-engine")) as factory:
        yield factory.start()


@pytest.fixture
def env(engine_server: Server, tmp_path: Path) -> dict[str, str]:
    return cli_env(tmp_path, engine_server)


def _first_worker(env: dict[str, str], job_id: str, status: str = "RUNNING") -> dict[str, Any]:
    def running() -> dict[str, Any] | None:
        workers = ok_json(env, "workers", "--job", job_id)["workers"]
        return next((w for w in workers if w["status"] == status), None)

    return wait_until(running, timeout=30, interval=0.2, what=f"a {status} worker of {job_id}")


def test_submit_wait_follows_the_tree_to_completed(env: dict[str, str]) -> None:
    subtasks = [{"task_description": "child", "worker_count": 2, "agent_options": {"duration_seconds": 0.3}}]
    done = run(
        env, "submit", "parent", "-w", "2", "-o", "duration_seconds=0.3", "-o", f"subtasks={json.dumps(subtasks)}",
        "--wait", timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    root_id = done.stdout.split("Submitted ", 1)[1].split()[0]
    assert "COMPLETED" in done.stdout
    shown = ok_json(env, "job", root_id)
    assert shown["job"]["status"] == "COMPLETED"
    assert len(shown["descendants"]) == 2 and all(d["status"] == "COMPLETED" for d in shown["descendants"])
    assert len(shown["workers"]) == 6 and all(w["exit_code"] == 0 for w in shown["workers"])
    for descendant in shown["descendants"]:
        assert descendant["id"] in done.stdout  # the tree showed every job
    table = ok(env, "job", root_id)
    assert "WORKER" in table and "COMPLETED" in table


def test_submit_wait_exits_1_when_the_job_fails(env: dict[str, str]) -> None:
    done = run(
        env, "submit", "doomed", "-o", "exit_code=3", "-o", "duration_seconds=0", "--wait", timeout=120
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAILED" in done.stdout and "Traceback" not in done.stderr


def test_submit_wait_says_how_the_workers_of_a_canceled_job_ended(env: dict[str, str]) -> None:
    """Piped `submit --wait` of a job canceled while its two workers run: the end reads
    "workers 2/2 ended: 2 TERMINATED" (it used to read "workers 2/2", like a success), the exit is
    1, and the stamps of the status lines never go back."""
    watcher = subprocess.Popen(
        [str(ORCHESTRATOR), "submit", "long", "-w", "2", "-o", "duration_seconds=600", "--wait"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        job_id = wait_until(
            lambda: next(
                (j["id"] for j in ok_json(env, "jobs")["jobs"] if j["task_description"] == "long"), None
            ),
            timeout=60,
            interval=0.2,
            what="the submitted job",
        )
        wait_until(
            lambda: (
                [w["status"] for w in ok_json(env, "workers", "--job", job_id)["workers"]]
                == ["RUNNING", "RUNNING"]
            ),
            timeout=60,
            interval=0.2,
            what="both workers running",
        )
        ok(env, "cancel", job_id)
        out, err = watcher.communicate(timeout=120)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    assert watcher.returncode == 1, out + err
    assert "Traceback" not in err
    assert "workers 2/2 ended: 2 TERMINATED" in out, out
    changes = [line.split() for line in out.splitlines() if f"{job_id} d0 " in line and "workers" not in line]
    assert changes[-1][3] == "CANCELED", out
    stamps = [float(change[0].rstrip("s")) for change in changes]
    assert stamps == sorted(stamps), out


def test_submit_wait_json_prints_the_final_job(env: dict[str, str]) -> None:
    out = ok(env, "submit", "quick", "-o", "duration_seconds=0", "--wait", "--json", timeout=120)
    assert json.loads(out)["status"] == "COMPLETED"


def test_logs_follow_until_the_worker_ends(env: dict[str, str]) -> None:
    job_id = ok(
        env, "submit", "chatty", "-q", "-o", "duration_seconds=2", "-o", "progress_interval_seconds=0.2"
    ).strip()
    worker = _first_worker(env, job_id)
    followed = ok(env, "logs", worker["id"], "-f", timeout=60)
    assert "done with exit code 0" in followed
    assert ok_json(env, "worker", worker["id"])["status"] == "COMPLETED"
    whole = ok_json(env, "logs", worker["id"])
    assert whole["complete"] is True
    assert [line["text"] for line in whole["lines"]] == followed.splitlines()


def test_pause_resume_terminate_a_live_worker(env: dict[str, str]) -> None:
    job_id = ok(env, "submit", "long", "-q", "-o", "duration_seconds=60").strip()
    worker_id = _first_worker(env, job_id)["id"]
    assert "PAUSED" in ok(env, "pause", worker_id)
    assert ok_json(env, "worker", worker_id)["status"] == "PAUSED"
    assert ok_json(env, "resume", worker_id)["status"] == "RUNNING"
    assert "TERMINATED" in ok(env, "terminate", worker_id)
    wait_until(
        lambda: ok_json(env, "job", job_id)["job"]["status"] == "FAILED", timeout=30, what="job FAILED"
    )
    changes = [(e["from_status"], e["to_status"]) for e in ok_json(env, "events", job_id)["events"]]
    assert ("RUNNING", "PAUSED") in changes and ("PAUSED", "RUNNING") in changes
    assert ("RUNNING", "TERMINATED") in changes
    assert "TERMINATED" in ok(env, "events", job_id)


def test_gc_removes_the_dirs_of_finished_workers(env: dict[str, str], engine_server: Server) -> None:
    data_dir = Path(engine_server.env["ORCHESTRATOR_DATA_DIR"])
    finished = ok_json(env, "submit", "short", "-o", "duration_seconds=0", "--wait", timeout=120)
    running = ok(env, "submit", "still going", "-q", "-o", "duration_seconds=60").strip()
    live_worker = _first_worker(env, running)["id"]
    done_worker = ok_json(env, "workers", "--job", finished["id"])["workers"][0]["id"]
    assert (data_dir / "runs" / done_worker).exists() and (data_dir / "workspaces" / done_worker).exists()

    assert "would remove" in ok(env, "gc", "--dry-run")
    assert (data_dir / "runs" / done_worker).exists()
    assert "Nothing to collect" in ok(env, "gc", "--older-than", "1h")

    out = ok(env, "gc")
    assert done_worker in out
    assert not (data_dir / "runs" / done_worker).exists()
    assert not (data_dir / "workspaces" / done_worker).exists()
    assert (data_dir / "runs" / live_worker).exists(), "a running worker's dirs must stay"
    ok(env, "cancel", running)


@pytest.mark.slow
def test_demo_runs_a_tree_on_its_own_server(tmp_path: Path) -> None:
    env = cli_env(tmp_path)
    data_dir = tmp_path / "demo-data"
    done = subprocess.run(
        [env_bin(), "demo", "--levels", "3", "--seconds", "0.3", "--data-dir", str(data_dir)],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Demo finished" in done.stdout and "COMPLETED" in done.stdout
    assert "Where to look next" in done.stdout and "/docs" in done.stdout
    assert (data_dir / "server.log").exists()


def env_bin() -> str:
    from tests.cli.support import ORCHESTRATOR

    return str(ORCHESTRATOR)


@pytest.mark.parametrize("output", ["--json", "--tree"])
def test_submit_wait_is_woken_by_the_servers_events_not_its_poll(env: dict[str, str], output: str) -> None:
    """With the fallback poll set to 600 s, `--wait` still returns as soon as the job ends: it
    reads the tree again when the events stream says something changed. (Its run is given 300 s:
    generous on a loaded host, and ending in time is only possible through the stream.)"""
    slow_poll = {**env, "ORCHESTRATOR_CLI_POLL_SECONDS": "600"}
    args = ["--json"] if output == "--json" else []
    done = run(slow_poll, "submit", "quick", "-o", "duration_seconds=0.5", "--wait", *args, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "COMPLETED" in done.stdout
