"""The address workers are handed: found from the listening sockets this process really holds."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from orchestrator.core.address import (
    ApiAddress,
    Listener,
    address_of,
    current_address,
    listening_sockets,
)
from orchestrator.core.config import Settings


def test_listening_sockets_finds_listeners_only(tmp_path: Path) -> None:
    listening = socket.create_server(("127.0.0.1", 0))
    bound_only = socket.socket()
    bound_only.bind(("127.0.0.1", 0))
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(tmp_path / "api.sock"))
    unix.listen()
    try:
        found = listening_sockets()
        names = [listener.name for listener in found]
        assert listening.getsockname() in names
        assert bound_only.getsockname() not in names
        assert str(tmp_path / "api.sock") in names
    finally:
        for sock in (listening, bound_only, unix):
            sock.close()
    assert str(tmp_path / "api.sock") not in [lst.name for lst in listening_sockets()]


@pytest.mark.parametrize(
    ("listener", "url"),
    [
        (Listener(socket.AF_INET, ("0.0.0.0", 9001)), "http://127.0.0.1:9001"),
        (Listener(socket.AF_INET, ("10.1.2.3", 9001)), "http://10.1.2.3:9001"),
        (Listener(socket.AF_INET6, ("::", 9001, 0, 0)), "http://[::1]:9001"),
        (Listener(socket.AF_INET6, ("fe80::1%eth0", 9001, 0, 2)), "http://[fe80::1]:9001"),
        (Listener(socket.AF_INET6, ("::ffff:127.0.0.1", 9001, 0, 0)), "http://127.0.0.1:9001"),
    ],
)
def test_wildcard_binds_become_the_loopback(listener: Listener, url: str) -> None:
    assert address_of(listener) == ApiAddress(url=url)


def test_a_unix_socket_is_reached_by_its_path_and_an_abstract_one_not_at_all() -> None:
    assert address_of(Listener(socket.AF_UNIX, "/run/o/api.sock")) == ApiAddress(
        url="http://localhost", socket_path="/run/o/api.sock"
    )
    assert address_of(Listener(socket.AF_UNIX, "\0abstract")) is None


def test_the_explicit_url_wins_over_the_socket_and_the_configured_port_is_preferred(
    tmp_path: Path,
) -> None:
    first = socket.create_server(("127.0.0.1", 0))
    second = socket.create_server(("127.0.0.1", 0))
    try:
        port = second.getsockname()[1]
        chosen = current_address(
            Settings(port=port, orchestrator_public_url=None, orchestrator_data_dir=tmp_path)
        )
        assert chosen == ApiAddress(url=f"http://127.0.0.1:{port}")
        explicit = Settings(orchestrator_public_url="https://orch.example/", orchestrator_data_dir=tmp_path)
        assert current_address(explicit) == ApiAddress(url="https://orch.example")
    finally:
        first.close()
        second.close()
