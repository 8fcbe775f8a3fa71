"""Holding a worker's processes from outside the engine that supervises it: the API process's
`merge_subjob` runs `git merge` as root in the worker's live worktree, and an agent that swaps a
directory for a link to a host directory between git's check and its write would have root write
through it. Every process in the worker's cgroup is stopped, and seen stopped, first.

The cgroup is this host's: a worker on another host (a Ray node) has no group here, and is not
held (the caller refuses). Continuing is the caller's: it must not continue a worker that was
paused meanwhile (it reads the worker's status under a lock first)."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Literal

from orchestrator.executors.cgroups import Cgroups, this_host

HOLD_SECONDS = 10.0  # as the engine's checkpoint hold: a process in a system call stops when it ends

Held = Literal["held", "no cgroups", "not here", "not stopped", "at its limit"]


@dataclass(frozen=True)
class CgroupHold:
    """Stop and continue a worker's processes through this host's cgroups."""

    groups: Cgroups

    def stop(self, worker_id: str) -> Held:
        """SIGSTOP every member of the worker's group until each is seen stopped. "held": the
        caller must `resume` (unless paused meanwhile); "not stopped"/"at its limit": signals
        were sent, the caller must `resume` and refuse; otherwise nothing was sent."""
        if not self.groups.usable:
            return "no cgroups"
        if not self.groups.processes(worker_id):
            return "not here"
        self.groups.signal_members(worker_id, signal.SIGSTOP)
        if not self.groups.wait_stopped(worker_id, HOLD_SECONDS):
            return "not stopped"
        # At its process limit, the engine stops it with SIGTERM and SIGCONT, mid-merge if it
        # comes to it: an agent could hit the limit on purpose just before it asks to merge.
        if self.groups.limit_hit(worker_id)[1]:
            return "at its limit"
        return "held"

    def resume(self, worker_id: str) -> None:
        self.groups.signal_members(worker_id, signal.SIGCONT)


def this_hosts_hold() -> CgroupHold:
    return CgroupHold(this_host())
