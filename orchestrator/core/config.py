"""Settings read from the environment (and `.env`), the names the API guide documents."""

from __future__ import annotations

import logging
import os
import secrets
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger(__name__)

DEFAULT_QUOTAS = "10,8,5,3,2,1"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", case_sensitive=False)

    database_url: str | None = None
    secret_key: str | None = None
    algorithm: str = "HS256"
    access_token_expire_minutes: int = Field(default=30, ge=1)
    allowed_origins: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1
    environment: str = "development"

    orchestrator_data_dir: Path = Path(".orchestrator")
    orchestrator_quotas: str = DEFAULT_QUOTAS
    orchestrator_repo_roots: str = ""
    orchestrator_terminate_grace_seconds: float = Field(default=10.0, ge=0)
    orchestrator_engine: bool = True
    orchestrator_public_url: str | None = None
    orchestrator_agents_file: Path | None = None
    # Workers on remote nodes (workspaces/remote.py): the bare git repository the nodes clone
    # from and push to, unless the repository's own `git_remote` (server TOML) names another.
    orchestrator_git_remote: str | None = None
    orchestrator_default_agent: str = "simulated"
    orchestrator_engine_lease_seconds: float = Field(default=15.0, gt=0)
    orchestrator_poll_seconds: float = Field(default=1.0, gt=0)
    orchestrator_sse_poll_seconds: float = Field(default=0.25, gt=0)
    orchestrator_sse_idle_poll_seconds: float = Field(default=5.0, gt=0)
    orchestrator_sse_ping_seconds: float = Field(default=10.0, gt=0)
    orchestrator_log_format: Literal["text", "json"] | None = None
    # Request line + headers (431 over it) and request bodies (413 over it), checked before
    # authentication or parsing (orchestrator/api/limits.py).
    orchestrator_max_header_bytes: int = Field(default=64 * 1024, ge=1024)
    orchestrator_max_body_bytes: int = Field(default=2 * 1024 * 1024, ge=1024)
    # Real coding agents (docs/claude-code-workers.md): CLI paths (or names looked up on PATH).
    orchestrator_claude_bin: str = "claude"
    orchestrator_codex_bin: str = "codex"
    # Retries an agent CLI makes by itself before reporting an API error; the governor does the rest.
    orchestrator_agent_max_retries: int = Field(default=2, ge=0, le=15)
    orchestrator_mcp_connect_timeout_ms: int = Field(default=30_000, ge=1000)
    # Rate-limit governor: first backoff, cap, and how many times one worker is resumed.
    orchestrator_rate_limit_backoff_seconds: float = Field(default=10.0, gt=0)
    orchestrator_rate_limit_max_backoff_seconds: float = Field(default=300.0, gt=0)
    orchestrator_rate_limit_max_resumes: int = Field(default=8, ge=0)
    # The worker sandbox (docs/SANDBOX.md): "on" (default; workers fail with the reason if it
    # cannot work here) or "off" (unconfined workers: a warning at start-up, shown in /ready).
    orchestrator_sandbox: Literal["on", "off"] = "on"
    # When the server runs as root, each live worker's agent runs as a host uid of its own, leased
    # per host from ORCHESTRATOR_SANDBOX_UID … + ORCHESTRATOR_SANDBOX_UID_COUNT - 1.
    orchestrator_sandbox_uid: int = Field(default=61000, ge=1, le=2**31 - 2)
    orchestrator_sandbox_uid_count: int = Field(default=4096, ge=1, le=2**24)
    # The sandbox's network guard (executors/netguard.py): "on" (default; sandboxed agents cannot
    # reach this host's own services; workers fail with the reason if it cannot be set up) or
    # "off" (an explicit choice: a warning at start-up, shown in /ready).
    orchestrator_sandbox_network_guard: Literal["on", "off"] = "on"
    # Memory-aware admission: memory kept free beyond the running workers' limits.
    orchestrator_memory_headroom_mb: int = Field(default=512, ge=0)
    # Where available memory is read (`MemAvailable:`): /proc/meminfo, or a file an operator
    # (or a test) keeps to admit against a smaller figure than the host's.
    orchestrator_meminfo_path: Path = Path("/proc/meminfo")
    # Where workers run (docs/deploy.md): "local" (this host) or "ray" (actors on the Ray cluster
    # at RAY_ADDRESS; needs the `ray` extra).
    orchestrator_executor: Literal["local", "ray"] = "local"
    ray_address: str | None = None
    # How long running Ray workers stay RUNNING while the cluster's head (GCS) is unreachable
    # before they are declared lost: Ray's own default for a node's raylet to give up on the GCS.
    ray_head_grace_seconds: float = Field(default=60.0, gt=0)
    # How long a Ray worker's actor may leave a poll unanswered, its node alive (a hung or stopped
    # actor process), before the worker is declared lost and the actor killed.
    ray_actor_silence_seconds: float = Field(default=60.0, gt=0)

    @model_validator(mode="after")
    def _check_uid_range(self) -> Settings:
        last = self.orchestrator_sandbox_uid + self.orchestrator_sandbox_uid_count - 1
        if last > 2**31 - 2:
            raise ValueError(
                "ORCHESTRATOR_SANDBOX_UID + ORCHESTRATOR_SANDBOX_UID_COUNT - 1 must be below 2**31 - 1"
            )
        if self.orchestrator_sandbox_uid <= 65534 <= last:
            raise ValueError("the sandbox uid range must not hold 65534 (nobody, shared by other services)")
        return self

    @field_validator("orchestrator_quotas")
    @classmethod
    def _check_quotas(cls, value: str) -> str:
        parts = [p.strip() for p in value.split(",") if p.strip()]
        if not parts or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError("ORCHESTRATOR_QUOTAS must be a comma-separated list of positive integers")
        return ",".join(parts)

    @property
    def quotas(self) -> list[int]:
        return [int(p) for p in self.orchestrator_quotas.split(",")]

    @property
    def max_depth(self) -> int:
        return len(self.quotas) - 1

    @property
    def data_dir(self) -> Path:
        return self.orchestrator_data_dir.resolve()

    @property
    def cors_origins(self) -> list[str]:
        return [o.strip() for o in self.allowed_origins.split(",") if o.strip()]

    @property
    def repo_roots(self) -> list[Path]:
        roots = [Path(r).resolve() for r in self.orchestrator_repo_roots.split(os.pathsep) if r.strip()]
        return roots or [Path.cwd().resolve()]

    @property
    def public_url(self) -> str:
        """ORCHESTRATOR_PUBLIC_URL, else HOST:PORT. The API hands workers the address it really
        listens on instead (core/address.py); this is for processes without a socket of their
        own: `orchestrator engine`, the hint `make run` prints."""
        if self.orchestrator_public_url:
            return self.orchestrator_public_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}"

    @property
    def async_database_url(self) -> str:
        return to_async_url(self.database_url or f"sqlite:///{self.data_dir / 'orchestrator.db'}")

    @property
    def sqlite_file(self) -> Path | None:
        """The SQLite database file, if the database is one (None for PostgreSQL or in-memory)."""
        from sqlalchemy.engine import make_url

        url = make_url(self.async_database_url)
        if not url.drivername.startswith("sqlite") or not url.database or url.database == ":memory:":
            return None
        return Path(url.database).resolve()

    @property
    def is_production(self) -> bool:
        return self.environment.lower() in ("production", "prod")

    def signing_key(self) -> str:
        """The JWT key: SECRET_KEY, else one generated once and kept (0600) in the data dir."""
        if self.secret_key:
            return self.secret_key
        return _stored_secret(self.data_dir)


