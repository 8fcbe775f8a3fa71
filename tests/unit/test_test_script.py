"""scripts/test.sh, the real script, driven with stand-in tools: both halves (and the Ray group,
on PostgreSQL like the second half) always run.

The script is copied into a scratch tree whose `.venv/bin` holds stand-ins for ruff, mypy and
python (a `python -m pytest` that prints a pytest-like summary and exits as told per database), and
whose PATH starts with stand-ins for the system tools it checks (chromium, git, bwrap, pg_isready,
apt-get). No real pytest runs inside; what is tested is the script's own control flow.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "test.sh"

FAKE_PYTHON = """#!/bin/bash
# Stand-in for `.venv/bin/python -m pytest ...`: records its call, answers as the test said.
echo "$TEST_DATABASE $*" >> "$FAKE_CALLS"
case "$TEST_DATABASE" in
  sqlite) rc="$FAKE_SQLITE_RC" ;;
  postgres) rc="$FAKE_PG_RC" ;;
  *) echo "no TEST_DATABASE" >&2; exit 99 ;;
esac
echo "output of the $TEST_DATABASE half"
case "$rc" in
  0) echo "7 passed in 0.10s" ;;
  1) echo "FAILED tests/x.py::test_y - boom"; echo "1 failed, 6 passed in 0.10s" ;;
  5) echo "no tests ran in 0.01s" ;;
  *) echo "INTERNALERROR" ;;
esac
exit "$rc"
"""


@dataclass
class Run:
    returncode: int
    output: str
    calls: list[str]
    root: Path


def stand_in(path: Path, body: str = "#!/bin/sh\nexit 0\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    path.chmod(0o755)


def run_script(tmp_path: Path, sqlite_rc: int, pg_rc: int, *args: str) -> Run:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(SCRIPT, root / "scripts" / "test.sh")
    venv = root / ".venv" / "bin"
    stand_in(venv / "ruff")
    stand_in(venv / "mypy")
    stand_in(venv / "python", FAKE_PYTHON)
    stand_in(root / "tests" / "fakes" / "install_claude.sh")
    tools = tmp_path / "tools"
    for tool in ("chromium", "chromedriver", "git", "bwrap", "pg_isready", "pg_ctlcluster"):
        stand_in(tools / tool)
    stand_in(tools / "apt-get", "#!/bin/sh\necho apt-get must not run >&2\nexit 1\n")
    calls = tmp_path / "calls"
    env = {
        "PATH": f"{tools}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "LANG": "C.UTF-8",
        "FAKE_CALLS": str(calls),
        "FAKE_SQLITE_RC": str(sqlite_rc),
        "FAKE_PG_RC": str(pg_rc),
    }
    proc = subprocess.run(
        ["bash", str(root / "scripts" / "test.sh"), *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    recorded = calls.read_text().splitlines() if calls.exists() else []
    return Run(proc.returncode, proc.stdout + proc.stderr, recorded, root)


def halves(run: Run) -> list[str]:
    return [call.split()[0] for call in run.calls]


@pytest.mark.parametrize(("sqlite_rc", "pg_rc"), [(1, 0), (0, 1), (1, 1), (2, 0)])
def test_a_failing_half_does_not_stop_the_other_and_fails_the_run(
    tmp_path: Path, sqlite_rc: int, pg_rc: int
) -> None:
    run = run_script(tmp_path, sqlite_rc, pg_rc)
    assert halves(run) == ["sqlite", "postgres", "postgres"], run.output
    assert run.returncode != 0, run.output
    summary = run.output[run.output.index("== summary") :]
    for name, rc in (("SQLite", sqlite_rc), ("PostgreSQL", pg_rc)):
        [line] = [line for line in summary.splitlines() if line.startswith(f"{name} (exit {rc})")]
        expected = {0: "7 passed", 1: "1 failed, 6 passed", 2: "no pytest summary"}[rc]
        assert expected in line, summary
    assert "FAILED" in summary.splitlines()[-1], summary
    # Each half's whole output is kept.
    sqlite_log = (run.root / "test-artifacts" / "pytest-sqlite.log").read_text()
    pg_log = (run.root / "test-artifacts" / "pytest-postgres.log").read_text()
    assert "output of the sqlite half" in sqlite_log and "output of the postgres half" in pg_log


def test_both_halves_passing_passes_with_both_summaries(tmp_path: Path) -> None:
    run = run_script(tmp_path, 0, 0, "-k", "some thing")
    assert run.returncode == 0, run.output
    assert run.output.count("7 passed in 0.10s") == 6, run.output  # each group's output and its summary
    # Arguments go to every group; the PostgreSQL half runs the database-backed suites, the Ray
    # group its own directory (which the SQLite half leaves out).
    sqlite_call, pg_call, ray_call = run.calls
    assert sqlite_call == "sqlite -m pytest -q -ra --ignore=tests/ray -k some thing", sqlite_call
    assert pg_call == "postgres -m pytest -q -ra tests/integration tests/streams tests/agents -k some thing"
    assert ray_call == "postgres -m pytest -q -ra tests/ray -k some thing"
    assert "Ray (exit 0)" in run.output
    assert "apt-get must not run" not in run.output


@pytest.mark.parametrize(("sqlite_rc", "pg_rc"), [(5, 0), (0, 5)])
def test_no_tests_in_one_half_is_fine(tmp_path: Path, sqlite_rc: int, pg_rc: int) -> None:
    run = run_script(tmp_path, sqlite_rc, pg_rc)
    assert run.returncode == 0, run.output
    assert "no tests ran" in run.output[run.output.index("== summary") :], run.output


def test_no_tests_in_either_half_fails(tmp_path: Path) -> None:
    run = run_script(tmp_path, 5, 5)
    assert halves(run) == ["sqlite", "postgres", "postgres"], run.output
    assert run.returncode != 0, run.output
    assert "no tests ran in either half" in run.output
