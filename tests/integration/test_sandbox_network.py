"""The sandbox's network guard (executors/netguard.py, docs/SANDBOX.md) against hostile agents: a real
sandboxed worker with network on tries this host's own services (PostgreSQL, Redis, MariaDB, a
listener the test opens, on the loopback and on the host's own address) and the API with its
token; the script's own report in the worker log proves it ran. Every server on the host shares
the guard's table: tests run many servers side by side."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from orchestrator.executors import netguard
from tests.integration.test_engine_lifecycle import log_lines, submit, wait_final, workers_of
from tests.support.agent_scripts import API_CALL
from tests.support.listeners import stop_accepting
from tests.support.servers import ServerFactory
from tests.support.wait import wait_until

# The guard's table is the host's, shared with every server on it (other test runs too): these
# servers' agents get uid ranges of their own, so the elements they add concern only them.
GUARDED_UID, UNGUARDED_UID = "71000", "79000"

PROBE = (
    API_CALL
    + r"""
import socket, sys, threading
spec = json.loads(sys.stdin.read())
report = {}

def reach(label, host, port):
    try:
        with socket.create_connection((host, port), timeout=15) as conn:
            conn.sendall(b"PING\r\n")
            conn.settimeout(5)
            try:
                answer = conn.recv(64)
            except OSError as exc:
                answer = type(exc).__name__.encode()
        report[label] = "ok: " + answer.decode(errors="replace")[:60]
    except Exception as exc:
        report[label] = "blocked: " + type(exc).__name__

def own_server():
    # The agent's own test server on the loopback (a coding agent runs its project's tests).
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        def serve():
            conn, _ = server.accept()
            with conn:
                conn.sendall(b"mine")
        threading.Thread(target=serve, daemon=True).start()
        with socket.create_connection(("127.0.0.1", port), timeout=15) as conn:
            return conn.recv(16).decode()

threads = [threading.Thread(target=reach, args=target) for target in spec["targets"]]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
try:
    report["own_server"] = "ok: " + own_server()
except Exception as exc:
    report["own_server"] = "blocked: " + type(exc).__name__
try:
    status, _ = call("GET", "/api/jobs/" + JOB)
    report["api"] = status
except Exception as exc:
    report["api"] = "blocked: " + type(exc).__name__
print("REPORT " + json.dumps(report), flush=True)
"""
)


def agents(root: Path) -> str:
    scripts = root / "net-scripts"
    scripts.mkdir(exist_ok=True)
    (scripts / "probe.py").write_text(PROBE)
    command = f'command = ["{sys.executable}", "{scripts / "probe.py"}"]\nro_binds = ["{scripts}"]\n'
    path = root / "net-agents.toml"
    path.write_text(f'[agents.probe]\n{command}[agents.offline_probe]\n{command}network = "none"\n')
    return str(path)


def host_address() -> str:
    """This host's own non-loopback address (the one its default route leaves from)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))  # no packet is sent: only the route is looked up
        address: str = probe.getsockname()[0]
    assert not address.startswith("127."), address
    return address


@contextmanager
def host_listener() -> Iterator[tuple[int, list[str]]]:
    """A TCP service of the host on every address (dual stack), answering "service" and noting
    each connection it accepted."""
    server = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    while _allowed(server.getsockname()[1]):  # a port a stopped server's API had, not expired yet
        server.close()
        server = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    accepted: list[str] = []

    def serve() -> None:
        while True:
            try:
                conn, peer = server.accept()
            except OSError:
                return
            accepted.append(str(peer[0]))
            with conn:
                conn.sendall(b"service")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], accepted
    finally:
        stop_accepting(server, thread)


def _allowed(port: int) -> bool:
    try:
        return any(_port_of(e) == port for e in nft_set("api_ports"))
    except (OSError, subprocess.CalledProcessError):  # no guard table (yet)
        return False


def _port_of(element: Any) -> int | None:
    value = element.get("elem", {}).get("val") if isinstance(element, dict) else element
    return value if isinstance(value, int) else None


def probe_report(client: httpx.Client, agent: str, targets: list[list[Any]]) -> tuple[dict[str, Any], str]:
    job = submit(client, agent=agent, task_description=json.dumps({"targets": targets}))
    done = wait_final(client, job["id"], timeout=120)
    worker = workers_of(client, job["id"])[0]
    lines = log_lines(client, worker["id"])
    line = next((line for line in lines if line.startswith("REPORT ")), None)
    assert line is not None, (worker["status_reason"], lines)  # the script ran: its report is here
    report: dict[str, Any] = json.loads(line[len("REPORT ") :])
    return report, done["status"]


def targets(port: int) -> list[list[Any]]:
    found: list[list[Any]] = [
        ["postgres", "127.0.0.1", 5432],
        ["redis", "127.0.0.1", 6379],
        ["redis_v6", "::1", 6379],
        ["mariadb", "127.0.0.1", 3306],
        ["listener_loopback", "127.0.0.1", port],
        ["listener_other_loopback", "127.0.0.2", port],
        ["listener_v6", "::1", port],
        ["listener_host_address", host_address(), port],
        ["listener_wildcard", "0.0.0.0", port],
    ]
    return found


