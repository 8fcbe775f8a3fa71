"""The Ray node maps the engine's paths to its own, and the engine ships the agent's run-dir files."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.executors.ray_node import PathMap, files_to_ship


def test_engine_paths_are_mapped_to_the_nodes_wherever_they_appear() -> None:
    remap = PathMap([("/data/runs/w1", "/node/runs/w1"), ("/data/workspaces/w1", "/node/workspaces/w1")])
    assert remap("/data/runs/w1") == "/node/runs/w1"
    assert remap("--mcp-config=/data/runs/w1/mcp.json") == "--mcp-config=/node/runs/w1/mcp.json"
    assert remap("cd /data/workspaces/w1 && ls") == "cd /node/workspaces/w1 && ls"
    # Another worker's path that merely starts with the same characters is left alone.
    assert remap("/data/runs/w10/x") == "/data/runs/w10/x"
    assert remap("/data/runs/w1.bak") == "/data/runs/w1.bak"


def test_the_agents_files_are_shipped_not_the_wrappers(tmp_path: Path) -> None:
    (tmp_path / "mcp.json").write_text("{}")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / ".config").write_text("x")
    for name in ("output.log", "exit", "pid", "stdin"):
        (tmp_path / name).write_text("wrapper's")
    (tmp_path / "git-common").mkdir()
    (tmp_path / "git-common" / "HEAD").write_text("ref")
    (tmp_path / "link").symlink_to("/etc/hostname")
    assert files_to_ship(tmp_path) == {"mcp.json": b"{}", "home/.config": b"x"}


def test_a_run_dir_too_big_to_ship_is_refused(tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"\0" * (9 << 20))
    with pytest.raises(RuntimeError, match="more than 8 MiB"):
        files_to_ship(tmp_path)
