"""`merge_subjob` copies the index back into the worktree's git dir while the agent runs: a link
the agent plants at the copy's temporary name after the engine cleared it must not be written
through (the engine runs as root; the link may name any host file)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.workspaces import merge
from orchestrator.workspaces.git import GitError


def test_a_link_planted_between_the_unlink_and_the_write_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    admin = tmp_path / "worktrees" / "w1"  # the worktree's own git dir, the agent's to write
    admin.mkdir(parents=True)
    victim = tmp_path / "host-file"
    victim.write_text("a file of the host\n")
    source = tmp_path / "private-index"
    source.write_bytes(b"DIRC the merged index")
    partial = admin / ".index.orchestrator-tmp"
    unlink = Path.unlink

    def agent_wins_the_race(self: Path, missing_ok: bool = False) -> None:
        # The interleaving a spinning agent gets some of the time, made certain: it plants
        # the link again right after the engine removed it.
        unlink(self, missing_ok=missing_ok)
        if self == partial:
            os.symlink(victim, partial)

    monkeypatch.setattr(Path, "unlink", agent_wins_the_race)
    with pytest.raises(GitError, match="made again"):
        merge._copy_file(source, admin / "index")
    assert victim.read_text() == "a file of the host\n"
    assert not (admin / "index").exists()


def test_the_copy_replaces_a_planted_link_at_the_target_itself(tmp_path: Path) -> None:
    admin = tmp_path / "admin"
    admin.mkdir()
    victim = tmp_path / "host-file"
    victim.write_text("a file of the host\n")
    (admin / "index").symlink_to(victim)
    (admin / ".index.orchestrator-tmp").symlink_to(victim)
    source = tmp_path / "private-index"
    source.write_bytes(b"DIRC the merged index")
    merge._copy_file(source, admin / "index")
    assert not (admin / "index").is_symlink() and (admin / "index").read_bytes() == b"DIRC the merged index"
    assert victim.read_text() == "a file of the host\n"