def to_async_url(url: str) -> str:
    """Map the guide's plain URLs to the async drivers SQLAlchemy needs."""
    for prefix, driver in (
        ("postgresql+asyncpg://", "postgresql+asyncpg://"),
        ("postgresql://", "postgresql+asyncpg://"),
        ("postgres://", "postgresql+asyncpg://"),
        ("postgresql+psycopg2://", "postgresql+asyncpg://"),
        ("sqlite+aiosqlite://", "sqlite+aiosqlite://"),
        ("sqlite://", "sqlite+aiosqlite://"),
    ):
        if url.startswith(prefix):
            return driver + url[len(prefix) :]
    raise ValueError(
        f"unsupported DATABASE_URL scheme: {url.split(':', 1)[0]!r} (use postgresql:// or sqlite://)"
    )


def _stored_secret(data_dir: Path) -> str:
    """The generated key, shared by every process using `data_dir`. It is written to a private
    temporary file and then hard-linked into place, so no process ever reads it half-written,
    and of processes starting together exactly one key wins."""
    path = data_dir / "secret_key"
    try:
        return _read_secret(path)
    except FileNotFoundError:
        pass
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    draft = data_dir / f".secret_key.{os.getpid()}.{secrets.token_hex(4)}"
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(key)
        try:
            os.link(draft, path)
        except FileExistsError:  # another process won the race: use its key
            return _read_secret(path)
    finally:
        draft.unlink(missing_ok=True)
    log.warning("SECRET_KEY is not set: generated one and stored it in %s (mode 0600)", path)
    return key


# The stored key as last read, per file, with the identity it was read at: every token made or
# checked needs the key, and reading the file each time was a large part of a worker's start and
# of a request's auth. A file replaced or rewritten (another inode, size or mtime) is read again.
_SECRETS_READ: dict[Path, tuple[tuple[int, int, int], str]] = {}


def _read_secret(path: Path) -> str:
    status = os.stat(path)  # FileNotFoundError: none stored yet
    identity = (status.st_ino, status.st_size, status.st_mtime_ns)
    known = _SECRETS_READ.get(path)
    if known is not None and known[0] == identity:
        return known[1]
    key = path.read_text().strip()
    if not key:
        raise ValueError(f"{path} is empty: delete it to have a new key generated, or set SECRET_KEY")
    _SECRETS_READ[path] = (identity, key)
    return key


@lru_cache
def get_settings() -> Settings:
    return Settings()
