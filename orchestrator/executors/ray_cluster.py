"""Reaching a Ray cluster without hanging: Ray's own connect retries for as long as the cluster
is away, holding the thread that asked."""

from __future__ import annotations

import socket

CONNECT_PROBE_SECONDS = 5.0


def probe(address: str | None) -> None:
    """Fail fast (OSError) if nothing listens at the cluster's address."""
    if not address or address == "auto" or "://" in address:
        return
    host, _, port = address.rpartition(":")
    with socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_PROBE_SECONDS):
        pass


SLOT = "agent_slot"  # the custom resource each worker's actor asks one of


class NotPlaced(RuntimeError):
    """No Ray node had room for the worker: it waits IDLE (the reason says for what) instead of
    failing, and is started again at a later pass."""


class Lost(RuntimeError):
    """The worker's node died during its start (or its actor did): the message is the whole
    status reason (`lost: node <id> died`), not a `could not start` the worker is blamed for."""
