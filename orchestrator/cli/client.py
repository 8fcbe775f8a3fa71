"""The HTTP client of the CLI: where the server is, which token to send, and errors as one line.

Resolution order, for the URL and the token alike: `--url/--token`, then `ORCHESTRATOR_URL` /
`ORCHESTRATOR_TOKEN`, then the file `orchestrator login` wrote, then (URL only) the local default.
The HTTP modules are imported on first use so commands that never talk HTTP do not pay for them.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from orchestrator.cli.output import CliError

if TYPE_CHECKING:
    import http.client

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT = 30.0

UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="ORCHESTRATOR_URL",
        help="Server URL (else the `orchestrator login` config, else http://127.0.0.1:8000).",
        show_default=False,
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="ORCHESTRATOR_TOKEN",
        help="Bearer token (else the `orchestrator login` config).",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the raw JSON response, for scripts.")]
# A list command's page, with the bounds the API's list endpoints apply (api/paging.py).
LimitOption = Annotated[int, typer.Option(min=1, max=1000, help="At most this many (newest first).")]
OffsetOption = Annotated[int, typer.Option(min=0)]
JobArg = Annotated[str, typer.Argument(help="Job id (j_...).", show_default=False)]
WorkerArg = Annotated[str, typer.Argument(help="Worker id (w_...).", show_default=False)]


def config_path() -> Path:
    """~/.config/orchestrator/config.json (honours XDG_CONFIG_HOME)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "orchestrator" / "config.json"


def load_config() -> dict[str, str]:
    path = config_path()
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read {path}: {exc}; fix it or run `orchestrator login` again") from exc
    if not isinstance(data, dict):
        raise CliError(f"{path} is not a JSON object; run `orchestrator login` again")
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)}


def save_config(data: dict[str, str]) -> Path:
    """Write atomically with mode 0600 from the start: the file holds a bearer token."""
    path = config_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=".config-", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path


@dataclass(frozen=True)
class Target:
    url: str
    token: str | None


def resolve_target(url: str | None, token: str | None) -> Target:
    config: dict[str, str] = {}
    if not url or not token:
        config = load_config()
    chosen_url = (url or config.get("url") or DEFAULT_URL).rstrip("/")
    chosen_token = token or config.get("token") or None
    return Target(url=chosen_url, token=chosen_token)


def _field_lines(detail: list[Any]) -> list[str]:
    """FastAPI's list-form 422 detail as `field: message` lines."""
    lines = []
    for item in detail:
        if not isinstance(item, dict):
            lines.append(str(item))
            continue
        loc = [str(part) for part in item.get("loc", [])]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:] or loc
        field = ".".join(loc) or "request"
        lines.append(f"{field}: {item.get('msg', 'invalid')}")
    return lines


_STATUS_LABELS = {
    400: "bad request",
    401: "authentication failed",
    403: "forbidden",
    404: "not found",
    409: "conflict",
    422: "invalid request",
}


def error_from_response(status: int, reason: str, content: bytes, target: Target) -> CliError:
    """Turn an error response into one actionable line (plus field lines for a 422)."""
    try:
        body: Any = json.loads(content)
        detail: Any = body.get("detail") if isinstance(body, dict) else None
    except ValueError:
        detail = None
    if detail is None:
        detail = " ".join(content.decode(errors="replace").split())[:200] or reason
    if status == 422 and isinstance(detail, list):
        lines = _field_lines(detail)
        if len(lines) == 1:
            return CliError(f"invalid request (422): {lines[0]}")
        return CliError("invalid request (422):", details=lines)
    text = detail if isinstance(detail, str) else json.dumps(detail)
    if status == 401:
        hint = (
            "no token given: set ORCHESTRATOR_TOKEN, pass --token or run `orchestrator login`"
            if target.token is None
            else "get a fresh one with `orchestrator token` on the server host"
        )
        return CliError(f"authentication failed (401): {text}; {hint}")
    if status >= 500:
        return CliError(
            f"server error ({status}) at {target.url}: {text}; see the server log", transient=True
        )
    label = _STATUS_LABELS.get(status, "request failed")
    return CliError(f"{label} ({status}): {text}")


