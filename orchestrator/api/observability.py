"""Request ids, structured logs and per-request metrics.

* `configure_logging("text" | "json")` installs one root handler whose records all carry the
  current request id (`-` outside a request); uvicorn's loggers are routed through it.
* `ObservabilityMiddleware` (pure ASGI, so streaming responses are not buffered) takes the
  request id from `X-Request-ID` or makes one, returns it in the response header, and records
  the request latency by route template and status code. Latency is measured to the response
  start, so a long SSE stream counts as the time to its first byte, not its whole life.

Request metrics use prometheus-client's multiprocess mode: each process writes its samples to
memory-mapped files in a directory shared by the processes of one server run (`--workers 4`),
and `/metrics` merges them, whichever process answers the scrape.
"""

from __future__ import annotations

import contextvars
import json
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.executors.local import pid_alive

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")

LOG_FORMATS = ("text", "json")
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class RequestIdFilter(logging.Filter):
    """Puts the current request id on every record as `record.request_id`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts, level, logger, message, request_id, extra fields, exc_info."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", request_id_var.get()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in entry and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool | None) else repr(value)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s [%(request_id)s] %(message)s"


def configure_logging(fmt: str, level: int | str = logging.INFO) -> None:
    """Log to stderr as `text` or `json` (Settings.orchestrator_log_format, ORCHESTRATOR_LOG_FORMAT).

    Replaces the root handlers and routes uvicorn's loggers through the root, so access lines
    also carry the request id. Safe to call more than once.
    """
    fmt = fmt.strip().lower()
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers.clear()
        uvicorn_logger.propagate = True


# --- request metrics (prometheus multiprocess mode) -----------------------------------------

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class RequestMetrics:
    """The per-process request histogram, written to this server run's multiprocess directory."""

    def __init__(self, directory: Path) -> None:
        from prometheus_client import CollectorRegistry, Histogram, values

        self.directory = directory
        # MmapedValue reads the directory from the environment when it opens its file.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
        values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
        self.latency = Histogram(
            "orchestrator_http_request_duration_seconds",
            "API request latency (to the response start) by method, route template and status code",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=CollectorRegistry(),  # never exported directly: /metrics merges the files
        )

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        self.latency.labels(method, route, str(status)).observe(seconds)


_metrics: RequestMetrics | None = None


def metrics_run_key() -> int:
    """The pid that identifies this server run: uvicorn's supervisor under --workers, else ours."""
    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None and parent.pid is not None else os.getpid()


def request_metrics(data_dir: Path) -> RequestMetrics:
    """This process's request metrics; on first use, picks the run directory and removes the
    directories of earlier runs whose process is gone."""
    global _metrics
    if _metrics is None:
        base = data_dir / "metrics"
        base.mkdir(parents=True, exist_ok=True)
        for stale in base.glob("run-*"):
            try:
                pid = int(stale.name.removeprefix("run-"))
            except ValueError:
                continue
            if not pid_alive(pid):
                shutil.rmtree(stale, ignore_errors=True)
        directory = base / f"run-{metrics_run_key()}"
        directory.mkdir(exist_ok=True)
        _metrics = RequestMetrics(directory)
    return _metrics


def route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "<unmatched>"


class ObservabilityMiddleware:
    """Request id in, request id out, one latency sample per request.

    What is constant is looked up once: the metrics directory on the first request (the app's
    settings are known by then), each (method, route, status) histogram child on its first use.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._metrics: RequestMetrics | None = None
        self._observers: dict[tuple[str, str, int], Callable[[float], None]] = {}

    def _observer(self, scope: Scope, status: int) -> Callable[[float], None] | None:
        key = (scope["method"], route_template(scope), status)
        observer = self._observers.get(key)
        if observer is None:
            if self._metrics is None:
                settings = getattr(getattr(scope.get("app"), "state", None), "settings", None)
                if settings is None:
                    return None
                self._metrics = request_metrics(settings.data_dir)
            observer = self._metrics.latency.labels(key[0], key[1], str(status)).observe
            self._observers[key] = observer
        return observer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = ""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                incoming = value.decode("latin-1").strip()
                break
        request_id = incoming if incoming and _VALID_REQUEST_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        recorded = False

        def record(status: int) -> None:
            nonlocal recorded
            if recorded:
                return
            recorded = True
            try:
                observer = self._observer(scope, status)
                if observer is not None:
                    observer(time.perf_counter() - started)
            except OSError:  # metrics must never break a request
                logging.getLogger(__name__).warning("could not record request metrics", exc_info=True)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                header = (b"x-request-id", request_id.encode("latin-1"))
                message["headers"] = [*message.get("headers", ()), header]
                record(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            record(500)
            raise
        finally:
            request_id_var.reset(token)


def install_observability(app: Any) -> None:
    """Add the middleware; configure logging when ORCHESTRATOR_LOG_FORMAT asks for it."""
    log_format = app.state.settings.orchestrator_log_format
    if log_format:
        configure_logging(log_format)
    app.add_middleware(ObservabilityMiddleware)
