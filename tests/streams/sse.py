"""A small, strict SSE client for tests: parses messages and counts comment (heartbeat) lines."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx


@dataclass
class Message:
    event: str
    data: str
    id: str | None
    received: float  # time.time() when the message was complete

    def json(self) -> Any:
        return json.loads(self.data)


@dataclass
class Stream:
    messages: list[Message] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    ended: bool = False
    status_code: int = 0
    content_type: str = ""

    def of(self, *events: str) -> list[Message]:
        return [m for m in self.messages if m.event in events]


def follow(
    client: httpx.Client,
    path: str,
    *,
    last_event_id: str | None = None,
    max_messages: int | None = None,
    max_seconds: float = 60.0,
) -> Stream:
    """Read `path` as SSE until `event: end`, `max_messages`, or `max_seconds` (then fail loudly
    only if the caller expected an end)."""
    headers = {"Accept": "text/event-stream"}
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    out = Stream()
    deadline = time.monotonic() + max_seconds
    with client.stream("GET", path, headers=headers, timeout=httpx.Timeout(max_seconds, connect=5)) as resp:
        out.status_code = resp.status_code
        out.content_type = resp.headers.get("content-type", "")
        if resp.status_code != 200:
            resp.read()
            return out
        event, data, msg_id = "message", [], None
        for raw in resp.iter_lines():
            line = raw.rstrip("\r")
            if line == "":
                if data or msg_id is not None:
                    out.messages.append(Message(event, "\n".join(data), msg_id, time.time()))
                    if event == "end":
                        out.ended = True
                        return out
                    if max_messages is not None and len(out.messages) >= max_messages:
                        return out
                event, data, msg_id = "message", [], None
            elif line.startswith(":"):
                out.comments.append(line)
            else:
                name, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if name == "event":
                    event = value
                elif name == "data":
                    data.append(value)
                elif name == "id":
                    msg_id = value
            if time.monotonic() > deadline:
                return out
    return out
