"""What a feed yields: one message, its event name, JSON data and resume id. The API turns it into
a Server-Sent Events frame; the feeds know nothing of the wire format."""

from __future__ import annotations

from dataclasses import dataclass

# Rows read per table per poll: a stream with more behind it polls again at once.
BATCH = 500


@dataclass(frozen=True)
class FeedMessage:
    event: str
    data: str
    id: str | None = None
