"""The data dir holds every task, log and token id, the signing key and worker output: only the
server's user may read it (0700 / 0600, umask 077), also what was there before the server started."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from tests.integration.test_engine_lifecycle import submit, wait_final, workers_of
from tests.integration.test_engine_workspaces_tokens import make_repo
from tests.support.servers import ServerFactory
from tests.support.servers import test_database_kind as database_kind


def open_to_others(data: Path) -> list[str]:
    """Entries with any group or other permission bit (worktrees' own files not walked)."""
    found = []
    for top, dirs, files in os.walk(data):
        for name in (*dirs, *files):
            path = Path(top, name)
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) & 0o077:
                found.append(f"{oct(stat.S_IMODE(mode))} {path.relative_to(data)}")
        if Path(top).name == "workspaces":
            dirs[:] = []
    return found


def test_data_dir_and_its_files_are_private(servers: ServerFactory) -> None:
    data = servers.root / "data"
    old_runs = data / "runs" / "w_old"
    old_runs.mkdir(parents=True)
    (data / "runs").chmod(0o755)
    data.chmod(0o755)
    old_runs.chmod(0o755)
    (old_runs / "output.log").write_text("output of an older server\n")
    (old_runs / "output.log").chmod(0o644)
    (data / "secret_key").write_text("a key an older version stored\n")
    (data / "secret_key").chmod(0o644)
    if database_kind() == "sqlite":
        (data / "orchestrator.db").touch(mode=0o644)  # as an older version or a copy left it
        (data / "orchestrator.db").chmod(0o644)
    repo = make_repo(servers.root)

    server = servers.start()
    assert server.process is not None
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    assert "Umask:\t0077" in status, status
    with server.client() as client:
        job = submit(client, repository=str(repo), agent_options={"duration_seconds": 0.2})
        assert wait_final(client, job["id"], timeout=120)["status"] == "COMPLETED"
        (worker,) = workers_of(client, job["id"])
        assert client.get(f"/api/supervisor/workers/{worker['id']}/logs").json()["lines"]

    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert (data / "runs" / worker["id"]).is_dir() and (data / "workspaces" / worker["id"]).is_dir()
    if database_kind() == "sqlite":
        assert (data / "orchestrator.db-wal").exists()  # written while the server runs
    assert open_to_others(data) == []
    server.stop()
    assert open_to_others(data) == []
