"""Smoke tests: the REAL ``claude`` CLI against the fake Anthropic Messages API, fully offline.

The CLI is installed by ``tests/fakes/install_claude.sh`` into ``.tools/claude`` (run on demand by the
``claude_bin`` fixture). If it cannot be installed the tests FAIL with the reason; they never skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .fake_anthropic import (
    EXHAUSTED_TEXT,
    FakeAnthropic,
    error,
    fail_first,
    reply,
    text,
    text_block,
    tool_result_texts,
    tool_use,
    tool_use_block,
    turn_of,
)
from .install import installed_cli

HERE = Path(__file__).resolve().parent
ECHO_MCP_SERVER = HERE / "echo_mcp_server.py"


# --------------------------------------------------------------------------------------------------
# Harness
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def claude_bin() -> Path:
    """Path of the real claude binary; installs it if needed. Fails (never skips) if that is impossible."""
    return installed_cli("claude")


@dataclass
class ClaudeRun:
    returncode: int
    lines: list[dict[str, Any]]
    stdout: str
    stderr: str
    duration: float

    @property
    def result(self) -> dict[str, Any]:
        results = [x for x in self.lines if x.get("type") == "result"]
        assert results, f"no result line.\nstdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}"
        return results[-1]

    @property
    def init(self) -> dict[str, Any]:
        return next(x for x in self.lines if x.get("type") == "system" and x.get("subtype") == "init")

    def of_type(self, type_: str, subtype: str | None = None) -> list[dict[str, Any]]:
        return [
            x
            for x in self.lines
            if x.get("type") == type_ and (subtype is None or x.get("subtype") == subtype)
        ]

    def describe(self) -> str:
        return f"exit={self.returncode} in {self.duration:.2f}s\nstdout:\n{self.stdout[-4000:]}\nstderr:\n{self.stderr[-2000:]}"


def claude_env(fake: FakeAnthropic, home: Path, **extra: str) -> dict[str, str]:
    """A minimal, hermetic environment: nothing of the developer's own Claude setup leaks in."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "HOME": str(home),
        "CLAUDE_CONFIG_DIR": str(home / ".claude"),
        "ANTHROPIC_BASE_URL": fake.url,
        "ANTHROPIC_API_KEY": "test-key",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "IS_SANDBOX": "1",  # needed as root for --permission-mode bypassPermissions
    }
    env.update(extra)
    return env


def run_claude(
    claude: Path,
    fake: FakeAnthropic,
    tmp: Path,
    prompt: str,
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 120,
) -> ClaudeRun:
    home = tmp / "home"
    home.mkdir(exist_ok=True)
    cwd = cwd or (tmp / "work")
    cwd.mkdir(exist_ok=True)
    cmd = [str(claude), "-p", prompt, "--output-format", "stream-json", "--verbose", *args]
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            cmd,
            cwd=cwd,
            env=claude_env(fake, home, **(env or {})),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(
            f"claude did not finish in {timeout}s: {cmd}\nstdout:\n{e.stdout!r}\nstderr:\n{e.stderr!r}"
        )
    dt = time.monotonic() - t0
    lines = []
    for raw in proc.stdout.splitlines():
        raw = raw.strip()
        if raw:
            try:
                lines.append(json.loads(raw))
            except ValueError:
                pytest.fail(f"non-JSON line on stdout: {raw[:500]!r}")
    return ClaudeRun(proc.returncode, lines, proc.stdout, proc.stderr, dt)


