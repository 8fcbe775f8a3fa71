"""What a committed unit of work announces: a `Topic` per kind of change, delivered in this
process through callbacks and across processes through PostgreSQL LISTEN/NOTIFY on `CHANNEL`
(which the database delivers at commit, never before)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import StrEnum

CHANNEL = "orchestrator"


class Topic(StrEnum):
    JOBS = "jobs"  # a job was submitted, changed status or was claimed: engines and job feeds look
    CONTROL = "control"  # a worker was asked to stop, pause or resume: its engine acts
    LOGS = "logs"  # worker log lines were written: log feeds look


Listener = Callable[[set[str]], None]
_listeners: list[Listener] = []


def add_listener(callback: Listener) -> None:
    """Call `callback` with the topics of every unit of work this process commits."""
    _listeners.append(callback)


def remove_listener(callback: Listener) -> None:
    if callback in _listeners:
        _listeners.remove(callback)


def announce(topics: Iterable[Topic]) -> None:
    """Tell this process's listeners what a unit of work just committed."""
    announced: set[str] = set(topics)
    if announced:
        for callback in list(_listeners):
            callback(announced)
