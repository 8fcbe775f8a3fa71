"""Identifiers: a prefix and 12 lowercase hex characters, as the API guide shows (`j_a1b2c3d4e5f6`)."""

import secrets


def has_nul(*values: str | None) -> bool:
    """No id contains NUL, and PostgreSQL refuses it in a parameter: such a lookup finds nothing."""
    return any(v is not None and "\x00" in v for v in values)


def _new(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(6)}"


def new_job_id() -> str:
    return _new("j")


def new_worker_id() -> str:
    return _new("w")


def new_workspace_id() -> str:
    return _new("ws")


def new_engine_id() -> str:
    return _new("e")
