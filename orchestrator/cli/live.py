"""A job's whole tree drawn with Rich and kept current; used by `job`, `submit --wait` and `demo`.
The tree itself is read by `orchestrator.cli.tree`."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from rich.text import Text

from orchestrator.cli.client import ApiClient, EventStream
from orchestrator.cli.output import (
    JOB_FINAL,
    WORKER_FINAL,
    CliError,
    console,
    elapsed,
    format_duration,
    parse_time,
    shorten,
    status_text,
    worker_cost,
)
from orchestrator.cli.tree import Snapshot, TreeFetcher

__all__ = ["Snapshot", "TreeFetcher", "render_tree", "summary_line", "wait_until_final", "watch"]

ACTIVE = ("RUNNING", "PAUSED")

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.tree import Tree

WAIT_RECONNECT_SECONDS = 30.0
DEFAULT_POLL_SECONDS = 0.5  # ORCHESTRATOR_CLI_POLL_SECONDS: reads of the tree when no event arrives
COALESCE_SECONDS = 0.02  # after a streamed change, how long more changes are gathered into one read


def shown_status(job: dict[str, Any], workers: list[dict[str, Any]]) -> str:
    """The job's status as shown: a job read PENDING whose worker has started is RUNNING (the job
    and its workers are read one after the other, and the engine marks them in that order)."""
    status = str(job.get("status"))
    if status == "PENDING" and any(w.get("started_at") or w.get("status") in ACTIVE for w in workers):
        return "RUNNING"
    return status


def workers_ended(workers: list[dict[str, Any]], total: int) -> Text:
    """ "workers 2/2 ended: 1 COMPLETED, 1 TERMINATED": how many ended and how, not a bare 2/2
    that reads as success on a canceled job."""
    ended = [w for w in workers if w.get("status") in WORKER_FINAL]
    text = Text(f"workers {len(ended)}/{total} ended")
    if ended:
        text.append(": ")
        text.append_text(_counts(w.get("status") for w in ended))
    return text


def _job_label(job: dict[str, Any], workers: list[dict[str, Any]], now: datetime) -> Text:
    total = int(job.get("worker_count") or len(workers))
    status = shown_status(job, workers)
    label = Text.assemble((job["id"], "bold"), " ", status_text(status), f"  d{job.get('depth', 0)}  ")
    label.append_text(workers_ended(workers, total))
    if status == "PENDING":
        queued = (now - (parse_time(job.get("created_at")) or now)).total_seconds()
        label.append(f"  queued {format_duration(queued)}", style="dim")
    else:
        label.append(f"  {format_duration(elapsed(job, now))}", style="dim")
    cost = sum(worker_cost(w) for w in workers)
    if cost:
        label.append(f"  ${cost:.4f}", style="dim")
    label.append("  " + shorten(job.get("task_description"), 50), style="italic")
    if job.get("status_reason") and job.get("status") in ("FAILED", "CANCELED"):
        label.append(f"  ({shorten(job['status_reason'], 60)})", style="red")
    label.no_wrap, label.overflow = True, "ellipsis"
    return label


def _worker_label(worker: dict[str, Any], last_line: str | None, now: datetime) -> Text:
    label = Text.assemble(
        (worker["id"], ""),
        f" #{worker.get('worker_index', 0)} ",
        status_text(worker.get("status")),
    )
    if worker.get("exit_code") is not None:
        label.append(f" exit {worker['exit_code']}", style="dim")
    if worker.get("status") in ("RUNNING", "PAUSED"):
        label.append(f" {format_duration(elapsed(worker, now))}", style="dim")
    if worker.get("status_reason") and worker.get("status") in ("FAILED", "TERMINATED"):
        label.append(f" ({shorten(worker['status_reason'], 50)})", style="red")
    if last_line:
        label.append(f"  > {shorten(last_line, 70)}", style="dim italic")
    label.no_wrap, label.overflow = True, "ellipsis"  # one line per worker, however narrow the terminal
    return label


def render_tree(snap: Snapshot, *, all_workers: bool = False) -> Tree:
    """The job tree; under each job its live workers (all workers with all_workers)."""
    from rich.tree import Tree

    now = datetime.now(UTC)

    def add(node: Tree, job_id: str) -> None:
        for worker in snap.workers.get(job_id, []):
            status = worker.get("status")
            if all_workers or status in ("RUNNING", "PAUSED", "FAILED", "TERMINATED"):
                node.add(_worker_label(worker, snap.last_lines.get(worker["id"]), now))
        for child_id in snap.children.get(job_id, []):
            child = snap.jobs[child_id]
            add(node.add(_job_label(child, snap.workers.get(child_id, []), now)), child_id)

    root = snap.root
    tree = Tree(_job_label(root, snap.workers.get(root["id"], []), now), guide_style="dim")
    add(tree, root["id"])
    return tree


def summary_line(snap: Snapshot) -> Text:
    jobs = list(snap.walk())
    workers = snap.all_workers()
    text = Text(f"{len(jobs)} job(s): ")
    text.append_text(_counts(shown_status(j, snap.workers.get(j["id"], [])) for j in jobs))
    text.append(f"  ·  {len(workers)} worker(s): ")
    text.append_text(_counts(w.get("status") for w in workers))
    text.append(f"  ·  {format_duration(elapsed(snap.root))}", style="dim")
    return text


def _counts(statuses: Iterator[Any]) -> Text:
    counts: dict[str, int] = {}
    for status in statuses:
        counts[str(status)] = counts.get(str(status), 0) + 1
    text = Text()
    for i, (status, count) in enumerate(sorted(counts.items())):
        if i:
            text.append(", ")
        text.append(f"{count} ")
        text.append_text(status_text(status))
    return text or Text("none", style="dim")


def _frame(snap: Snapshot) -> RenderableType:
    from rich.console import Group

    return Group(render_tree(snap), summary_line(snap))


def poll_interval() -> float:
    """How long a watcher waits for news before reading the tree again anyway."""
    try:
        return max(0.05, float(os.environ.get("ORCHESTRATOR_CLI_POLL_SECONDS", DEFAULT_POLL_SECONDS)))
    except ValueError:
        return DEFAULT_POLL_SECONDS


class ChangeSignal:
    """Set whenever the server streams something about a job's tree (the SSE events stream,
    read in a daemon thread), so a watcher reads the tree again at once instead of at its next
    poll: a job's end shows within milliseconds, not up to a poll interval later. If the stream
    cannot be opened or breaks, the watcher simply keeps polling."""

    def __init__(self, api: ApiClient, job_id: str) -> None:
        self._api = api
        self._job_id = job_id
        self._changed = threading.Event()
        self._closed = False
        self._stream: EventStream | None = None
        self._thread = threading.Thread(target=self._follow, name="orchestrator-events", daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        stream = self._api.open_stream(f"/api/jobs/{self._job_id}/events", follow="true")
        if stream is None:
            return
        self._stream = stream
        if self._closed:  # closed while it was opening
            stream.close()
            return
        try:
            while not self._closed:
                line = stream.readline()
                if not line:  # the server ended the stream (the tree is final) or went away
                    break
                if line.startswith((b"event:", b"data:")):
                    self._changed.set()
        except (OSError, ValueError, AttributeError):  # closed under us, or the connection broke
            pass
        finally:
            self._changed.set()  # one last read of the tree
            stream.close()

    def wait(self, timeout: float) -> None:
        """Until something changed (then a short pause, so a burst costs one read) or `timeout`."""
        if self._changed.wait(timeout):
            time.sleep(COALESCE_SECONDS)
            self._changed.clear()

    def close(self) -> None:
        self._closed = True
        stream = self._stream
        if stream is not None:
            stream.close()  # ends the reading thread's blocked read


def watch(
    api: ApiClient, job_id: str, *, interval: float | None = None, submitted: float | None = None
) -> Snapshot:
    """Follow a job until it is final: a live tree on a terminal, one line per change otherwise.
    The tree is read again when the server streams a change, and every `interval` regardless.
    Printed stamps are seconds on this machine's monotonic clock since `submitted` (a
    `time.monotonic()` taken when the job was submitted), else since the job's creation as first read.

    Brief connection losses (a server restart) are ridden out for WAIT_RECONNECT_SECONDS.
    """
    interval = poll_interval() if interval is None else interval
    fetcher = TreeFetcher(api, job_id)
    out = console()
    snap = fetcher.snapshot()
    signal = None if snap.done else ChangeSignal(api, job_id)

    def pause() -> None:
        if signal is not None:
            signal.wait(interval)

    try:
        if not out.is_terminal:
            return _watch_plain(fetcher, snap, pause, submitted)
        from rich.live import Live

        with Live(_frame(snap), console=out, refresh_per_second=8, transient=False) as live:
            while not snap.done:
                pause()
                snap = _poll(fetcher)
                live.update(_frame(snap))
        return snap
    finally:
        if signal is not None:
            signal.close()


def wait_until_final(api: ApiClient, job_id: str, *, interval: float | None = None) -> dict[str, Any]:
    """The job once it is final, read again whenever the server streams a change (see watch)."""
    interval = poll_interval() if interval is None else interval
    job: dict[str, Any] = api.get(f"/api/jobs/{job_id}")
    if job.get("status") in JOB_FINAL:
        return job
    signal = ChangeSignal(api, job_id)
    try:
        while job.get("status") not in JOB_FINAL:
            signal.wait(interval)
            job = api.get(f"/api/jobs/{job_id}")
        return job
    finally:
        signal.close()


def _poll(fetcher: TreeFetcher) -> Snapshot:
    """The next snapshot; connection-level failures are retried for WAIT_RECONNECT_SECONDS."""
    deadline = time.monotonic() + WAIT_RECONNECT_SECONDS
    while True:
        try:
            return fetcher.snapshot()
        except CliError as exc:
            if not exc.transient or time.monotonic() > deadline:
                raise
            time.sleep(1.0)


def _watch_plain(
    fetcher: TreeFetcher, snap: Snapshot, pause: Callable[[], None], submitted: float | None
) -> Snapshot:
    out = console()
    seen: dict[str, str] = {}
    if submitted is None:  # the job's age when first read, then this machine's monotonic clock
        created = parse_time(snap.root.get("created_at")) or snap.taken_at
        submitted = snap.taken_mono - max(0.0, (snap.taken_at - created).total_seconds())

    def report(current: Snapshot) -> None:
        for job in current.walk():
            status = shown_status(job, current.workers.get(job["id"], []))
            if seen.get(job["id"]) != status:
                seen[job["id"]] = status
                clock = format_duration(current.taken_mono - submitted)
                line = Text(f"{clock:>7}  {job['id']} d{job.get('depth', 0)} ")
                line.append_text(status_text(status))
                if job.get("status_reason") and status in ("FAILED", "CANCELED"):
                    line.append(f" ({shorten(job['status_reason'], 80)})")
                out.print(line, soft_wrap=True)

    report(snap)
    while not snap.done:
        pause()
        snap = _poll(fetcher)
        report(snap)
    out.print(render_tree(snap))
    out.print(summary_line(snap))
    return snap
