"""SQLite on a full disk, for real: the database file on a small tmpfs of its own, filled up.

A write that cannot be saved answers 503 `{"detail": "database unavailable: its disk is full ..."}`
with Retry-After (never a 500), reads still answer, the engine keeps its workers, and once space is
freed everything acknowledged runs, with its whole output, without a restart.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.test_database_failures import quiet_logs, unavailable
from tests.integration.test_engine_lifecycle import log_lines, submit, wait_final, workers_of
from tests.support.servers import server_factory
from tests.support.servers import test_database_kind as database_kind
from tests.support.wait import wait_until

pytestmark = [
    pytest.mark.skipif(database_kind() != "sqlite", reason="the SQLite database file"),
    pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root"),
]


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "16m") -> Iterator[Path]:
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Take every free block of the file system `directory` is on."""
    filler = directory / "filler"
    chunk = b"\0" * 4096
    with filler.open("wb", buffering=0) as handle:
        while True:
            try:
                handle.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return filler


def test_sqlite_disk_full(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "db") as mount, server_factory(tmp_path) as factory:
        factory._database_url = f"sqlite:///{mount / 'orchestrator.db'}"
        server = factory.start()
        with server.client() as client:
            running = [submit(client, worker_count=2, agent_options={"duration_seconds": 5.0})]
            filler = fill(mount)
            acknowledged = list(running)
            codes: list[int] = []

            def refused() -> httpx.Response | None:
                answer = client.post(
                    "/api/jobs/submit",
                    json={"task_description": "t", "agent_options": {"duration_seconds": 0.5}},
                )
                codes.append(answer.status_code)
                assert answer.status_code in (201, 503), answer.text
                if answer.status_code == 201:
                    acknowledged.append(answer.json())
                    return None
                return answer

            # Pages SQLite had already allocated take a few writes more.
            full = wait_until(refused, timeout=120, what="a submit refused for the full disk")
            unavailable(full)
            assert "disk is full" in full.json()["detail"], full.text
            assert client.get(f"/api/jobs/{running[0]['id']}").status_code == 200  # reads still answer
            filler.unlink()
            wait_until(lambda: refused() is None, timeout=120, what="a submit accepted again")
            for job in acknowledged:
                done = wait_final(client, job["id"], timeout=300)
                assert done["status"] == "COMPLETED", done
                for worker in workers_of(client, job["id"]):
                    output = Path(factory.root) / "data" / "runs" / worker["id"] / "output.log"
                    assert log_lines(client, worker["id"]) == output.read_text().splitlines()
        quiet_logs({"server": server.log()}, outages=2)
