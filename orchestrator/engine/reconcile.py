"""Make an adopted worker's process match its recorded status, both ways.

The API records a pause, resume or terminate at once; the engine that owns the process sends the
signal afterwards. An engine killed in between leaves a process that disagrees with its record: a
RUNNING worker whose process group is stopped (a lost resume: it would hold its slot forever), a
PAUSED worker that still runs (a lost pause), a TERMINATED worker still alive (a lost terminate).
The engine that adopts it reads what the process really is (/proc/PID/stat) instead of trusting
the record: pause and resume are applied here; a stop follows from control, which signals every
supervised process whose worker has ended (with a SIGCONT, so a stopped one dies too).
"""

from __future__ import annotations

import logging
import signal

from orchestrator.core.states import WorkerStatus
from orchestrator.executors.local import LocalExecutor, WorkerProcess
from orchestrator.executors.processes import stopped_process_groups

log = logging.getLogger("orchestrator.engine")


class Reconciler:
    """Reconciles the workers one recovery pass adopts; /proc is read once, when first needed."""

    def __init__(self, executor: LocalExecutor) -> None:
        self.executor = executor
        self._stopped: set[int] | None = None

    def is_stopped(self, proc: WorkerProcess) -> bool:
        remote = self.executor.process_stopped(proc)
        if remote is not None:
            return remote  # a worker on another node: its executor asks there
        if self._stopped is None:
            self._stopped = stopped_process_groups()
        return proc.pid in self._stopped  # the wrapper leads its group: its PID is the group id

    def reconcile(self, proc: WorkerProcess, status: str) -> str | None:
        """Signal `proc` so that it follows `status`; returns what was done (None: it agreed).
        `proc.applied_paused` then says what the process really is, which control relies on."""
        stopped = self.is_stopped(proc)
        proc.applied_paused = stopped
        if status == WorkerStatus.PAUSED and not stopped:
            if self.executor.send(proc, signal.SIGSTOP):
                proc.applied_paused = True
                return "SIGSTOP: recorded PAUSED, the process was running (a pause was lost)"
        elif status == WorkerStatus.RUNNING and stopped:
            if self.executor.send(proc, signal.SIGCONT):
                proc.applied_paused = False
                return "SIGCONT: recorded RUNNING, the process was stopped (a resume was lost)"
        elif status not in (WorkerStatus.PAUSED, WorkerStatus.RUNNING, WorkerStatus.IDLE):
            return f"recorded {status}, the process still runs: control stops it (a terminate was lost)"
        return None