# --------------------------------------------------------------------------------------------------
# The fake alone (no CLI): protocol shapes
# --------------------------------------------------------------------------------------------------


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        url + "/v1/messages?beta=true",
        data=json.dumps(body).encode(),
        headers={"content-type": "application/json", "x-api-key": "k"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _sse_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for chunk in raw.decode().split("\n\n"):
        if not chunk.strip():
            continue
        fields = dict(line.split(": ", 1) for line in chunk.splitlines())
        out.append((fields["event"], json.loads(fields["data"])))
    return out


def test_fake_protocol_shapes() -> None:
    tools = [{"name": "X", "input_schema": {"type": "object"}}]
    script = [tool_use("X", {"a": [1, 2, "é"]}, text="thinking aloud"), text("done")]
    with FakeAnthropic(script) as fake:
        # HEAD / and GET / answer 200
        for method in ("HEAD", "GET"):
            with urllib.request.urlopen(
                urllib.request.Request(fake.url + "/", method=method), timeout=5
            ) as r:
                assert r.status == 200

        # turn 0: streamed text + tool_use
        status, headers, raw = _post(
            fake.url,
            {"model": "m", "stream": True, "tools": tools, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
        events = _sse_events(raw)
        names = [e for e, _ in events]
        assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
        assert [d["content_block"]["type"] for e, d in events if e == "content_block_start"] == [
            "text",
            "tool_use",
        ]
        partial = "".join(
            d["delta"]["partial_json"]
            for e, d in events
            if e == "content_block_delta" and d["delta"]["type"] == "input_json_delta"
        )
        assert json.loads(partial) == {"a": [1, 2, "é"]}
        delta = next(d for e, d in events if e == "message_delta")
        assert delta["delta"]["stop_reason"] == "tool_use" and delta["usage"]["output_tokens"] > 0
        assert next(d for e, d in events if e == "message_start")["message"]["usage"]["input_tokens"] > 0

        # turn 1 (one assistant message in the history), not streamed: plain JSON message
        history = [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "x"},
            {"role": "user", "content": "y"},
        ]
        status, _, raw = _post(fake.url, {"model": "m", "stream": False, "tools": tools, "messages": history})
        msg = json.loads(raw)
        assert (
            status == 200
            and msg["content"] == [{"type": "text", "text": "done"}]
            and msg["stop_reason"] == "end_turn"
        )

        # a side request (no tools) gets a harmless answer and consumes no step
        status, _, raw = _post(
            fake.url, {"model": "m", "stream": False, "messages": [{"role": "user", "content": "title?"}]}
        )
        assert status == 200 and json.loads(raw)["content"][0]["type"] == "text"

        # past the end of the script
        history2 = [*history, {"role": "assistant", "content": "z"}, {"role": "user", "content": "w"}]
        _, _, raw = _post(fake.url, {"model": "m", "stream": False, "tools": tools, "messages": history2})
        assert json.loads(raw)["content"][0]["text"] == EXHAUSTED_TEXT
        assert fake.problems == ["script exhausted at turn 2"]

        assert [r.kind for r in fake.requests] == ["probe", "probe", "main", "main", "side", "main"]
        assert [r.turn for r in fake.main_requests] == [0, 1, 2]

    # errors and fail_first
    with FakeAnthropic(fail_first(2, [text("ok")], status=529, headers={"retry-after": "0"})) as fake:
        body = {"model": "m", "stream": True, "tools": tools, "messages": [{"role": "user", "content": "hi"}]}
        for _ in range(2):
            status, headers, raw = _post(fake.url, body)
            assert status == 529 and headers["retry-after"] == "0"
            assert json.loads(raw)["error"]["type"] == "overloaded_error"
        status, _, raw = _post(fake.url, body)
        assert status == 200 and next(e for e, _ in _sse_events(raw)) == "message_start"


# --------------------------------------------------------------------------------------------------
# The real CLI
# --------------------------------------------------------------------------------------------------


def test_a_write_tool_creates_file(claude_bin: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    target = work / "hello.txt"
    script = [
        tool_use(
            "Write", {"file_path": str(target), "content": "hello from the fake\n"}, text="Writing the file."
        ),
        text("Created hello.txt."),
    ]
    with FakeAnthropic(script) as fake:
        run = run_claude(
            claude_bin, fake, tmp_path, "Create hello.txt", "--permission-mode", "bypassPermissions"
        )
    assert run.returncode == 0, run.describe()
    assert target.read_text() == "hello from the fake\n"

    res = run.result
    assert res["subtype"] == "success" and res["is_error"] is False, run.describe()
    assert res["result"] == "Created hello.txt."
    assert res["total_cost_usd"] > 0
    assert res["usage"]["input_tokens"] > 0 and res["usage"]["output_tokens"] > 0
    assert res["num_turns"] == 2
    assert res["permission_denials"] == []
    assert run.init["cwd"] == str(work)
    assert run.init["session_id"] == res["session_id"]

    # one stream-json "assistant" line per content block; the tool result comes back as a "user" line
    blocks = [b for line in run.of_type("assistant") for b in line["message"]["content"]]
    assert [b["type"] for b in blocks] == ["text", "tool_use", "text"]
    results = [
        b
        for line in run.of_type("user")
        for b in line["message"]["content"]
        if b.get("type") == "tool_result"
    ]
    assert len(results) == 1 and not results[0].get("is_error")

    # what the fake saw: two main requests, the second carries the tool_result
    assert [r.turn for r in fake.main_requests] == [0, 1]
    assert all(r.path.startswith("/v1/messages") for r in fake.message_requests)
    first = fake.main_requests[0]
    assert first.headers["x-api-key"] == "test-key" and first.stream is True
    assert "Write" in [t["name"] for t in first.body["tools"]]
    assert str(work) in json.dumps(first.body)  # "Primary working directory: <cwd>"
    assert any("File created successfully" in t for t in tool_result_texts(fake.main_requests[1].body))
    assert fake.problems == []


def test_b_mcp_tool_runs(claude_bin: Path, tmp_path: Path) -> None:
    marker = tmp_path / "mcp-marker.txt"
    cfg = tmp_path / "mcp.json"
    cfg.write_text(
        json.dumps(
            {
                "mcpServers": {
                    "echo": {
                        "type": "stdio",
                        "command": sys.executable,
                        "args": [str(ECHO_MCP_SERVER)],
                        "env": {"ECHO_MCP_MARKER": str(marker)},
                    }
                }
            }
        )
    )
    script = [tool_use("mcp__echo__echo", {"text": "ping-42"}), text("The echo server answered.")]
    with FakeAnthropic(script) as fake:
        run = run_claude(
            claude_bin,
            fake,
            tmp_path,
            "Call the echo tool with ping-42",
            "--mcp-config",
            str(cfg),
            "--strict-mcp-config",
            "--permission-mode",
            "bypassPermissions",
            env={
                "MCP_CONNECTION_NONBLOCKING": "false",  # wait for the server before the first request
                "MCP_CONNECT_TIMEOUT_MS": "20000",
                "ENABLE_TOOL_SEARCH": "false",  # put MCP tool schemas in `tools` instead of deferring them
            },
        )
    assert run.returncode == 0, run.describe()
    assert [(s["name"], s["status"]) for s in run.init["mcp_servers"]] == [("echo", "connected")], run.init
    assert "mcp__echo__echo" in run.init["tools"]

    # the tool really ran in the MCP server process
    assert marker.read_text() == "ping-42\n"

    # the model was offered the tool, and the tool's result reached the next model request
    assert "mcp__echo__echo" in [t["name"] for t in fake.main_requests[0].body["tools"]]
    assert [r.turn for r in fake.main_requests] == [0, 1]
    assert "echo: ping-42" in tool_result_texts(fake.main_requests[1].body)

    res = run.result
    assert res["is_error"] is False and res["result"] == "The echo server answered.", run.describe()
    assert res["total_cost_usd"] > 0


def test_c_overloaded_529_fails_after_bounded_retries(claude_bin: Path, tmp_path: Path) -> None:
    with FakeAnthropic(lambda req: error(529)) as fake:
        run = run_claude(claude_bin, fake, tmp_path, "hello", env={"CLAUDE_CODE_MAX_RETRIES": "2"})
    assert run.returncode == 1, run.describe()
    res = run.result
    assert res["is_error"] is True and res["api_error_status"] == 529, run.describe()
    assert res["subtype"] == "success"  # failure is signalled by is_error, not subtype
    assert res["terminal_reason"] == "api_error"
    assert res["total_cost_usd"] == 0
    assert "529" in res["result"]

    # 1 try + CLAUDE_CODE_MAX_RETRIES retries, each announced by a system/api_retry line
    assert len(fake.main_requests) == 3
    retries = run.of_type("system", "api_retry")
    assert [r["attempt"] for r in retries] == [1, 2]
    assert all(
        r["max_retries"] == 2 and r["error_status"] == 529 and r["retry_delay_ms"] > 0 for r in retries
    )
    # exponential backoff: the waits are ~0.5 s then ~1 s (plus jitter)
    times = [r.time for r in fake.main_requests]
    assert times[1] - times[0] >= 0.4 and times[2] - times[1] >= 0.8


def test_c2_recovers_after_transient_529s(claude_bin: Path, tmp_path: Path) -> None:
    script = fail_first(2, [text("recovered")], status=529)
    with FakeAnthropic(script) as fake:
        run = run_claude(claude_bin, fake, tmp_path, "hello", env={"CLAUDE_CODE_MAX_RETRIES": "3"})
    assert run.returncode == 0, run.describe()
    assert run.result["is_error"] is False and run.result["result"] == "recovered"
    assert [r.status for r in fake.main_requests] == [529, 529, 200]
    assert len(run.of_type("system", "api_retry")) == 2


def test_d_max_turns(claude_bin: Path, tmp_path: Path) -> None:
    def keep_calling_tools(req: dict[str, Any]) -> Any:
        return tool_use("Bash", {"command": f"echo turn-{turn_of(req)}", "description": "echo"})

    with FakeAnthropic(keep_calling_tools) as fake:
        run = run_claude(
            claude_bin,
            fake,
            tmp_path,
            "loop forever",
            "--max-turns",
            "1",
            "--permission-mode",
            "bypassPermissions",
        )
    assert run.returncode == 1, run.describe()
    res = run.result
    assert res["subtype"] == "error_max_turns" and res["is_error"] is True, run.describe()
    assert res["terminal_reason"] == "max_turns"
    assert res["errors"] == ["Reached maximum number of turns (1)"]
    # the one permitted turn ran its tool, then the CLI stopped without asking the model again
    assert len(fake.main_requests) == 1
    outputs = [
        b.get("content")
        for line in run.of_type("user")
        for b in line["message"]["content"]
        if b.get("type") == "tool_result"
    ]
    assert outputs == ["turn-0"]


def test_e_resume(claude_bin: Path, tmp_path: Path) -> None:
    with FakeAnthropic([text("The code word is ALPHA.")]) as fake1:
        first = run_claude(claude_bin, fake1, tmp_path, "Remember the code word ALPHA")
    assert first.returncode == 0, first.describe()
    sid = first.result["session_id"]

    with FakeAnthropic(lambda req: text(f"You said ALPHA (turn {turn_of(req)}).")) as fake2:
        second = run_claude(claude_bin, fake2, tmp_path, "What was the code word?", "--resume", sid)
    assert second.returncode == 0, second.describe()
    assert second.result["session_id"] == sid  # --resume continues the same session id
    assert second.result["result"] == "You said ALPHA (turn 1)."
    req = fake2.main_requests[0].body
    roles = [m["role"] for m in req["messages"] if m["role"] != "system"]
    assert roles == ["user", "assistant", "user"]
    flat = json.dumps(req["messages"])
    assert (
        "Remember the code word ALPHA" in flat
        and "The code word is ALPHA." in flat
        and "What was the code word?" in flat
    )


def test_e2_resume_unknown_session_fails(claude_bin: Path, tmp_path: Path) -> None:
    with FakeAnthropic([text("never")]) as fake:
        run = run_claude(claude_bin, fake, tmp_path, "hi", "--resume", "00000000-0000-4000-8000-000000000000")
    assert run.returncode == 1, run.describe()
    assert run.result["is_error"] is True
    assert any("No conversation found" in e for e in run.result.get("errors", []))
    assert fake.message_requests == []


def test_reply_with_parallel_tool_calls(claude_bin: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    step = reply(
        text_block("Writing two files."),
        tool_use_block("Write", {"file_path": str(work / "a.txt"), "content": "A"}),
        tool_use_block("Write", {"file_path": str(work / "b.txt"), "content": "B"}),
    )
    with FakeAnthropic([step, text("both written")]) as fake:
        run = run_claude(
            claude_bin, fake, tmp_path, "write a and b", "--permission-mode", "bypassPermissions"
        )
    assert run.returncode == 0, run.describe()
    assert (work / "a.txt").read_text() == "A" and (work / "b.txt").read_text() == "B"
    assert len(tool_result_texts(fake.main_requests[1].body)) == 2
    assert run.result["result"] == "both written"


def test_f_permission_denial_is_not_a_failure(claude_bin: Path, tmp_path: Path) -> None:
    """Default permission mode in -p: Write is refused, yet the run 'succeeds'; only permission_denials tells."""
    work = tmp_path / "work"
    work.mkdir()
    script = [tool_use("Write", {"file_path": str(work / "x.txt"), "content": "x"}), text("Done.")]
    with FakeAnthropic(script) as fake:
        run = run_claude(claude_bin, fake, tmp_path, "write x.txt")
    assert run.returncode == 0, run.describe()
    assert not (work / "x.txt").exists()
    res = run.result
    assert res["subtype"] == "success" and res["is_error"] is False
    assert [d["tool_name"] for d in res["permission_denials"]] == ["Write"]
    refusal = tool_result_texts(fake.main_requests[1].body)
    assert len(refusal) == 1 and "permission" in refusal[0]


def test_g_overload_mid_stream_is_retried(claude_bin: Path, tmp_path: Path) -> None:
    """HTTP 200 + SSE `error` event after message_start: the CLI retries the request (no api_retry line)."""
    calls = []

    def cut_once(req: dict[str, Any]) -> Any:
        calls.append(1)
        return error(529, mid_stream=True) if len(calls) == 1 else text("ok after the cut")

    with FakeAnthropic(cut_once) as fake:
        run = run_claude(claude_bin, fake, tmp_path, "hi", env={"CLAUDE_CODE_MAX_RETRIES": "2"})
    assert run.returncode == 0, run.describe()
    assert run.result["result"] == "ok after the cut"
    assert [(r.stream, r.turn) for r in fake.main_requests] == [(True, 0), (True, 0)]
    assert run.of_type("system", "api_retry") == []
