"""The network guard's policy, from the settings a server runs with (executors/netguard.py); the
rules themselves are tested for real, against hostile sandboxed agents, in
tests/integration/test_sandbox_network.py."""

from __future__ import annotations

from pathlib import Path

from orchestrator.executors import netguard


def test_a_remote_database_and_ray_gcs_are_blocked_by_address_and_port() -> None:
    p = netguard.policy(61000, 4096, "postgresql+asyncpg://u:p@192.0.2.7/db", "198.51.100.3:6380")
    assert p.uids == (61000, 65095)
    assert p.blocked == (("192.0.2.7", 5432), ("198.51.100.3", 6380))
    p = netguard.policy(61000, 10, "mysql://u@[2001:db8::5]:3307/db", "ray://198.51.100.3")
    assert p.uids == (61000, 61009)
    assert set(p.blocked) == {("2001:db8::5", 3307), ("198.51.100.3", 10001), ("198.51.100.3", 6379)}


def test_sqlite_auto_ray_and_nonsense_block_nothing_more() -> None:
    for database, ray in (("sqlite:///x.db", "auto"), (None, None), ("postgresql://h:notaport/db", "h:x")):
        assert netguard.policy(61000, 1, database, ray).blocked == ()


def test_only_local_resolvers_are_let_through(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text(
        "# x\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver ::1\nsearch lan\nnameserver bad\n"
    )
    assert netguard._local_resolvers(str(conf)) == ("127.0.0.53", "::1")
    assert netguard._local_resolvers(str(tmp_path / "missing")) == ()


def test_the_ruleset_names_this_servers_elements() -> None:
    script = netguard.ruleset(
        netguard.Policy((61000, 61009), (("192.0.2.7", 5432), ("::2", 1)), ("127.0.0.53",))
    )
    assert "add element inet orchestrator_sandbox uids { 61000-61009 }" in script
    assert "blocked4 { 192.0.2.7 . 5432 }" in script and "blocked6 { ::2 . 1 }" in script
    assert "dns4 { 127.0.0.53 }" in script and "add element inet orchestrator_sandbox dns6" not in script


def test_the_api_port_of_the_url_workers_get() -> None:
    assert netguard.api_port("http://127.0.0.1:8123") == 8123
    assert netguard.api_port("https://orchestrator.example") == 443
    assert netguard.api_port("http://localhost") == 80
    assert netguard.api_port("http://h:bad") is None


def test_model_apis_and_proxies_on_the_loopback_stay_reachable() -> None:
    environ = {
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:4000",
        "OPENAI_BASE_URL": "http://localhost:11434/v1",
        "https_proxy": "http://[::1]:3128",
        "OTHER_BASE_URL": "https://api.example.invalid:8443",  # not this host: no rule needed
        "DATABASE_URL": "postgresql://127.0.0.1:5432/db",  # not a model API
        "HTTP_PROXY": "",
    }
    assert netguard.model_ports(environ) == {4000, 11434, 3128}
