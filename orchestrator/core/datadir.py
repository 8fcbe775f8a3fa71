"""The data directory is private: it holds the database (every task, log and token id), the
signing key and the workers' output.

At start-up the process's umask becomes 077, so whatever the server, its engine and their workers
create is readable by the server's user only; the data dir is made 0700 and files made before
(an older version, `scripts/init_database.py`, a copy) lose their group and other bits. Worker
worktrees are not walked: they can be large, and the 0700 data dir already closes them.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_UMASK = 0o077
_SKIP_CONTENTS = frozenset({"workspaces"})


def secure_data_dir(data_dir: Path, database_file: Path | None = None) -> None:
    """Set the umask to 077, create `data_dir` 0700, and strip group/other bits from what is in it
    (and from `database_file` with its -wal / -shm / -journal files, wherever it is)."""
    os.umask(PRIVATE_UMASK)
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _make_private(data_dir)
    for top, dirs, files in os.walk(data_dir):
        for name in (*dirs, *files):
            _make_private(Path(top, name))
        if Path(top) == data_dir:
            dirs[:] = [d for d in dirs if d not in _SKIP_CONTENTS]
        elif Path(top).parent == data_dir and Path(top).name in _SKIP_CONTENTS:
            dirs[:] = []  # each worktree's own directory, not its files
    if database_file is not None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            _make_private(database_file.with_name(database_file.name + suffix))


def _make_private(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
        if not stat.S_ISLNK(mode) and stat.S_IMODE(mode) & 0o077:
            path.chmod(stat.S_IMODE(mode) & ~0o077)
    except FileNotFoundError:  # removed meanwhile (another process of the same server)
        pass
