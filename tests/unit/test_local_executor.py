"""The local executor's wrapper, with real processes: stdin reaches the agent (through a pipe, or a
file when large), the wrapper records its PID and the agent's exit status itself, and a PID is
only taken for a worker when the process is that worker's wrapper."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from orchestrator.agents.base import LaunchSpec
from orchestrator.executors.local import PIPE_STDIN_BYTES, LocalExecutor, read_exit_code


def _wait_for(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.01)


def _run(tmp_path: Path, spec: LaunchSpec, name: str) -> Path:
    run_dir, workdir = tmp_path / name, tmp_path / f"{name}-work"
    workdir.mkdir()
    executor = LocalExecutor()
    proc = executor.start(name, spec, workdir, run_dir)
    assert executor.wait(proc, timeout=20) == 0
    return run_dir


def test_small_stdin_goes_through_a_pipe_and_no_stdin_file_is_written(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, LaunchSpec(argv=["cat"], stdin_text="the task\n"), "small")
    assert (run_dir / "output.log").read_text() == "the task\n"
    assert not (run_dir / "stdin").exists()
    assert read_exit_code(run_dir) == 0


def test_large_stdin_is_written_to_a_file_and_arrives_whole(tmp_path: Path) -> None:
    task = "x" * (PIPE_STDIN_BYTES * 3) + "\nend\n"
    run_dir = _run(tmp_path, LaunchSpec(argv=["cat"], stdin_text=task), "large")
    assert (run_dir / "output.log").read_text() == task
    assert (run_dir / "stdin").read_text() == task
    assert (run_dir / "stdin").stat().st_mode & 0o777 == 0o600  # a task is nobody else's to read


def test_no_stdin_is_an_empty_stdin(tmp_path: Path) -> None:
    run_dir = _run(tmp_path, LaunchSpec(argv=["sh", "-c", "wc -c; exit 3"]), "none")
    assert (run_dir / "output.log").read_text().strip() == "0"
    assert read_exit_code(run_dir) == 3


def test_the_wrapper_records_its_pid_and_is_recognised_only_for_its_own_run_dir(tmp_path: Path) -> None:
    executor = LocalExecutor()
    run_dir, workdir = tmp_path / "live", tmp_path / "live-work"
    workdir.mkdir()
    proc = executor.start("live", LaunchSpec(argv=["sleep", "30"]), workdir, run_dir)
    try:
        _wait_for(run_dir / "pid")
        assert int((run_dir / "pid").read_text()) == proc.pid
        assert executor.find_started(run_dir) == (proc.pid, proc.start_time)
        # Another worker's run dir naming the same PID (a reused PID, say) is not this worker.
        other = tmp_path / "other"
        other.mkdir()
        (other / "pid").write_text(f"{proc.pid}\n")
        assert executor.find_started(other) is None
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        assert executor.wait(proc, timeout=10) == -signal.SIGKILL
    # Killed with -9: gone, and no exit status (the engine records such a worker as lost).
    assert executor.find_started(run_dir) is None
    assert read_exit_code(run_dir) is None


def test_a_worker_inherits_no_descriptor_beyond_stdin_stdout_and_stderr(tmp_path: Path) -> None:
    """Even one marked inheritable (a listening socket handed down by a process manager, say):
    a worker outliving the server must not hold it open."""
    inheritable = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(inheritable, True)
    ordinary = os.open(os.devnull, os.O_RDONLY)
    try:
        script = f"for fd in {inheritable} {ordinary}; do [ -e /proc/$$/fd/$fd ] && echo open $fd; done; echo checked"
        run_dir = _run(tmp_path, LaunchSpec(argv=["sh", "-c", script]), "fds")
    finally:
        os.close(inheritable)
        os.close(ordinary)
    assert (run_dir / "output.log").read_text() == "checked\n"


def test_a_missing_working_directory_is_an_error_at_start(tmp_path: Path) -> None:
    executor = LocalExecutor()
    try:
        executor.start("gone", LaunchSpec(argv=["true"]), tmp_path / "missing", tmp_path / "run")
    except FileNotFoundError as exc:
        assert "missing" in str(exc)
    else:
        raise AssertionError("started without a working directory")
