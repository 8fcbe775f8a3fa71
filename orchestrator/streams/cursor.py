"""Where a client is in a stream, as the `id:` of each message and the `Last-Event-ID` it sends back.

A malformed id is refused (BadRequest, a 400) before the stream starts: a stream that has begun can
only be cut short, and a client told "400" knows to start over rather than retry the same id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from orchestrator.core.errors import BadRequest

# ASCII digits only (`\d` and str.isdigit also take '²' or Arabic-Indic digits, which int()
# refuses or reads), at most 18 of them: every id fits a signed 64-bit column.
_ID = r"([0-9]{1,18})"
_CURSOR = re.compile(rf"e{_ID}-l{_ID}")
_SEQ = re.compile(_ID)
MAX_ID = 2**63 - 1


def _bad_last_event_id(raw: str, expected: str) -> BadRequest:
    shown = raw if len(raw) <= 40 else raw[:40] + "..."
    return BadRequest(f"Malformed Last-Event-ID {shown!r}: expected {expected}, as sent by this stream")


@dataclass
class Cursor:
    """The last event id and log line id a job (or fleet) stream has sent: `e<event id>-l<log id>`."""

    event_id: int = 0
    log_id: int = 0

    def __str__(self) -> str:
        return f"e{self.event_id}-l{self.log_id}"

    @classmethod
    def parse(cls, raw: str | None, default: Cursor) -> Cursor:
        """The cursor of a `Last-Event-ID` (absent or blank: `default`); BadRequest if malformed."""
        text = (raw or "").strip()
        if not text:
            return default
        match = _CURSOR.fullmatch(text)
        if match is None:
            raise _bad_last_event_id(text, "e<event id>-l<log id>")
        return cls(int(match.group(1)), int(match.group(2)))

    @classmethod
    def parse_strict(cls, raw: str | None) -> Cursor | None:
        """None without a header; 400 for one this server never sent."""
        if raw is None or not raw.strip():
            return None
        cursor = cls.parse(raw, cls(-1, -1))
        if cursor.event_id < 0 or cursor.event_id > MAX_ID or cursor.log_id > MAX_ID:
            raise BadRequest(f"Last-Event-ID {raw[:40]!r} is not a cursor of this stream (e<n>-l<n>)")
        return cursor


def parse_seq(raw: str | None) -> int | None:
    """The next log line to send after `Last-Event-ID: <seq>` (None when absent or blank)."""
    text = (raw or "").strip()
    if not text:
        return None
    if _SEQ.fullmatch(text) is None:
        raise _bad_last_event_id(text, "a log line number")
    return int(text) + 1
