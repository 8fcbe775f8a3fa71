"""A delegating simulated worker survives its server (issue 20, item 11).

It retries connection errors, torn answers and 5xx with backoff for as long as its token is
valid, and a submit whose answer was lost is looked up by its `delegation_key` before it is sent
again: the tree completes with exactly the children it asked for. The server is `kill -9`ed and
restarted on the same port and data dir; a small TCP proxy drops the answer of committed submits.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.core.auth import create_access_token
from tests.integration.test_engine_lifecycle import pid_alive, submit, wait_final, workers_of
from tests.support.db import seed_worker
from tests.support.listeners import stop_accepting
from tests.support.servers import Server, ServerFactory, free_port
from tests.support.wait import wait_until


def children_of(client: httpx.Client, job_id: str) -> list[dict[str, Any]]:
    body = client.get("/api/jobs", params={"parent_job_id": job_id, "limit": 100}).json()
    jobs: list[dict[str, Any]] = body["jobs"]
    assert body["total"] == len(jobs)
    return jobs


def output_of(server: Server, worker_id: str) -> str:
    path = Path(server.env["ORCHESTRATOR_DATA_DIR"]) / "runs" / worker_id / "output.log"
    return path.read_text(errors="replace") if path.exists() else ""


def test_server_killed_while_the_parent_waits(servers: ServerFactory) -> None:
    first = servers.start()
    with first.client() as client:
        parent = submit(
            client,
            agent_options={
                "duration_seconds": 0,
                "subtasks": [
                    {"task_description": f"child {i}", "agent_options": {"duration_seconds": 3}}
                    for i in range(2)
                ],
            },
        )
        wait_until(
            lambda: len(children_of(client, parent["id"])) == 2, timeout=60, what="both children submitted"
        )
        child_pids = wait_until(
            lambda: (
                (
                    pids := [
                        w["pid"]
                        for c in children_of(client, parent["id"])
                        for w in workers_of(client, c["id"])
                    ]
                )
                and len(pids) == 2
                and all(pids)
                and pids
            ),
            timeout=60,
            what="both children running",
        )
        (parent_worker,) = workers_of(client, parent["id"])
    first.kill9()
    # The children end while the server is down: the waiting parent has asked for their status
    # (its events stream broke with the server) and found no server, maybe several times.
    wait_until(lambda: not any(pid_alive(p) for p in child_pids), timeout=120, what="children ended")
    second = servers.make(port=first.port).start()
    with second.client() as client:
        done = wait_final(client, parent["id"], timeout=120)
        assert done["status"] == "COMPLETED", (done, output_of(second, parent_worker["id"]))
        children = children_of(client, parent["id"])
        assert sorted(c["task_description"] for c in children) == ["child 0", "child 1"]
        assert {c["status"] for c in children} == {"COMPLETED"}


def test_server_killed_before_the_parent_submits(servers: ServerFactory) -> None:
    first = servers.start()
    with first.client() as client:
        parent = submit(
            client,
            agent_options={
                "duration_seconds": 8,
                "progress_interval_seconds": 0.2,
                "subtasks": ["only child"],
            },
        )
        wait_until(
            lambda: (ws := workers_of(client, parent["id"])) and ws[0]["status"] == "RUNNING" and ws,
            timeout=60,
            what="the parent running",
        )
        (parent_worker,) = workers_of(client, parent["id"])
    first.kill9()

    def past_its_work() -> bool:
        """The parent wrote something after its work steps: it has tried to submit."""
        lines = output_of(first, parent_worker["id"]).splitlines()[1:]
        return any("working... step" not in line for line in lines)

    wait_until(past_its_work, timeout=120, what="the parent's submit to meet the dead server")
    second = servers.make(port=first.port).start()
    with second.client() as client:
        done = wait_final(client, parent["id"], timeout=120)
        assert done["status"] == "COMPLETED", (done, output_of(second, parent_worker["id"]))
        (child,) = children_of(client, parent["id"])
        assert child["task_description"] == "only child" and child["status"] == "COMPLETED"


class AnswerDroppingProxy:
    """Forwards TCP connections to `upstream`; the answers of the first `drops` submits (POST
    /api/jobs/submit) are read from the server, so the submit is committed, and then dropped:
    the first is cut before its first byte, the next ones after half of it (a torn answer)."""

    def __init__(self, upstream: int, drops: int) -> None:
        self.upstream = upstream
        self.drops = drops
        self.dropped: list[bytes] = []
        self.port = free_port()
        self.listener = socket.create_server(("127.0.0.1", self.port))
        self.threads: list[threading.Thread] = []
        self.closing = False
        self.lock = threading.Lock()

    def __enter__(self) -> AnswerDroppingProxy:
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self.threads.append(thread)
        return self

    def __exit__(self, *_: object) -> None:
        self.closing = True
        for thread in self.threads:
            stop_accepting(self.listener, thread)

    def _accept(self) -> None:
        while not self.closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client, socket.create_connection(("127.0.0.1", self.upstream)) as server:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(65536)
                if not chunk:
                    return
                head += chunk
            header, _, body = head.partition(b"\r\n\r\n")
            length = 0
            for line in header.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            while len(body) < length:
                chunk = client.recv(65536)
                if not chunk:
                    return
                body += chunk
            server.sendall(header + b"\r\n\r\n" + body)
            with self.lock:
                drop = header.startswith(b"POST /api/jobs/submit ") and len(self.dropped) < self.drops
                if drop:
                    self.dropped.append(body)
            if not drop:
                threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()
                self._pipe(server, client)
                return
            answer = b""
            while chunk := server.recv(65536):  # the whole answer: the submit is committed
                answer += chunk
            if len(self.dropped) > 1:
                client.sendall(answer[: len(answer) // 2])
            client.shutdown(socket.SHUT_RDWR)

    @staticmethod
    def _pipe(source: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                target.sendall(chunk)
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass


@pytest.fixture
def proxied(servers: ServerFactory) -> Iterator[tuple[Server, AnswerDroppingProxy]]:
    port = free_port()
    with AnswerDroppingProxy(port, drops=2) as proxy:
        server = servers.make(port=port, ORCHESTRATOR_PUBLIC_URL=f"http://127.0.0.1:{proxy.port}")
        yield server.start(), proxy


def test_a_committed_submit_whose_answer_was_lost_is_not_made_twice(
    proxied: tuple[Server, AnswerDroppingProxy],
) -> None:
    server, proxy = proxied
    with server.client() as client:
        parent = submit(
            client,
            agent_options={"duration_seconds": 0, "subtasks": ["first", "second", "third"]},
        )
        done = wait_final(client, parent["id"], timeout=120)
        (worker,) = workers_of(client, parent["id"])
        assert done["status"] == "COMPLETED", (done, output_of(server, worker["id"]))
        assert len(proxy.dropped) == 2, "the proxy dropped two committed submits' answers"
        children = children_of(client, parent["id"])
        assert sorted(c["task_description"] for c in children) == ["first", "second", "third"]
        assert {c["status"] for c in children} == {"COMPLETED"}
        keys = {c["delegation_key"] for c in children}
        assert keys == {f"{worker['id']}:{i}" for i in range(3)}


def test_delegation_keys_are_unique_per_parent_and_seen_only_in_the_subtree(
    servers: ServerFactory,
) -> None:
    """A hostile worker cannot learn another tree's children by their keys, nor take a key twice."""
    api = servers.start(ORCHESTRATOR_ENGINE="false")
    with api.client() as client:
        mine = submit(client)
        theirs = submit(client)
        key = "w_0123456789ab:0"
        child = client.post(
            "/api/jobs/submit",
            json={"task_description": "t", "depth": 1, "parent_job_id": theirs["id"], "delegation_key": key},
        )
        assert child.status_code == 201 and child.json()["delegation_key"] == key, child.text
        again = client.post(
            "/api/jobs/submit",
            json={"task_description": "t", "depth": 1, "parent_job_id": theirs["id"], "delegation_key": key},
        )
        assert again.status_code == 409 and child.json()["id"] in again.json()["detail"], again.text
        found = client.get("/api/jobs", params={"parent_job_id": theirs["id"], "delegation_key": key})
        assert [j["id"] for j in found.json()["jobs"]] == [child.json()["id"]]
        # The same key under another parent is another child.
        other = client.post(
            "/api/jobs/submit",
            json={"task_description": "t", "depth": 1, "parent_job_id": mine["id"], "delegation_key": key},
        )
        assert other.status_code == 201, other.text
        for bad in ({"delegation_key": key}, {"delegation_key": "a b", "parent_job_id": mine["id"]}):
            r = client.post("/api/jobs/submit", json={"task_description": "t", "depth": 1, **bad})
            assert r.status_code == 422 and "delegation_key" in r.text, r.text
        assert client.get("/api/jobs", params={"delegation_key": "x\ny"}).status_code == 422

    worker_token = create_access_token(
        user_id="test-user",
        scopes=["jobs:read", "jobs:write"],
        worker_id=seed_worker(api, mine["id"]),
        job_id=mine["id"],
    )
    with httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {worker_token}"}) as worker:
        seen = worker.get("/api/jobs", params={"delegation_key": key}).json()
        assert [j["id"] for j in seen["jobs"]] == [other.json()["id"]], seen
        r = worker.get("/api/jobs", params={"parent_job_id": theirs["id"], "delegation_key": key})
        assert r.status_code == 200 and r.json()["total"] == 0, r.text
        taken = worker.post(
            "/api/jobs/submit",
            json={"task_description": "t", "depth": 1, "parent_job_id": mine["id"], "delegation_key": key},
        )
        assert taken.status_code == 409, taken.text
