"""Wake-ups of the streams of one app: at once for a commit in this process, and within a poll
interval for a commit elsewhere (another API process, an engine on another host), seen as a move
of the change mark.

The hub belongs to the app (created in its lifespan, stopped before its database is disposed), so
two apps in one process never share waiters or a watcher task. One task reads the mark every
interval while streams are open, so an idle stream costs nothing (streams that each polled the
database every interval kept a core busy when many were idle).

The idle interval is a safety net against a wake-up lost on its way: every interval the watcher
wakes the streams whose own last poll read an older mark than its newest (`WakeHub.sweep`). A
stream that is up to date sleeps on: 1,000 idle streams each polling every 5 s anyway cost a
fifth of a core, and a timer each still 6 % of one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Collection, Iterable, Iterator

from orchestrator.core.config import Settings
from orchestrator.db import topics
from orchestrator.db.availability import OUTAGES
from orchestrator.db.session import Database
from orchestrator.streams.horizon import MAX_HORIZON_WAIT_SECONDS, ChangeMark

log = logging.getLogger(__name__)


class Subscription:
    """One stream's wake-up. Commit callbacks run in the thread that committed, so a wake-up is
    handed to the stream's loop rather than set directly."""

    def __init__(self, topics: frozenset[str] | None, idle_seconds: float) -> None:
        self.topics = topics
        self.idle_seconds = idle_seconds
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()
        # The change mark as the stream's last poll read it (None: unknown; see WakeHub.sweep).
        self.seen: ChangeMark | None = None

    def wants(self, topics: Collection[str]) -> bool:
        """Whether a commit announcing `topics` concerns this subscriber (None: every commit)."""
        return self.topics is None or not self.topics.isdisjoint(topics)

    def wake(self) -> None:
        self.loop.call_soon_threadsafe(self.event.set)

    def clear(self) -> None:
        """Forget earlier wake-ups: called before each poll, so one during the poll is kept."""
        self.event.clear()

    async def wait(self, *, horizon_waiting: bool = False) -> None:
        """Sleep until woken: by a commit, a move of the mark, or the idle sweep if this stream's
        mark is behind. While the delivery horizon holds rows back, at most the idle interval
        (shorter still): a stuck transaction stops holding them back after
        MAX_HORIZON_WAIT_SECONDS, which moves no mark."""
        if not horizon_waiting:
            await self.event.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.event.wait(), min(self.idle_seconds, MAX_HORIZON_WAIT_SECONDS))


class WakeHub:
    """The subscribers of one app's database, woken by commits in this process (`db.notify`) and
    by moves of the change mark, which a watcher task reads while anyone is subscribed."""

    def __init__(self, db: Database, *, poll_seconds: float, idle_poll_seconds: float) -> None:
        self.db = db
        self.poll_seconds = poll_seconds
        self.idle_poll_seconds = idle_poll_seconds
        self.subscribers: set[Subscription] = set()
        self._watcher: asyncio.Task[None] | None = None
        self._listening = False

    @classmethod
    def from_settings(cls, db: Database, settings: Settings) -> WakeHub:
        return cls(
            db,
            poll_seconds=settings.orchestrator_sse_poll_seconds,
            idle_poll_seconds=settings.orchestrator_sse_idle_poll_seconds,
        )

    def start(self) -> None:
        """Hear this process's commits (the app's start-up)."""
        if not self._listening:
            topics.add_listener(self.publish)
            self._listening = True

    async def stop(self) -> None:
        """Stop hearing commits and reading the mark (the app's shutdown, before the database goes)."""
        if self._listening:
            topics.remove_listener(self.publish)
            self._listening = False
        watcher, self._watcher = self._watcher, None
        if watcher is not None and watcher.get_loop() is asyncio.get_running_loop():
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    @contextlib.contextmanager
    def subscribe(self, topics: Iterable[str] | None = None) -> Iterator[Subscription]:
        """A subscription woken by commits announcing one of `topics` (None: every commit) and by
        every move of the change mark, which names no topic."""
        subscription = Subscription(None if topics is None else frozenset(topics), self.idle_poll_seconds)
        self.subscribers.add(subscription)
        if self._watcher is None or self._watcher.done():
            self._watcher = subscription.loop.create_task(self._watch(), name="streams-change-mark")
        try:
            yield subscription
        finally:
            self.subscribers.discard(subscription)

    def publish(self, topics: Collection[str]) -> None:
        """Wake the subscribers of any of `topics` (a commit in this process announced them)."""
        self._wake(lambda subscription: subscription.wants(topics))

    def wake_all(self) -> None:
        self._wake(lambda _subscription: True)

    def sweep(self, newest: ChangeMark | None) -> None:
        """Wake the subscribers whose last poll read a mark older than `newest` (or none, or
        `newest` unknown): a wake-up they should have had was lost."""
        self._wake(lambda s: s.seen is None or newest is None or newest.moved_since(s.seen))

    def _wake(self, chosen: Callable[[Subscription], bool]) -> None:
        for subscription in list(self.subscribers):
            if not chosen(subscription):
                continue
            try:
                subscription.wake()
            except RuntimeError:  # its loop has closed
                self.subscribers.discard(subscription)

    async def _watch(self) -> None:
        """Read the mark every interval while there are subscribers; wake them all when it moves
        (and after the first read, which has nothing to compare with)."""
        last: ChangeMark | None = None
        swept = asyncio.get_running_loop().time()
        try:
            while self.subscribers:
                mark: ChangeMark | None = None
                try:
                    async with self.db.read_session() as session:
                        mark = await ChangeMark.read(session, self.db.is_postgres)
                except Exception as exc:  # the streams poll and meet the error themselves
                    if OUTAGES.report(exc, "streams: reading the change mark") is None:
                        log.warning("reading the change mark failed: %s", exc)
                if mark is None or last is None or mark.moved_since(last):
                    self.wake_all()
                last = mark
                now = asyncio.get_running_loop().time()
                if now - swept >= self.idle_poll_seconds:
                    self.sweep(mark)
                    swept = now
                await asyncio.sleep(min(self.poll_seconds, self.idle_poll_seconds))
        finally:
            if self._watcher is asyncio.current_task():
                self._watcher = None
