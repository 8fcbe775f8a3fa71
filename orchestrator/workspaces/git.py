"""Git repositories and worktrees for workers."""

from __future__ import annotations

from pathlib import Path

from orchestrator.core.config import Settings
from orchestrator.core.errors import BadRequest


def resolve_repository(settings: Settings, repository: str) -> Path:
    """The repository's real path, if it is a git work tree under an allowed root."""
    path = Path(repository).expanduser()
    if not path.is_absolute():
        path = Path.cwd() / path
    path = path.resolve()
    roots = settings.repo_roots
    if not any(path == root or path.is_relative_to(root) for root in roots):
        allowed = ", ".join(str(r) for r in roots)
        raise BadRequest(f"Repository {path} is not under an allowed root ({allowed}); see ORCHESTRATOR_REPO_ROOTS")
    if not (path / ".git").exists():
        raise BadRequest(f"Repository {path} is not a git repository (no .git)")
    return path
