"""Configuration: DATABASE_URL forms, quotas, the stored secret, and the production guard."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.core.config import Settings, to_async_url
from tests.support.servers import ServerFactory

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("plain", "async_url"),
    [
        (
            "postgresql://user:pass@localhost/orchestrator",
            "postgresql+asyncpg://user:pass@localhost/orchestrator",
        ),
        ("postgres://user:pass@db:5433/orch", "postgresql+asyncpg://user:pass@db:5433/orch"),
        ("postgresql+asyncpg://u@h/d", "postgresql+asyncpg://u@h/d"),
        ("postgresql+psycopg2://u@h/d", "postgresql+asyncpg://u@h/d"),
        ("sqlite:///relative/orch.db", "sqlite+aiosqlite:///relative/orch.db"),
        ("sqlite:////abs/orch.db", "sqlite+aiosqlite:////abs/orch.db"),
        ("sqlite+aiosqlite:///x.db", "sqlite+aiosqlite:///x.db"),
    ],
)
def test_database_url_forms_map_to_async_drivers(plain: str, async_url: str) -> None:
    assert to_async_url(plain) == async_url
    assert Settings(database_url=plain).async_database_url == async_url


@pytest.mark.parametrize("bad", ["mysql://u@h/d", "http://x", "orchestrator.db"])
def test_unsupported_database_url_is_a_clear_error(bad: str) -> None:
    with pytest.raises(ValueError, match="unsupported DATABASE_URL"):
        to_async_url(bad)


def test_default_database_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    settings = Settings(orchestrator_data_dir=tmp_path / "data", database_url=None)
    assert (
        settings.async_database_url == f"sqlite+aiosqlite:///{(tmp_path / 'data').resolve()}/orchestrator.db"
    )


def test_environment_names_from_the_guide(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)  # no .env here
    for name, value in {
        "DATABASE_URL": "postgresql://user:pass@localhost/orchestrator",
        "ALGORITHM": "HS256",
        "ACCESS_TOKEN_EXPIRE_MINUTES": "45",
        "ALLOWED_ORIGINS": "https://your-frontend.com, https://other.example",
        "HOST": "0.0.0.0",
        "PORT": "9001",
        "WORKERS": "4",
    }.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.async_database_url == "postgresql+asyncpg://user:pass@localhost/orchestrator"
    assert settings.access_token_expire_minutes == 45
    assert settings.cors_origins == ["https://your-frontend.com", "https://other.example"]
    assert (settings.host, settings.port, settings.workers) == ("0.0.0.0", 9001, 4)
    assert settings.public_url == "http://127.0.0.1:9001"


def test_dotenv_file_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("ORCHESTRATOR_QUOTAS=7,3\nACCESS_TOKEN_EXPIRE_MINUTES=5\n")
    settings = Settings()
    assert settings.quotas == [7, 3] and settings.access_token_expire_minutes == 5


@pytest.mark.parametrize(
    ("raw", "quotas"),
    [("10,8,5,3,2,1", [10, 8, 5, 3, 2, 1]), (" 4 , 2 ", [4, 2]), ("3", [3]), ("5,,2,", [5, 2])],
)
def test_quotas_parsing(raw: str, quotas: list[int]) -> None:
    settings = Settings(orchestrator_quotas=raw)
    assert settings.quotas == quotas
    assert settings.max_depth == len(quotas) - 1


def test_default_quotas_are_the_guides() -> None:
    settings = Settings()
    assert settings.quotas == [10, 8, 5, 3, 2, 1] and settings.max_depth == 5


@pytest.mark.parametrize("raw", ["", "0", "10,0,5", "-1", "a,b", "1.5", ","])
def test_invalid_quotas_are_refused(raw: str) -> None:
    with pytest.raises(ValidationError, match="ORCHESTRATOR_QUOTAS"):
        Settings(orchestrator_quotas=raw)


@pytest.mark.parametrize(
    ("base", "count", "message"),
    [(61000, 0, "greater than or equal to 1"), (65000, 1000, "65534"), (2**31 - 3, 4, "below 2\\*\\*31")],
)
def test_sandbox_uid_range_is_checked(base: int, count: int, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(orchestrator_sandbox_uid=base, orchestrator_sandbox_uid_count=count)
    assert Settings().orchestrator_sandbox_uid_count == 4096


PRINT_KEY = "from orchestrator.core.config import get_settings; print(get_settings().signing_key())"


def _env_without_secret(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "DATABASE_URL")}
    env["ORCHESTRATOR_DATA_DIR"] = str(data_dir)
    env["PYTHONPATH"] = str(REPO)
    return env


def test_generated_secret_is_stored_0600_and_shared_by_processes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    env = _env_without_secret(data)
    # Several processes start at once on a fresh data dir: all must end up with the same key.
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PRINT_KEY], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    keys = {p.communicate(timeout=60)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(keys) == 1
    key = keys.pop()
    assert len(key) >= 32
    path = data / "secret_key"
    assert path.read_text().strip() == key
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # A later process reuses it, and so does this one with the same data dir.
    later = subprocess.run(
        [sys.executable, "-c", PRINT_KEY], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert later.stdout.strip() == key
    assert Settings(secret_key=None, orchestrator_data_dir=data).signing_key() == key


def test_an_empty_stored_secret_is_refused_with_what_to_do(tmp_path: Path) -> None:
    """Never sign with an empty key (a key file truncated by a crash of an older version)."""
    (tmp_path / "secret_key").write_text("")
    with pytest.raises(ValueError, match="is empty: delete it"):
        Settings(secret_key=None, orchestrator_data_dir=tmp_path).signing_key()


def test_a_stored_secret_replaced_or_emptied_is_read_again(tmp_path: Path) -> None:
    """The stored key is remembered per file (every token made or checked needs it), but a file
    replaced (an operator rotating the key) or rewritten in place is read again, never served
    from memory; an emptied one is refused as before."""
    settings = Settings(secret_key=None, orchestrator_data_dir=tmp_path)
    first = settings.signing_key()
    assert settings.signing_key() == first
    path = tmp_path / "secret_key"
    path.unlink()
    path.write_text("a-rotated-key-" + "x" * 40)
    assert settings.signing_key() == "a-rotated-key-" + "x" * 40
    path.write_text("rewritten-in-place-" + "y" * 40)  # same inode, other size
    assert settings.signing_key() == "rewritten-in-place-" + "y" * 40
    path.write_text("")
    with pytest.raises(ValueError, match="is empty"):
        settings.signing_key()


def test_a_token_from_another_process_verifies_in_the_server(servers: ServerFactory, tmp_path: Path) -> None:
    """The guide's flow without SECRET_KEY: the server generates the key, a script signs with it."""
    server = servers.make(ORCHESTRATOR_ENGINE="false")
    del server.env["SECRET_KEY"]
    server.start()
    assert (Path(server.env["ORCHESTRATOR_DATA_DIR"]) / "secret_key").exists()
    assert "SECRET_KEY is not set" in server.log()
    script = (
        "from orchestrator.core.auth import create_access_token;"
        "print(create_access_token(user_id='test-user', scopes=['jobs:read']))"
    )
    env = _env_without_secret(Path(server.env["ORCHESTRATOR_DATA_DIR"]))
    token = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert token.returncode == 0, token.stderr
    import httpx

    headers = {"Authorization": f"Bearer {token.stdout.strip()}"}
    assert httpx.get(f"{server.url}/api/jobs", headers=headers).status_code == 200
    # and the suite's key (a different one) is refused by this server
    with server.client() as c:
        assert c.get("/api/jobs").status_code == 401


@pytest.mark.parametrize("secret", ["", "too-short-secret"])
def test_production_without_a_real_secret_refuses_to_start(servers: ServerFactory, secret: str) -> None:
    server = servers.make(ORCHESTRATOR_ENGINE="false", ENVIRONMENT="production", SECRET_KEY=secret)
    with pytest.raises(RuntimeError, match="server exited"):
        server.start(timeout=30)
    assert server.process is not None and server.process.returncode not in (0, None)
    log = server.log()
    assert "ENVIRONMENT=production needs SECRET_KEY set to at least 32 bytes" in log


def test_production_with_a_real_secret_starts(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_ENGINE="false", ENVIRONMENT="production", SECRET_KEY="s" * 32)
    import httpx

    assert httpx.get(f"{server.url}/health").status_code == 200