def ready_body(client: httpx.Client) -> dict[str, Any]:
    """/ready once it says ready (the server answers /health before its engine has started)."""
    body: dict[str, Any] = wait_until(
        lambda: (r := client.get("/ready")).status_code == 200 and r.json(), what="/ready 200"
    )
    return body


def test_sandboxed_agent_reaches_the_api_and_none_of_the_hosts_services(servers: ServerFactory) -> None:
    server = servers.start(
        ORCHESTRATOR_AGENTS_FILE=agents(servers.root), ORCHESTRATOR_SANDBOX_UID=GUARDED_UID
    )
    # The database of this very server: PostgreSQL's address (TEST_DATABASE=postgres) or, on
    # SQLite, the PostgreSQL of the machine all the same.
    with server.client() as client, host_listener() as (port, accepted):
        ready = ready_body(client)
        assert ready["sandbox"]["status"] == "on" and ready["sandbox"]["network_guard"] == "on", ready
        report, status = probe_report(client, "probe", targets(port))
        assert status == "COMPLETED", report
        for label, *_ in targets(port):
            assert report[label].startswith("blocked"), (label, report)
        assert accepted == []  # the host's service never saw an established connection
        assert report["api"] == 200, report  # the API, with the worker's own token
        assert report["own_server"] == "ok: mine", report  # its own test server works

        offline, status = probe_report(client, "offline_probe", targets(port)[:2])
        assert all(offline[label].startswith("blocked") for label in ("postgres", "redis", "api")), offline
        assert offline["own_server"] == "ok: mine", offline  # its own loopback
        assert client.get("/health").status_code == 200


def test_without_the_guard_the_same_agent_reaches_the_hosts_services(servers: ServerFactory) -> None:
    """What the guard closes: with ORCHESTRATOR_SANDBOX_NETWORK_GUARD=off (an explicit choice,
    shown in /ready) the same probe reaches the test's listener and Redis."""
    server = servers.start(
        ORCHESTRATOR_AGENTS_FILE=agents(servers.root),
        ORCHESTRATOR_SANDBOX_NETWORK_GUARD="off",
        ORCHESTRATOR_SANDBOX_UID=UNGUARDED_UID,
    )
    with server.client() as client, host_listener() as (port, accepted):
        assert ready_body(client)["sandbox"]["network_guard"] == "off"
        report, _ = probe_report(client, "probe", [["listener_loopback", "127.0.0.1", port]])
        assert report["listener_loopback"] == "ok: service", report
        assert accepted
    assert "ORCHESTRATOR_SANDBOX_NETWORK_GUARD=off" in server.log()


def test_a_host_where_the_guard_cannot_be_set_up_says_why_and_starts_no_worker(
    servers: ServerFactory,
) -> None:
    # No nft on PATH (bwrap and setpriv are in /usr/bin, nft in /usr/sbin): never silently open.
    server = servers.start(
        ORCHESTRATOR_AGENTS_FILE=agents(servers.root),
        ORCHESTRATOR_SANDBOX_UID=GUARDED_UID,
        PATH="/usr/bin:/bin",
    )
    with server.client() as client:
        sandbox = ready_body(client)["sandbox"]
        assert sandbox["status"] == "unavailable" and "network guard" in sandbox["reason"], sandbox
        assert "nft" in sandbox["reason"] and "ORCHESTRATOR_SANDBOX_NETWORK_GUARD=off" in sandbox["reason"]
        job = submit(client, agent="probe", task_description=json.dumps({"targets": []}))
        assert wait_final(client, job["id"])["status"] == "FAILED"
        reason = workers_of(client, job["id"])[0]["status_reason"]
        assert "sandbox cannot work on this host" in reason and "network guard" in reason, reason


def nft_set(name: str) -> list[Any]:
    done = subprocess.run(
        ["nft", "-j", "list", "set", "inet", netguard.TABLE, name], capture_output=True, text=True, check=True
    )
    for item in json.loads(done.stdout)["nftables"]:
        if "set" in item:
            elements: list[Any] = item["set"].get("elem", [])
            return elements
    return []


def test_servers_sharing_the_host_keep_each_others_elements(monkeypatch: Any) -> None:
    """Two servers' start-ups (overlapping uid ranges, other blocked addresses) and ports: each
    keeps what the other added; a port no server refreshes expires."""
    first = netguard.Policy((71000, 75095), (("192.0.2.10", 5432),))
    second = netguard.Policy((75000, 75100), (("192.0.2.11", 6379),))
    assert netguard.install(first) is None and netguard.install(second) is None
    assert netguard.install(first) is None  # again: idempotent
    ranges = [e["range"] for e in nft_set("uids") if isinstance(e, dict) and "range" in e]
    assert any(low <= 71000 and high >= 75100 for low, high in ranges), ranges  # merged
    blocked = json.dumps(nft_set("blocked4"))
    assert "192.0.2.10" in blocked and "192.0.2.11" in blocked
    assert netguard.refresh({40001}) is None and netguard.refresh({40002}) is None
    assert netguard.refresh({40001}) is None  # the refresh of one leaves the other
    ports = json.dumps(nft_set("api_ports"))
    assert "40001" in ports and "40002" in ports, ports
    monkeypatch.setattr(netguard, "PORT_TIMEOUT_SECONDS", 1)
    assert netguard.refresh({40003}) is None
    wait_until(lambda: "40003" not in json.dumps(nft_set("api_ports")), timeout=30, what="port 40003 expires")
