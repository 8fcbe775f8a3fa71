"""executors/spawn.py: the engine's spawns release the GIL while the child is on its way to exec
(os.posix_spawn holds it: the event loop stalled on every parked wrapper), with os.posix_spawn's
behaviour otherwise: file actions, a new session, exactly the environment, exec errors raised."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from orchestrator.executors import spawn


def _wait(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def test_a_spawn_blocked_before_its_exec_lets_other_threads_run(tmp_path: Path) -> None:
    """The child's first file action opens a FIFO for writing, which blocks until a reader comes:
    the spawn cannot return before that. The reader is opened by this (the main) thread, in
    Python, after the spawning thread announced the call: only possible if the call released the
    GIL. With the GIL held, nothing here runs until a separate watchdog process (which needs no
    GIL) opens the FIFO, and the test fails instead of hanging."""
    fifo, marker = tmp_path / "fifo", tmp_path / "watchdog-came"
    os.mkfifo(fifo)
    # Leaves its mark before it opens the FIFO: if the spawn returned, the mark is there.
    code = f"import time, os; time.sleep(60); open({str(marker)!r}, 'w').close(); os.open({str(fifo)!r}, os.O_RDONLY)"
    watchdog = subprocess.Popen([sys.executable, "-c", code])
    calling = threading.Event()
    pids: list[int] = []

    def spawner() -> None:
        actions = [(os.POSIX_SPAWN_OPEN, 1, str(fifo), os.O_WRONLY, 0)]
        calling.set()
        pids.append(spawn.posix_spawn("/bin/true", ["true"], {}, file_actions=actions))

    thread = threading.Thread(target=spawner)
    try:
        thread.start()
        assert calling.wait(60)
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # Python: needs the GIL
        thread.join(120)
        os.close(reader)
    finally:
        watchdog.kill()
        watchdog.wait()
    assert not thread.is_alive()
    assert not marker.exists(), "only the watchdog could open the FIFO: the spawn held the GIL"
    assert _wait(pids[0]) == 0


def test_file_actions_session_and_environment(tmp_path: Path) -> None:
    out = tmp_path / "out"
    read, write = os.pipe()
    os.write(write, b"from stdin\n")
    os.close(write)
    script = 'read line; echo "$line"; echo "$FOO"; env | grep -c . ; ps -o sid= -p $$; echo $$ >&3'
    actions = [
        (os.POSIX_SPAWN_DUP2, read, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(out), os.O_WRONLY | os.O_CREAT, 0o600),
        (os.POSIX_SPAWN_DUP2, 1, 3),
        (os.POSIX_SPAWN_CLOSE, 987),  # not open: ignored, as by os.posix_spawn
    ]
    pid = spawn.posix_spawn(
        "/bin/sh",
        ["sh", "-c", script],
        {"FOO": "bar baz", "PATH": os.environ["PATH"]},
        file_actions=actions,
        setsid=True,
    )
    os.close(read)
    assert _wait(pid) == 0
    lines = out.read_text().split()
    assert lines[:3] == ["from", "stdin", "bar"]
    assert lines[3] == "baz"
    assert int(lines[4]) >= 2  # FOO, PATH (and whatever sh sets itself, such as PWD)
    assert lines[5] == lines[6] == str(pid)  # the leader of a session of its own
    assert os.stat(out).st_mode & 0o777 == 0o600


def test_an_exec_that_fails_raises_like_os_posix_spawn(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing")
    with pytest.raises(FileNotFoundError) as ours:
        spawn.posix_spawn(missing, ["missing"], {})
    with pytest.raises(FileNotFoundError) as theirs:
        os.posix_spawn(missing, ["missing"], {})
    assert (ours.value.errno, ours.value.filename) == (theirs.value.errno, theirs.value.filename)
