"""Stream cursors: what a stream sends as `id:` reads back as the same position, and an id this
server never sent is a 400 naming the header, before any stream starts."""

from __future__ import annotations

import pytest

from orchestrator.core.errors import BadRequest
from orchestrator.streams.cursor import Cursor, parse_seq


@pytest.mark.parametrize(
    ("event_id", "log_id"), [(0, 0), (1, 0), (0, 7), (123456, 98765), (10**18 - 1, 10**18 - 1)]
)
def test_a_cursor_reads_back_as_itself(event_id: int, log_id: int) -> None:
    cursor = Cursor(event_id, log_id)
    assert str(cursor) == f"e{event_id}-l{log_id}"
    assert Cursor.parse(str(cursor), Cursor(-5, -5)) == cursor
    assert Cursor.parse_strict(str(cursor)) == cursor


@pytest.mark.parametrize("raw", [None, "", "   "])
def test_no_cursor_means_the_default(raw: str | None) -> None:
    default = Cursor(event_id=42)
    assert Cursor.parse(raw, default) is default
    assert Cursor.parse_strict(raw) is None


def test_surrounding_blanks_are_ignored() -> None:
    assert Cursor.parse("  e5-l6\t", Cursor()) == Cursor(5, 6)


BAD_CURSORS = [
    "e1",
    "e1-l",
    "l1-e1",
    "E1-L1",
    "e-1-l1",
    "e1-l1-",
    "e1-l1 x",
    "e\u00b2-l1",  # a superscript two: a digit to str.isdigit, not to this stream
    "e\u0661-l1",  # an Arabic-Indic one, which int() would read
    "e" + "9" * 19 + "-l1",  # more than a 64-bit column holds
    "5",
]


@pytest.mark.parametrize("raw", BAD_CURSORS)
@pytest.mark.parametrize("strict", [False, True])
def test_a_malformed_cursor_is_a_400_naming_the_header(raw: str, strict: bool) -> None:
    with pytest.raises(BadRequest) as caught:
        if strict:
            Cursor.parse_strict(raw)
        else:
            Cursor.parse(raw, Cursor())
    assert caught.value.status_code == 400
    assert caught.value.detail.startswith("Malformed Last-Event-ID ")
    assert "expected e<event id>-l<log id>" in caught.value.detail


def test_a_long_malformed_cursor_is_shortened_in_the_message() -> None:
    with pytest.raises(BadRequest) as caught:
        Cursor.parse("x" * 5000, Cursor())
    assert "x" * 40 + "..." in caught.value.detail
    assert "x" * 41 not in caught.value.detail


@pytest.mark.parametrize(("raw", "next_seq"), [(None, None), ("", None), (" ", None), ("0", 1), ("41", 42)])
def test_a_log_line_number_resumes_with_the_next_line(raw: str | None, next_seq: int | None) -> None:
    assert parse_seq(raw) == next_seq


@pytest.mark.parametrize("raw", ["-1", "1.0", "e1-l1", "\u00b2", "9" * 19, "1 2"])
def test_a_malformed_line_number_is_a_400(raw: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_seq(raw)
    assert caught.value.status_code == 400
    assert "expected a log line number" in caught.value.detail