class EventStream:
    """A Server-Sent Events response read line by line; `close` may come from another thread
    (it shuts the socket down, which ends a blocked read)."""

    def __init__(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        self._connection = connection
        self._response = response

    def readline(self) -> bytes:
        return self._response.readline()

    def close(self) -> None:
        import socket

        sock = self._connection.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._connection.close()


class ApiClient:
    """A small synchronous JSON client on http.client, keeping one connection alive for polling.

    Not httpx: its import (httpcore, anyio/trio probing) is paid again on every CLI call.
    Every failure becomes a CliError with one clear line.
    """

    def __init__(self, target: Target, timeout: float = DEFAULT_TIMEOUT) -> None:
        from urllib.parse import urlsplit

        self.target = target
        self.timeout = timeout
        try:
            parts = urlsplit(target.url)
        except ValueError as exc:
            raise CliError(f"invalid server URL {target.url!r}: {exc}", code=2) from exc
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise CliError(
                f"invalid server URL {target.url!r}: expected http://host:port or https://host", code=2
            )
        try:
            self._port = parts.port
        except ValueError as exc:
            raise CliError(f"invalid server URL {target.url!r}: {exc}", code=2) from exc
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._prefix = parts.path.rstrip("/")
        self._conn: http.client.HTTPConnection | None = None
        self.last_headers: dict[str, str] = {}  # of the last answer
        self._headers = {"Accept": "application/json", "User-Agent": "orchestrator-cli"}
        if target.token:
            self._headers["Authorization"] = f"Bearer {target.token}"

    @classmethod
    def from_options(cls, url: str | None, token: str | None) -> ApiClient:
        return cls(resolve_target(url, token))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = self._new_connection(self.timeout)
        return self._conn

    def _new_connection(self, timeout: float | None) -> http.client.HTTPConnection:
        import http.client

        from orchestrator.core.unix_http import UnixHTTPConnection, api_socket

        if self._https:
            import ssl

            return http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=ssl.create_default_context()
            )
        socket_path = api_socket()
        if socket_path:  # the server listens on a unix socket (`uvicorn --uds`): a worker's CLI
            return UnixHTTPConnection(self._host, socket_path=socket_path, timeout=timeout)
        return http.client.HTTPConnection(self._host, self._port, timeout=timeout)

    def _url(self, path: str, params: dict[str, Any] | None) -> str:
        from urllib.parse import urlencode

        query = urlencode({k: _param(v) for k, v in (params or {}).items() if v is not None})
        return self._prefix + path + (f"?{query}" if query else "")

    def request(
        self, method: str, path: str, *, params: dict[str, Any] | None = None, body: Any = None
    ) -> Any:
        url = self._url(path, params)
        headers = dict(self._headers)
        data = None
        if body is not None or method == "POST":
            data = json.dumps(body if body is not None else {}).encode()
            headers["Content-Type"] = "application/json"
        status, reason, content = self._send(method, url, data, headers)
        if status >= 400:
            raise error_from_response(status, reason, content, self.target)
        if not content:
            return None
        try:
            return json.loads(content)
        except ValueError as exc:
            raise CliError(
                f"{self.target.url}{path} did not answer JSON; is ORCHESTRATOR_URL the orchestrator?"
            ) from exc

    def _send(
        self, method: str, url: str, data: bytes | None, headers: dict[str, str]
    ) -> tuple[int, str, bytes]:
        import http.client
        import socket

        # A kept-alive connection the server has closed fails on first use: retry once (GETs only,
        # a POST must never be sent twice).
        attempts = 2 if method == "GET" else 1
        for attempt in range(attempts):
            reused = self._conn is not None
            conn = self._connection()
            try:
                conn.request(method, url, body=data, headers=headers)
                response = conn.getresponse()
                content = response.read()
                self.last_headers = {k.lower(): v for k, v in response.getheaders()}
                if response.getheader("Connection", "").lower() == "close":
                    self.close()
                return response.status, response.reason, content
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as exc:
                self.close()
                if reused and attempt + 1 < attempts:
                    continue
                raise CliError(
                    f"{self.target.url} closed the connection ({_reason(exc)})", transient=True
                ) from exc
            except ConnectionRefusedError as exc:
                self.close()
                raise CliError(
                    f"cannot connect to {self.target.url} (connection refused); is the server running? "
                    "Start it with `orchestrator serve`, or point ORCHESTRATOR_URL / --url at it",
                    transient=True,
                ) from exc
            except socket.gaierror as exc:
                self.close()
                raise CliError(
                    f"cannot resolve the host of {self.target.url}: {exc.strerror or exc}"
                ) from exc
            except TimeoutError as exc:
                self.close()
                raise CliError(
                    f"request to {self.target.url} timed out after {self.timeout:g}s", transient=True
                ) from exc
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                raise CliError(f"cannot talk to {self.target.url}: {_reason(exc)}", transient=True) from exc
        raise AssertionError("unreachable")

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params)

    def get_text(self, path: str, params: dict[str, Any]) -> tuple[str, dict[str, str]]:
        """A GET whose answer is text (a diff), with the headers that matter to it."""
        status, reason, content, headers = self._send_with_headers("GET", self._url(path, params))
        if status >= 400:
            raise error_from_response(status, reason, content, self.target)
        return content.decode(errors="replace"), headers

    def _send_with_headers(self, method: str, url: str) -> tuple[int, str, bytes, dict[str, str]]:
        status, reason, content = self._send(method, url, None, dict(self._headers))
        return status, reason, content, self.last_headers

    def open_stream(self, path: str, **params: Any) -> EventStream | None:
        """A Server-Sent Events response on its own connection (the caller reads and closes it),
        or None if the server does not stream it: callers fall back to polling."""
        import http.client

        headers = {**self._headers, "Accept": "text/event-stream"}
        connection = self._new_connection(None)  # no timeout: a stream is quiet between changes
        try:
            connection.request("GET", self._url(path, params), headers=headers)
            response = connection.getresponse()
        except (OSError, http.client.HTTPException):
            connection.close()
            return None
        content_type = response.getheader("Content-Type", "")
        if response.status != 200 or not content_type.startswith("text/event-stream"):
            connection.close()
            return None
        return EventStream(connection, response)

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body=body)

    def paged(self, path: str, key: str, *, page_size: int = 1000, **params: Any) -> Iterator[dict[str, Any]]:
        """Every item of a `{key: [...], total, limit, offset}` listing, newest first, page by page."""
        offset = 0
        while True:
            page = self.get(path, limit=page_size, offset=offset, **params)
            items: list[dict[str, Any]] = page.get(key, [])
            yield from items
            offset += len(items)
            if len(items) < page_size or offset >= int(page.get("total", 0)):
                return


def _param(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())[:160]


def client(url: str | None, token: str | None) -> ApiClient:
    return ApiClient.from_options(url, token)
