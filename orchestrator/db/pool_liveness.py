"""Pooled PostgreSQL connections the server has closed, replaced before a request gets one."""

from __future__ import annotations

import math
import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine

# A connection idle this long is pinged before use (the server may have gone without a word).
IDLE_PING_SECONDS = 30.0


def drop_dead_connections(engine: AsyncEngine) -> None:
    """The first request on a connection a restarted server dropped must not fail: a restarted
    database loses no request. pool_pre_ping checked that with three round trips per checkout
    (asyncpg's ping is BEGIN, an empty query, ROLLBACK), i.e. per request. A server that shuts down
    closes its connections, which asyncpg has noticed by the time one is checked out: such a
    connection is replaced without a round trip. Only one idle for IDLE_PING_SECONDS is pinged."""

    @event.listens_for(engine.sync_engine, "checkin")
    def _checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["checked_in"] = time.monotonic()

    @event.listens_for(engine.sync_engine, "checkout")
    def _checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        if dbapi_connection.driver_connection.is_closed():
            raise DisconnectionError("the server closed the connection")
        if time.monotonic() - record.info.get("checked_in", math.inf) > IDLE_PING_SECONDS:
            try:
                dbapi_connection.ping()
            except Exception as exc:
                raise DisconnectionError(f"the idle connection failed its ping: {exc}") from exc
