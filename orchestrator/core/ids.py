"""Identifiers: a prefix and 12 lowercase hex characters, as the API guide shows (`j_a1b2c3d4e5f6`)."""

import re
import secrets

JOB_ID_PATTERN = re.compile(r"^j_[0-9a-f]{12}$")
WORKER_ID_PATTERN = re.compile(r"^w_[0-9a-f]{12}$")


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
