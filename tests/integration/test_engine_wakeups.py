"""Wake-ups are event driven across processes: PostgreSQL NOTIFY, or SQLite's data_version.

The standalone engine below polls only every 30 s, so anything faster proves the wake-up path.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_engine_lifecycle import agents_file, submit, wait_final, workers_of
from tests.support.servers import Server, ServerFactory
from tests.support.wait import wait_until


@pytest.fixture
def api_and_engine(servers: ServerFactory) -> Iterator[tuple[Server, subprocess.Popen[bytes]]]:
    profiles = agents_file(servers.root)
    api = servers.start(ORCHESTRATOR_ENGINE="false", ORCHESTRATOR_AGENTS_FILE=profiles)
    env = servers.base_env(
        ORCHESTRATOR_AGENTS_FILE=profiles, ORCHESTRATOR_POLL_SECONDS="30", ORCHESTRATOR_PUBLIC_URL=api.url
    )
    log = (servers.root / "engine.log").open("wb")
    engine = subprocess.Popen(
        [str(Path(sys.executable).parent / "orchestrator"), "engine"],
        cwd=servers.root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_until(lambda: "Engine running" in (servers.root / "engine.log").read_text(), timeout=30)
        time.sleep(0.3)  # past the engine's first pass
        yield api, engine
    finally:
        engine.terminate()
        try:
            engine.wait(30)
        except subprocess.TimeoutExpired:
            engine.kill()
            engine.wait()
            pytest.fail(
                "`orchestrator engine` did not stop within 30 s of SIGTERM:\n"
                + (servers.root / "engine.log").read_text(errors="replace")[-5000:]
            )
        finally:
            log.close()


def test_standalone_engine_starts_jobs_and_applies_control_without_polling(
    api_and_engine: tuple[Server, subprocess.Popen[bytes]],
) -> None:
    api, _engine = api_and_engine
    with api.client() as client:
        started = time.monotonic()
        job = submit(client, agent_options={"duration_seconds": 0})
        assert wait_final(client, job["id"], timeout=10)["status"] == "COMPLETED"
        assert time.monotonic() - started < 5, "the engine must wake on the commit, not on its 30 s poll"

        ticker = submit(client, agent="ticker")
        worker = wait_until(
            lambda: next((w for w in workers_of(client, ticker["id"]) if w["status"] == "RUNNING"), None),
            timeout=5,
        )
        paused_at = time.monotonic()
        assert client.post(f"/api/supervisor/workers/{worker['id']}/pause").status_code == 200
        stat = Path(f"/proc/{worker['pid']}/stat")
        wait_until(lambda: stat.read_text().rsplit(")", 1)[1].split()[0] == "T", timeout=1.0)
        assert time.monotonic() - paused_at < 1.0
        client.post(f"/api/jobs/{ticker['id']}/cancel")
        assert wait_final(client, ticker["id"], timeout=10)["status"] == "CANCELED"
