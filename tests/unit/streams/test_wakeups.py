"""The wake-up hub on a real database: a commit in this process wakes the subscribers of its
topics and no others, a change the hub did not hear of (another process's) wakes everyone through
the change mark, and a stopped hub hears nothing. Also the delivery horizon against real open
transactions (PostgreSQL)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text, update

from orchestrator.bootstrap import prepare_database
from orchestrator.core.config import Settings
from orchestrator.db.models import ResourcePool
from orchestrator.db.session import Database
from orchestrator.db.topics import Topic
from orchestrator.streams.horizon import UNBOUNDED, ChangeMark, Horizon
from orchestrator.streams.wakeups import Subscription, WakeHub
from tests.support import servers

DEADLINE = 60.0
NEVER = 3600.0  # a watcher or idle interval no test waits out


@pytest.fixture
def database_url(tmp_path: Path) -> Iterator[str]:
    if servers.test_database_kind() != "postgres":
        yield f"sqlite:///{tmp_path / 'data' / 'orchestrator.db'}"
        return
    url = servers.create_pg_database()
    try:
        yield url
    finally:
        servers.drop_pg_database(url)


@pytest.fixture
async def database(database_url: str, tmp_path: Path) -> AsyncIterator[Database]:
    settings = Settings(
        database_url=database_url,
        orchestrator_data_dir=str(tmp_path / "data"),
        secret_key=servers.TEST_SECRET_KEY,
    )
    db = Database(settings)
    await prepare_database(db, settings)
    try:
        yield db
    finally:
        await db.dispose()


async def woken(*subscriptions: Subscription) -> None:
    await asyncio.wait_for(asyncio.gather(*(s.event.wait() for s in subscriptions)), DEADLINE)


async def scheduled_wakeups_ran() -> None:
    """Wake-ups are handed to the loop in order: once this callback has run, so have they."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    loop.call_soon_threadsafe(done.set_result, None)
    await done


async def commit_announcing(db: Database, topic: str) -> None:
    async with db.session() as session:
        await session.publish(Topic(topic))


@pytest.mark.parametrize(("topic", "other"), [("logs", "control"), ("control", "logs")])
async def test_a_commit_wakes_the_subscribers_of_its_topic_only(
    database: Database, topic: str, other: str
) -> None:
    hub = WakeHub(database, poll_seconds=NEVER, idle_poll_seconds=NEVER)
    hub.start()
    try:
        with hub.subscribe({topic}) as mine, hub.subscribe({other}) as theirs, hub.subscribe() as every:
            await woken(mine, theirs, every)  # the watcher's first read wakes all: nothing to compare with
            for subscription in (mine, theirs, every):
                subscription.clear()
            await commit_announcing(database, topic)
            await woken(mine)
            await scheduled_wakeups_ran()
            assert every.event.is_set(), "a subscriber of every topic hears every commit"
            assert not theirs.event.is_set(), f"a commit announcing {topic!r} woke a subscriber of {other!r}"
    finally:
        await hub.stop()


async def test_a_change_the_hub_did_not_hear_of_wakes_everyone_through_the_mark(database: Database) -> None:
    # Not started: commits in this process go unheard, like another process's.
    hub = WakeHub(database, poll_seconds=0.05, idle_poll_seconds=NEVER)
    try:
        with hub.subscribe({"logs"}) as logs, hub.subscribe({"control"}) as control:
            await woken(logs, control)
            logs.clear()
            control.clear()
            async with database.session() as session:  # a slot taken: the mark's third counter
                await session.execute(
                    update(ResourcePool)
                    .where(ResourcePool.depth == 0)
                    .values(allocated=ResourcePool.allocated + 1)
                )
            await woken(logs, control)
    finally:
        await hub.stop()


async def test_a_stopped_hub_hears_no_more_commits(database: Database) -> None:
    hub = WakeHub(database, poll_seconds=NEVER, idle_poll_seconds=NEVER)
    hub.start()
    with hub.subscribe() as every:
        await woken(every)
        every.clear()
        await hub.stop()
        await commit_announcing(database, "jobs")
        await scheduled_wakeups_ran()
        assert not every.event.is_set(), "the hub of a stopped app still hears this process's commits"


async def test_two_hubs_do_not_share_subscribers(database: Database) -> None:
    first = WakeHub(database, poll_seconds=NEVER, idle_poll_seconds=NEVER)
    second = WakeHub(database, poll_seconds=NEVER, idle_poll_seconds=NEVER)
    with first.subscribe() as one, second.subscribe() as two:
        await woken(one, two)
        one.clear()
        two.clear()
        first.wake_all()
        await woken(one)
        await scheduled_wakeups_ran()
        assert not two.event.is_set()
    await first.stop()
    await second.stop()


async def test_the_horizon_waits_for_a_transaction_open_at_its_snapshot(database: Database) -> None:
    horizon = Horizon(database.is_postgres)
    if not database.is_postgres:  # one writer at a time: every visible id is safe
        async with database.read_session() as session:
            assert await horizon.update(session) == UNBOUNDED
        assert not horizon.waiting and horizon.waiting_on == frozenset()
        return
    async with database.session() as other:
        xid = str((await other.execute(text("SELECT pg_current_xact_id()::text"))).scalar_one())
        # A later transaction completes, so the open one is below the snapshot's xmax and listed
        # as in progress (an open transaction newer than every completed one is not listed).
        async with database.session() as later:
            await later.execute(text("SELECT pg_current_xact_id()"))
        for _ in range(2):
            async with database.read_session() as session:
                await horizon.update(session)
            assert xid in horizon.waiting_on, f"transaction {xid} is open: rows it may write are not yet safe"
    # Transaction ids are the cluster's: other databases' transactions may hold the horizon a while
    # longer (at most MAX_HORIZON_WAIT_SECONDS each), but never the one that has ended.
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while xid in horizon.waiting_on:
        assert asyncio.get_running_loop().time() < deadline, f"transaction {xid} has ended, still waited for"
        await asyncio.sleep(0.1)
        async with database.read_session() as session:
            await horizon.update(session)


async def test_the_idle_sweep_wakes_only_the_streams_whose_poll_is_behind_the_mark(
    database: Database,
) -> None:
    """The idle interval is the safety net for a wake-up lost on its way: the sweep wakes a stream
    whose last poll read an older mark (or none); one up to date sleeps on (1,000 idle streams
    polling anyway cost a fifth of a core)."""
    hub = WakeHub(database, poll_seconds=NEVER, idle_poll_seconds=NEVER)
    try:
        with hub.subscribe() as current, hub.subscribe() as behind, hub.subscribe() as new:
            await woken(current, behind, new)  # the watcher's one read
            async with database.read_session() as session:
                newest = await ChangeMark.read(session, database.is_postgres)
            current.seen = newest
            async with database.session() as session:  # a change whose wake-up never came
                await session.execute(
                    update(ResourcePool)
                    .where(ResourcePool.depth == 0)
                    .values(allocated=ResourcePool.allocated + 1)
                )
            behind.seen = newest
            async with database.read_session() as session:
                newest = await ChangeMark.read(session, database.is_postgres)
            current.seen = newest
            for subscription in (current, behind, new):
                subscription.clear()
            hub.sweep(newest)
            await woken(behind, new)
            await scheduled_wakeups_ran()
            assert not current.event.is_set(), "the sweep woke a stream whose poll read the newest mark"
    finally:
        await hub.stop()
