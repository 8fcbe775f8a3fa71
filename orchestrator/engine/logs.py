"""Moves worker output from its file into the database, exactly once.

The file is the durable copy while the worker runs; the database is what every API process (and
later, workers on other hosts) shares. The byte offset of the last complete line is stored in the
same transaction as the lines, so an engine that restarts resumes where the last one stopped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

MAX_LINE_CHARS = 16_000
MAX_READ_BYTES = 1 << 20


@dataclass
class LogCursor:
    path: Path
    offset: int = 0  # bytes consumed (complete lines only)
    lines: int = 0  # lines stored so far (next seq)
    pending: list[str] = field(default_factory=list)
    # A store failed, perhaps at its commit (the connection lost): whether it went through is
    # unknown, so the next store starts from the offset the database holds, not this one.
    unsure: bool = False

    def size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except FileNotFoundError:
            return 0

    def read_new(self, final: bool = False, cap: int | None = None) -> tuple[list[str], int]:
        """New complete lines (and, if final, the unterminated tail) plus the new offset; nothing
        past byte `cap` (a line the cap cuts is stored up to it)."""
        size = self.size()
        end_at = size if cap is None else min(size, cap)
        if end_at <= self.offset:
            return [], self.offset
        with self.path.open("rb") as handle:
            handle.seek(self.offset)
            chunk = handle.read(min(end_at - self.offset, MAX_READ_BYTES))
        final = final or (end_at < size and self.offset + len(chunk) == end_at)
        end = chunk.rfind(b"\n")
        if end < 0 and not final and len(chunk) < MAX_READ_BYTES:
            return [], self.offset
        if final or end < 0:
            body, consumed = chunk, len(chunk)
        else:
            body, consumed = chunk[: end + 1], end + 1
        # NUL becomes U+FFFD like invalid UTF-8: PostgreSQL's text refuses it, and one NUL in a
        # hostile agent's output would otherwise fail every insert of its log from then on.
        text = body.decode("utf-8", errors="replace").replace("\x00", "\ufffd")
        lines: list[str] = []
        for line in text.splitlines():
            while len(line) > MAX_LINE_CHARS:
                lines.append(line[:MAX_LINE_CHARS])
                line = line[MAX_LINE_CHARS:]
            lines.append(line)
        return lines, self.offset + consumed
