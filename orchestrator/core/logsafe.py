"""Log records that cannot forge log lines.

Values in log messages come from requests, repositories and agents (a path, a ref, git's error
text). A newline (or CR, or a Unicode line separator) in one of them would start what looks like
a new, separate log line. One record factory, installed for the whole process, escapes every
non-printable character in each record's message and string arguments before any handler or
formatter sees it, so it holds for uvicorn's loggers, the root's last-resort handler and the
JSON formatter alike. Tracebacks (exc_info) are left as they are: they are the server's own.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Mapping
from typing import Any

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape(text: str) -> str:
    """`text` with every non-printable character written as an escape (`\\n`, `\\x1b`, `\\u2028`)."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape_char(ch) for ch in text)


def _escape_char(ch: str) -> str:
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class _Escaped:
    """An argument of any other type, formatted (`%s` or `%r`) with its text escaped."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __str__(self) -> str:
        return escape(str(self.value))

    def __repr__(self) -> str:
        return escape(repr(self.value))


def _safe(value: Any) -> Any:
    if isinstance(value, str):
        return escape(value)
    if value is None or isinstance(value, numbers.Number):  # %d / %f must still work
        return value
    return _Escaped(value)


def _escape_record(record: logging.LogRecord) -> logging.LogRecord:
    record.msg = escape(record.msg) if isinstance(record.msg, str) else _Escaped(record.msg)
    if isinstance(record.args, Mapping):
        record.args = {key: _safe(value) for key, value in record.args.items()}
    elif record.args:
        record.args = tuple(_safe(value) for value in record.args)
    return record


def install_log_escaping() -> None:
    """Make every log record of this process escape its values (idempotent)."""
    current = logging.getLogRecordFactory()
    if getattr(current, "_orchestrator_escaping", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return _escape_record(current(*args, **kwargs))

    factory._orchestrator_escaping = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
