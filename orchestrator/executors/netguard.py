"""The sandbox's network guard: a sandboxed agent with network on reaches the internet (the model
API) and the orchestrator API, and none of this host's own services.

Why: with network on a worker shares the host's network namespace, and the host's services trust
their loopback (PostgreSQL with trust auth is the whole database; Redis, MariaDB, a Ray GCS…).
bwrap cannot tell one destination from another, so the kernel does: agents run as host uids of
their own (`ORCHESTRATOR_SANDBOX_UID` …, when the server is root), and an nftables table of ours
filters what those uids send. Chosen over a user-mode network stack per worker (`pasta`,
slirp4netns) because it costs nothing per start, adds no process to a worker's group (pause,
terminate and re-adoption after `kill -9` stay as they are), and, living in the kernel, keeps
confining workers whose server died. Its one gap: abstract Unix sockets, which belong to the
network namespace, not to an address (docs/SANDBOX.md).

The rules (`inet orchestrator_sandbox`, one table for every server on the host):
- to this host's own addresses (anything routed through `lo`: 127/8, ::1 and the host's other
  addresses): the API ports in `api_ports` and DNS to a local resolver pass; a TCP connection to
  any other port is let through to its first answer, which decides: an answer from a socket of an
  agent uid (the agent's own test server) passes, any other (a host service) is dropped and the
  connection reset, so the service never sees an established connection. TCP Fast Open (data in
  the SYN) and every other protocol to the host are refused outright;
- to the database's and the Ray GCS's host:port (from DATABASE_URL and RAY_ADDRESS, when they are
  on another host) and the cloud metadata service: refused.
The chains are rewritten in one transaction by every server that starts (the same rules);
the sets keep the elements each server adds. A server's API port expires unless the server
refreshes it, so a port a dead server left behind does not stay open.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

from orchestrator.core.config import Settings
from orchestrator.executors import sandbox as sandboxing
from orchestrator.executors.sandbox import SandboxHost

log = logging.getLogger(__name__)

TABLE = "orchestrator_sandbox"
DEFAULT_UID_COUNT = 4096  # the agents' uid range when the settings name no count
# An API port no live server refreshes is gone after this; each server refreshes its own.
PORT_TIMEOUT_SECONDS = 180
PORT_REFRESH_SECONDS = 30.0
# Cloud instance metadata (credentials of the machine's role): never an agent's business.
METADATA = ("169.254.169.254", "fd00:ec2::254")
# ct mark bits of ours (the rest of the mark is left to others): a connection an agent opened to
# a local port, waiting for its answer; one answered by an agent's socket; one refused.
MASK, PENDING, OWN, DENIED = 0x00700000, 0x00100000, 0x00200000, 0x00400000


@dataclass(frozen=True)
class Policy:
    """What the guard installs for this server."""

    uids: tuple[int, int]  # first and last host uid agents run as
    blocked: tuple[tuple[str, int], ...] = ()  # (address, port) of the database, the Ray GCS
    dns: tuple[str, ...] = ()  # local resolvers (resolv.conf) agents may query on port 53


def policy(uid: int, uid_count: int, database_url: str | None, ray_address: str | None) -> Policy:
    """The policy for agents of uids uid..uid+uid_count-1 on a server with these settings."""
    blocked: list[tuple[str, int]] = []
    for host, port in (_database_endpoint(database_url), *_ray_endpoints(ray_address)):
        if host is not None and port is not None:
            blocked += [(address, port) for address in _addresses(host)]
    return Policy((uid, uid + uid_count - 1), tuple(sorted(set(blocked))), _local_resolvers())


def _database_endpoint(url: str | None) -> tuple[str | None, int | None]:
    if not url or url.startswith("sqlite"):
        return None, None
    parts = urlsplit(url)
    defaults = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mariadb": 3306}
    scheme = parts.scheme.split("+", 1)[0]
    try:
        port = parts.port or defaults.get(scheme)
    except ValueError:
        return None, None
    return parts.hostname, port


def _ray_endpoints(address: str | None) -> list[tuple[str | None, int | None]]:
    if not address or address == "auto":
        return []
    parts = urlsplit(address if "://" in address else f"gcs://{address}")
    try:
        port = parts.port
    except ValueError:
        return []
    found: list[tuple[str | None, int | None]] = [(parts.hostname, port or 6379)]
    if parts.scheme == "ray":  # Ray Client (10001 by default) runs beside the GCS
        found = [(parts.hostname, port or 10001), (parts.hostname, 6379)]
    return found


def _addresses(host: str) -> list[str]:
    with contextlib.suppress(OSError, UnicodeError):
        return sorted({str(info[4][0]).split("%", 1)[0] for info in socket.getaddrinfo(host, None)})
    return []


def _local_resolvers(path: str = "/etc/resolv.conf") -> tuple[str, ...]:
    """Nameservers on this host (systemd-resolved's 127.0.0.53, a container's 127.0.0.11): the
    agents need DNS to reach the model API, and the loopback is otherwise closed to them."""
    found: list[str] = []
    with contextlib.suppress(OSError), open(path) as handle:
        for line in handle:
            fields = line.split()
            if len(fields) >= 2 and fields[0] == "nameserver":
                with contextlib.suppress(ValueError):
                    address = ipaddress.ip_address(fields[1].split("%", 1)[0])
                    if address.is_loopback:
                        found.append(str(address))
    return tuple(found)


def ruleset(p: Policy) -> str:
    """The nft script: the table, its sets and chains (rewritten whole, in one transaction, so
    servers that start together agree), and this server's elements (added to the others')."""
    t = f"inet {TABLE}"
    keep = f"ct mark and {hex(0xFFFFFFFF ^ MASK)}"
    denied = f"ct mark and {hex(MASK)} == {hex(DENIED)}"
    lines = [
        f"add table {t}",
        f"add set {t} uids {{ type uid; flags interval; auto-merge; }}",
        f"add set {t} api_ports {{ type inet_service; flags timeout; }}",
        f"add set {t} blocked4 {{ type ipv4_addr . inet_service; }}",
        f"add set {t} blocked6 {{ type ipv6_addr . inet_service; }}",
        f"add set {t} dns4 {{ type ipv4_addr; }}",
        f"add set {t} dns6 {{ type ipv6_addr; }}",
        # Before NAT (-100): a local port a container publishes is still seen as the host's.
        f"add chain {t} output {{ type filter hook output priority -150; policy accept; }}",
        f"add chain {t} agent",
        f"add chain {t} to_host",
        f"add chain {t} answer",
        *(f"flush chain {t} {chain}" for chain in ("output", "agent", "to_host", "answer")),
        # A refused connection: the agent's retries (and the service's) are reset (the resets
        # themselves belong to the connection: they pass).
        f"add rule {t} output {denied} tcp flags & rst == rst accept",
        f"add rule {t} output {denied} meta l4proto tcp reject with tcp reset",
        f"add rule {t} output {denied} drop",
        f"add rule {t} output ct mark and {hex(MASK)} == {hex(PENDING)} ct direction reply jump answer",
        f"add rule {t} output meta skuid @uids jump agent",
        # The first answer to an agent's connection to a local port: whose socket sends it?
        f"add rule {t} answer meta skuid @uids ct mark set {keep} or {hex(OWN)} accept",
        f"add rule {t} answer tcp flags & rst == rst accept",  # nothing listens there
        f"add rule {t} answer ct mark set {keep} or {hex(DENIED)} drop",
        f"add rule {t} agent ct direction reply accept",  # the agent's own server answering
        f"add rule {t} agent ct mark and {hex(MASK)} == {hex(OWN)} accept",
        f"add rule {t} agent meta l4proto {{ tcp, udp }} ip daddr . th dport @blocked4 reject",
        f"add rule {t} agent meta l4proto {{ tcp, udp }} ip6 daddr . th dport @blocked6 reject",
        f"add rule {t} agent ip daddr {METADATA[0]} reject",
        f"add rule {t} agent ip6 daddr {METADATA[1]} reject",
        f'add rule {t} agent oifname "lo" jump to_host',
        f"add rule {t} agent fib daddr type local jump to_host",
        f"add rule {t} to_host meta l4proto tcp th dport @api_ports accept",
        f"add rule {t} to_host meta l4proto {{ tcp, udp }} th dport 53 ip daddr @dns4 accept",
        f"add rule {t} to_host meta l4proto {{ tcp, udp }} th dport 53 ip6 daddr @dns6 accept",
        f"add rule {t} to_host tcp option fastopen exists reject with tcp reset",
        f"add rule {t} to_host tcp flags & (syn | ack) == syn ct mark set {keep} or {hex(PENDING)} accept",
        f"add rule {t} to_host meta l4proto tcp reject with tcp reset",
        f"add rule {t} to_host reject",
        f"add element {t} uids {{ {p.uids[0]}-{p.uids[1]} }}",
    ]
    v4 = [(a, port) for a, port in p.blocked if ipaddress.ip_address(a).version == 4]
    v6 = [(a, port) for a, port in p.blocked if ipaddress.ip_address(a).version == 6]
    for name, items in (("blocked4", v4), ("blocked6", v6)):
        if items:
            lines.append(f"add element {t} {name} {{ {', '.join(f'{a} . {port}' for a, port in items)} }}")
    for name, version in (("dns4", 4), ("dns6", 6)):
        chosen = [a for a in p.dns if ipaddress.ip_address(a).version == version]
        if chosen:
            lines.append(f"add element {t} {name} {{ {', '.join(chosen)} }}")
    return "\n".join(lines) + "\n"


def _nft(script: str, attempts: int = 3) -> str | None:
    """Run an nft script in one transaction; the error, or None. Tried again on failure: a
    transaction of another server at the same moment can make one fail ("busy")."""
    nft = shutil.which("nft")
    if nft is None:
        return "nft (the nftables package) is not on PATH"
    problem: str | None = None
    for _ in range(attempts):
        try:
            done = subprocess.run(
                [nft, "-f", "-"], input=script, capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"nft could not run: {exc}"
        if done.returncode == 0:
            return None
        problem = (done.stderr.strip() or f"nft exited {done.returncode}")[:300]
    return problem


def install(p: Policy) -> str | None:
    """Install (or bring up to date) the table for this server: None, or why it cannot be."""
    if os.geteuid() != 0:
        return "it needs root (nftables)"
    problem = _nft(ruleset(p))
    return None if problem is None else f"nftables: {problem}"


class PortKeeper:
    """Keeps this process's API port(s) in `api_ports`: added now, refreshed every
    PORT_REFRESH_SECONDS by a daemon thread (several servers may serve one port: `--workers`),
    left to expire when the process is gone."""

    def __init__(self) -> None:
        self.ports: set[int] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def allow(self, ports: set[int]) -> str | None:
        with self._lock:
            self.ports |= ports
            if self._thread is None and ports:
                self._thread = threading.Thread(target=self._refresh_forever, name="netguard", daemon=True)
                self._thread.start()
        return refresh(ports)

    def _refresh_forever(self) -> None:
        event = threading.Event()
        while not event.wait(PORT_REFRESH_SECONDS):
            with self._lock:
                ports = set(self.ports)
            problem = refresh(ports)
            if problem is not None:
                log.warning("could not refresh the sandbox's API ports %s: %s", sorted(ports), problem)


def refresh(ports: set[int]) -> str | None:
    """(Re)add the ports with a fresh timeout, in one transaction (never missing in between)."""
    if not ports:
        return None
    t = f"inet {TABLE}"
    listed = ", ".join(str(port) for port in sorted(ports))
    timed = ", ".join(f"{port} timeout {PORT_TIMEOUT_SECONDS}s" for port in sorted(ports))
    script = f"add element {t} api_ports {{ {listed} }}\ndelete element {t} api_ports {{ {listed} }}\n"
    return _nft(script + f"add element {t} api_ports {{ {timed} }}\n")


def api_port(url: str) -> int | None:
    """The port of the API URL workers are given, when it is on this host (else no rule is
    needed: the guard only closes this host's own addresses)."""
    parts = urlsplit(url)
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    return port


def model_ports(environ: dict[str, str] | os._Environ[str]) -> set[int]:
    """Ports of the model APIs and proxies agents are pointed at on this host's loopback
    (`ANTHROPIC_BASE_URL`, `OPENAI_BASE_URL`, `HTTPS_PROXY`…: a LiteLLM or Ollama on
    localhost, a local egress proxy): the agents need them, and the guard would close them."""
    ports: set[int] = set()
    for name, value in environ.items():
        if not name.upper().endswith(("_BASE_URL", "_PROXY")) or "://" not in value:
            continue
        host, port = urlsplit(value).hostname, api_port(value)
        loopback = host is not None and any(ipaddress.ip_address(a).is_loopback for a in _addresses(host))
        if loopback and port is not None:
            ports.add(port)
    return ports


KEEPER = PortKeeper()


def guard_host(settings: Settings, host: SandboxHost) -> SandboxHost:
    """The sandbox probe's network part: the host with the guard installed, or with why it
    cannot be (workers then fail to start, as with any sandbox problem), unless the operator
    turned it off (ORCHESTRATOR_SANDBOX_NETWORK_GUARD=off: logged as a warning)."""
    if settings.orchestrator_sandbox_network_guard == "off":
        log.warning(
            "ORCHESTRATOR_SANDBOX_NETWORK_GUARD=off: sandboxed workers with network on can reach "
            "this host's own services (the database, Redis, …)"
        )
        return host
    if host.uid is None:
        problem: str | None = "it needs root (nftables), and the agents a uid of their own"
    else:
        count = settings.orchestrator_sandbox_uid_count
        problem = install(policy(host.uid, count, settings.database_url, settings.ray_address))
    if problem is None:
        return host
    reason = f"no network guard: {problem} (ORCHESTRATOR_SANDBOX_NETWORK_GUARD=off runs without it)"
    return dataclasses.replace(host, problem=reason)


def sandbox_host(settings: Settings) -> SandboxHost:
    """The sandbox probe for these settings (uid range included) with this host's network guard:
    what the local and the Ray executor confine workers with."""
    host = sandboxing.detect(
        settings.data_dir,
        uid=settings.orchestrator_sandbox_uid,
        uid_count=settings.orchestrator_sandbox_uid_count,
    )
    return guard_host(settings, host) if host.usable else host


def allow_api(host: SandboxHost | None, guard: str, url: str) -> None:
    """Let sandboxed agents reach the API at `url`, and the model APIs their environment names
    on this host (also with the guard off here: another server's guard may cover the same uids)."""
    ports = {port for port in [api_port(url)] if port} | model_ports(os.environ)
    if host is not None and host.usable and host.uid is not None:
        problem = KEEPER.allow(ports)
        if problem is not None and guard == "on":
            log.error("sandboxed workers cannot reach ports %s here: %s", sorted(ports), problem)
