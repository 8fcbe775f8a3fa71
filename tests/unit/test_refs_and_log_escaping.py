"""base_ref's format rules against real `git check-ref-format`, and the log record escaping."""

from __future__ import annotations

import logging
import subprocess

import pytest

from orchestrator.core.logsafe import escape, install_log_escaping
from orchestrator.workspaces.refs import branch_job, ref_format_error

# Names git itself judges; the extra rules (printable only, no leading '-') are checked apart.
REFS = [
    "main",
    "feature/x",
    "refs/heads/main",
    "v1.0",
    "a.b/c-d_e",
    "ünï/cödé",
    "a..b",
    "a b",
    "a~1",
    "a^",
    "a:b",
    "a?",
    "a*",
    "a[b",
    "a\\b",
    "/a",
    "a/",
    "a//b",
    "a.",
    ".a",
    "a/.b",
    "a.lock",
    "a/b.lock/c",
    "@",
    "a@{1}",
    "a@b",
    "x\x7fy",
    "x\ty",
    "HEAD",
]


@pytest.mark.parametrize("ref", REFS)
def test_ref_rules_agree_with_git_check_ref_format(ref: str) -> None:
    done = subprocess.run(
        ["git", "check-ref-format", "--allow-onelevel", ref], capture_output=True, check=False
    )
    assert (ref_format_error(ref) is None) == (done.returncode == 0), ref_format_error(ref)


@pytest.mark.parametrize(
    "ref", ["-x", "--upload-pack=touch /tmp/pwned", "main\nINFO forged", "a\u2028b", "a\u0085b", "", "a\x1bb"]
)
def test_options_and_unprintable_refs_are_refused(ref: str) -> None:
    assert ref_format_error(ref) is not None


@pytest.mark.parametrize("ref", ["0123abcd", "0" * 40, "f" * 64])
def test_commit_ids_are_accepted(ref: str) -> None:
    assert ref_format_error(ref) is None


@pytest.mark.parametrize(
    ("ref", "job"),
    [
        ("orchestrator/j_b/w_b", "j_b"),
        ("heads/orchestrator/j_b/w_b", "j_b"),
        ("refs/heads/orchestrator/j_b/w_b", "j_b"),
        ("orchestrator/j_b", "j_b"),
        ("main", None),
        ("refs/tags/orchestrator/j_b/w_b", None),
        ("refs/heads/main", None),
    ],
)
def test_orchestrator_branches_are_recognised_however_spelled(ref: str, job: str | None) -> None:
    assert branch_job(ref) == job


def test_escape_leaves_printable_text_and_escapes_line_breaks() -> None:
    assert escape("plain ünïcödé text") == "plain ünïcödé text"
    assert escape("a\nb\rc\td\x1be\u2028f") == "a\\nb\\rc\\td\\x1be\\u2028f"


def test_records_of_every_logger_are_escaped(caplog: pytest.LogCaptureFixture) -> None:
    install_log_escaping()
    install_log_escaping()  # idempotent: not escaped twice
    caplog.set_level(logging.INFO)
    logging.getLogger("any.library").info("value %s, %r, %d\nnext", "x\ny", ValueError("e\nf"), 3)
    logging.getLogger("other").warning("mapping %(k)s", {"k": "1\n2"})
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["value x\\ny, ValueError('e\\nf'), 3\\nnext", "mapping 1\\n2"]
