"""The engine writes an agent's config into its HOME before each run, as the server's user: on a
resumed run that HOME holds whatever the agent left there, links to host files included. The
config must replace such a link, never be written through it."""

from __future__ import annotations

import os
from pathlib import Path

from orchestrator.agents.base import WorkerContext
from orchestrator.agents.claude_code import write_private
from orchestrator.agents.codex import CodexAgent
from orchestrator.core.config import Settings


def context(tmp_path: Path, home: Path) -> WorkerContext:
    return WorkerContext(
        job_id="j_000000000001",
        worker_id="w_000000000001",
        worker_index=0,
        worker_count=1,
        depth=0,
        task="t",
        options={"mcp_transport": "stdio"},
        workdir=tmp_path,
        home=home,
        run_dir=tmp_path,
        api_url="http://127.0.0.1:9",
        token="tok.en.value",
        resume_session="s-1",
    )


def test_codex_config_replaces_links_the_agent_left_in_its_home(tmp_path: Path) -> None:
    codex = tmp_path / "codex"
    codex.write_text("#!/bin/sh\n")
    codex.chmod(0o755)
    agent = CodexAgent(Settings(orchestrator_data_dir=tmp_path / "data", orchestrator_codex_bin=str(codex)))
    host_file, host_dir = tmp_path / "host-passwd", tmp_path / "host-etc"
    host_file.write_text("root:x:0:0\n")
    host_dir.mkdir()
    # A file link, then a directory link, as a previous run of the agent could leave them.
    file_home, dir_home = tmp_path / "home-file", tmp_path / "home-dir"
    (file_home / ".codex").mkdir(parents=True)
    (file_home / ".codex" / "config.toml").symlink_to(host_file)
    dir_home.mkdir()
    (dir_home / ".codex").symlink_to(host_dir)
    for home in (file_home, dir_home):
        agent.launch(context(tmp_path, home))
        config = home / ".codex" / "config.toml"
        assert not config.is_symlink() and not (home / ".codex").is_symlink()
        assert "tok.en.value" in config.read_text() and os.stat(config).st_mode & 0o777 == 0o600
    assert host_file.read_text() == "root:x:0:0\n" and list(host_dir.iterdir()) == []


def test_write_private_makes_the_file_new(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("host\n")
    target = tmp_path / "mcp.json"
    target.symlink_to(victim)
    write_private(target, "{}")
    assert target.read_text() == "{}" and not target.is_symlink() and victim.read_text() == "host\n"
