"""Run the installed `orchestrator` console script as a real process, as an operator would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.support.servers import TEST_SECRET_KEY, Server, token

ORCHESTRATOR = Path(sys.executable).with_name("orchestrator")


def cli_env(home: Path, server: Server | None = None, **extra: str) -> dict[str, str]:
    """A clean environment: own HOME (so no real config is read), the suite's key, no stray settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ORCHESTRATOR_", "XDG_CONFIG_HOME")) and k not in ("DATABASE_URL", "COLUMNS")
    }
    env.update({"HOME": str(home), "SECRET_KEY": TEST_SECRET_KEY, "PYTHONUNBUFFERED": "1"})
    if server is not None:
        env["ORCHESTRATOR_URL"] = server.url
        env["ORCHESTRATOR_TOKEN"] = token()
        env["ORCHESTRATOR_DATA_DIR"] = server.env["ORCHESTRATOR_DATA_DIR"]
        env["DATABASE_URL"] = server.env["DATABASE_URL"]
    env.update(extra)
    return env


def run(
    env: dict[str, str], *args: str, timeout: float = 60.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(ORCHESTRATOR), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        check=False,
    )


def ok(env: dict[str, str], *args: str, timeout: float = 60.0) -> str:
    done = run(env, *args, timeout=timeout)
    assert done.returncode == 0, (
        f"orchestrator {' '.join(args)} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
    )
    assert "Traceback" not in done.stderr
    return done.stdout


def ok_json(env: dict[str, str], *args: str, timeout: float = 60.0) -> Any:
    return json.loads(ok(env, *args, "--json", timeout=timeout))


def assert_one_error_line(done: subprocess.CompletedProcess[str], code: int = 1, contains: str = "") -> str:
    """The contract for failures: exit code, one `error:` line on stderr, no traceback, nothing on stdout."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, f"exit {done.returncode}, stderr:\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 1, f"expected one line, got:\n{done.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    assert contains in lines[0], lines[0]
    assert done.stdout == "", done.stdout
    return lines[0]
