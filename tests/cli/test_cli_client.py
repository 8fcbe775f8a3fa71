"""The CLI against a real server without an engine: jobs stay PENDING, so every output is stable."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.core.auth import ALL_SCOPES, decode_access_token
from tests.cli.support import assert_one_error_line, cli_env, ok, ok_json, run
from tests.support.servers import Server, ServerFactory, free_port, server_factory, token


@pytest.fixture(scope="module")
def idle_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with server_factory(tmp_path_factory.mktemp("cli-idle")) as factory:
        yield factory.start(ORCHESTRATOR_ENGINE="false")


@pytest.fixture
def env(idle_server: Server, tmp_path: Path) -> dict[str, str]:
    return cli_env(tmp_path, idle_server)


def test_help_lists_every_command(tmp_path: Path) -> None:
    out = ok(cli_env(tmp_path), "--help")
    for command in (
        "submit", "jobs", "job", "workers", "logs", "cancel", "pause", "resume", "terminate",
        "quotas", "usage", "events", "serve", "engine", "db", "openapi", "token", "gc", "demo", "login",
    ):  # fmt: skip
        assert f" {command} " in out, command


def test_token_round_trip(env: dict[str, str], idle_server: Server) -> None:
    default = decode_access_token(ok(env, "token").strip())
    assert default.user_id == "admin"
    assert set(ALL_SCOPES) <= default.scopes
    narrow = ok(env, "token", "--user", "alice", "--scope", "jobs:read", "--expires-minutes", "5").strip()
    claims = decode_access_token(narrow)
    assert claims.user_id == "alice" and "jobs:read" in claims.scopes and "jobs:write" not in claims.scopes
    assert claims.raw["exp"] - claims.raw["iat"] == 300
    # The server accepts it for what it grants.
    data = ok_json({**env, "ORCHESTRATOR_TOKEN": narrow}, "jobs")
    assert "jobs" in data


def test_token_hint_explains_how_to_use_it(env: dict[str, str]) -> None:
    out = ok(env, "token", "--hint")
    assert "ORCHESTRATOR_TOKEN" in out and "token)" in out and "/docs" in out


def test_token_unknown_scope_is_a_usage_error(env: dict[str, str]) -> None:
    assert_one_error_line(run(env, "token", "--scope", "jobs:everything"), code=2, contains="jobs:everything")


def test_connection_refused(env: dict[str, str]) -> None:
    done = run({**env, "ORCHESTRATOR_URL": f"http://127.0.0.1:{free_port()}"}, "jobs")
    assert_one_error_line(done, contains="connection refused")


def test_bad_token_is_401(env: dict[str, str]) -> None:
    assert_one_error_line(run({**env, "ORCHESTRATOR_TOKEN": "not-a-jwt"}, "jobs"), contains="(401)")


def test_missing_token_says_how_to_get_one(env: dict[str, str]) -> None:
    without = {k: v for k, v in env.items() if k != "ORCHESTRATOR_TOKEN"}
    assert_one_error_line(run(without, "jobs"), contains="ORCHESTRATOR_TOKEN")


def test_too_few_scopes_is_403(env: dict[str, str]) -> None:
    narrow = token(["jobs:read"])
    line = assert_one_error_line(run({**env, "ORCHESTRATOR_TOKEN": narrow}, "quotas"), contains="(403)")
    assert "resources:read" in line


def test_unknown_job_is_404(env: dict[str, str]) -> None:
    assert_one_error_line(run(env, "job", "j_000000000000"), contains="(404)")
    assert_one_error_line(run(env, "cancel", "j_000000000000"), contains="(404)")
    assert_one_error_line(run(env, "logs", "w_000000000000"), contains="(404)")


def test_validation_errors_are_field_lines(env: dict[str, str]) -> None:
    line = assert_one_error_line(run(env, "submit", "too many", "--workers", "999"), contains="(422)")
    assert "worker_count:" in line
    line = assert_one_error_line(run(env, "submit", " "), contains="(422)")
    assert "task_description:" in line


def test_bad_transition_is_400(env: dict[str, str]) -> None:
    job_id = ok(env, "submit", "to cancel", "-q").strip()
    assert "CANCELED" in ok(env, "cancel", job_id)
    assert_one_error_line(run(env, "cancel", job_id), contains="(400)")


def test_usage_errors_exit_2(env: dict[str, str]) -> None:
    assert_one_error_line(run(env, "jobs", "--status", "bogus"), code=2, contains="--status")
    assert_one_error_line(run(env, "submit", "x", "--option", "novalue"), code=2, contains="key=value")
    assert_one_error_line(run(env, "nosuchcommand"), code=2, contains="nosuchcommand")
    assert_one_error_line(run({**env, "ORCHESTRATOR_URL": "ftp://x"}, "jobs"), code=2, contains="URL")


def test_submit_jobs_job_cancel_outputs(env: dict[str, str]) -> None:
    job = ok_json(
        env, "submit", "Build the thing", "--workers", "2", "--priority", "3", "-o", "duration_seconds=1"
    )
    assert job["status"] == "PENDING" and job["worker_count"] == 2 and job["priority"] == 3
    assert job["agent_options"]["duration_seconds"] == 1
    child = ok_json(env, "submit", "A part of it", "--parent", job["id"])
    assert child["depth"] == 1 and child["parent_job_id"] == job["id"]

    listed = ok_json(env, "jobs", "--limit", "1000")
    assert {job["id"], child["id"]} <= {j["id"] for j in listed["jobs"]}
    assert [j["id"] for j in ok_json(env, "jobs", "--parent", job["id"])["jobs"]] == [child["id"]]
    assert all(j["depth"] == 1 for j in ok_json(env, "jobs", "--depth", "1")["jobs"])
    assert all(j["status"] == "PENDING" for j in ok_json(env, "jobs", "--status", "pending")["jobs"])
    table = ok(env, "jobs")
    assert job["id"] in table and "PENDING" in table and "Build the thing" in table

    shown = ok_json(env, "job", job["id"])
    assert shown["job"]["id"] == job["id"]
    assert [d["id"] for d in shown["descendants"]] == [child["id"]]
    assert shown["workers"] == []
    tree = ok(env, "job", job["id"])
    assert job["id"] in tree and child["id"] in tree and "Build the thing" in tree

    events = ok_json(env, "events", job["id"])
    assert events["job_id"] == job["id"] and events["events"][0]["to_status"] == "PENDING"
    assert "PENDING" in ok(env, "events", job["id"])

    canceled = ok_json(env, "cancel", job["id"])
    assert canceled["status"] == "CANCELED"
    assert ok_json(env, "job", child["id"])["job"]["status"] == "CANCELED"
    assert ok_json(env, "workers", "--job", job["id"])["workers"] == []
    assert "No workers match." in ok(env, "workers", "--job", job["id"])


def test_submit_quiet_prints_only_the_id(env: dict[str, str]) -> None:
    out = ok(env, "submit", "quiet one", "-q").strip()
    assert out.startswith("j_") and len(out) == 14


def test_quotas_and_usage(env: dict[str, str], idle_server: Server) -> None:
    with idle_server.client() as http:
        assert ok_json(env, "quotas") == http.get("/api/resources/quotas").json()
        cli_usage, api_usage = ok_json(env, "usage"), http.get("/api/resources/usage").json()
    # The host's free memory moves between two reads: the capacity block is compared by its shape.
    assert cli_usage["usage"] == api_usage["usage"]
    assert cli_usage["capacity"].keys() == api_usage["capacity"].keys()
    assert cli_usage["capacity"]["host"] == api_usage["capacity"]["host"]
    quotas = ok(env, "quotas")
    assert "MAX WORKERS" in quotas and len(quotas.strip().splitlines()) == 7
    usage = ok(env, "usage")
    assert "ALLOCATED" in usage and "slots in use" in usage


def test_login_writes_a_private_config_and_is_used(
    env: dict[str, str], idle_server: Server, tmp_path: Path
) -> None:
    bare = {k: v for k, v in env.items() if k not in ("ORCHESTRATOR_URL", "ORCHESTRATOR_TOKEN")}
    assert_one_error_line(run(bare, "login", "--url", idle_server.url, "--token", "bad"), contains="(401)")
    path = tmp_path / ".config" / "orchestrator" / "config.json"
    assert not path.exists()

    good = token()
    assert "Saved" in ok(bare, "login", "--url", idle_server.url, "--token", good)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"url": idle_server.url, "token": good}
    assert "jobs" in ok_json(bare, "jobs")  # neither flag nor environment: the config file
    ok(bare, "logout")
    assert "token" not in json.loads(path.read_text())
    assert_one_error_line(run(bare, "jobs"), contains="(401)")


def test_flags_override_environment(env: dict[str, str], idle_server: Server) -> None:
    wrong = {**env, "ORCHESTRATOR_URL": f"http://127.0.0.1:{free_port()}", "ORCHESTRATOR_TOKEN": "bad"}
    assert "quotas" in ok_json(wrong, "quotas", "--url", idle_server.url, "--token", token())


def test_openapi_is_export_openapi(env: dict[str, str], tmp_path: Path) -> None:
    from orchestrator.api.main import export_openapi

    expected = export_openapi()
    assert ok(env, "openapi") == expected
    ok(env, "openapi", "--output", str(tmp_path / "openapi.json"))
    assert (tmp_path / "openapi.json").read_text() == expected


def test_db_upgrade_is_idempotent(tmp_path: Path) -> None:
    env = cli_env(tmp_path, ORCHESTRATOR_DATA_DIR=str(tmp_path / "data"))
    for _ in range(2):
        assert "Database ready" in ok(env, "db", "upgrade")
    assert (tmp_path / "data" / "orchestrator.db").exists()


def test_a_fresh_factory_server_works_too(servers: ServerFactory, tmp_path: Path) -> None:
    """`ORCHESTRATOR_URL` + token from `orchestrator token` with the server's settings: the README path."""
    server = servers.start(ORCHESTRATOR_ENGINE="false")
    env = cli_env(tmp_path, server)
    env["ORCHESTRATOR_TOKEN"] = ok(env, "token").strip()
    assert ok_json(env, "workers")["workers"] == []
