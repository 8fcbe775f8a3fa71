"""Memory-aware admission is visible: this host's available memory, what running workers' limits
reserve and what a new worker may still take, in `GET /api/resources/usage` and `/metrics`."""

from __future__ import annotations

from pathlib import Path

from tests.integration.test_engine_lifecycle import submit, workers_of
from tests.support.servers import ServerFactory
from tests.support.wait import wait_until


def agents_file(root: Path) -> str:
    path = root / "capacity-agents.toml"
    path.write_text('[agents.sleeper]\ncommand = ["bash", "-c", "echo up; sleep 600 & wait"]\n')
    return str(path)


def metric(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + "{"))
    return float(line.rsplit(" ", 1)[1])


def test_capacity_and_reservations_in_usage_and_metrics(servers: ServerFactory) -> None:
    meminfo = servers.root / "meminfo"
    meminfo.write_text(f"MemTotal: {8192 * 1024} kB\nMemAvailable: {6000 * 1024} kB\n")
    server = servers.start(
        ORCHESTRATOR_AGENTS_FILE=agents_file(servers.root),
        ORCHESTRATOR_MEMINFO_PATH=str(meminfo),
        ORCHESTRATOR_MEMORY_HEADROOM_MB="300",
    )
    with server.client() as client:
        job = submit(client, agent="sleeper", limits={"memory_mb": 700})
        wait_until(
            lambda: any(w["status"] == "RUNNING" for w in workers_of(client, job["id"])),
            what="worker running",
        )
        capacity = client.get("/api/resources/usage").json()["capacity"]
        assert capacity["memory_available_mb"] == 6000 and capacity["memory_headroom_mb"] == 300
        # Other servers on this host count too (the kernel's groups are per host): at least ours.
        assert capacity["memory_reserved_mb"] >= 700 and capacity["workers_reserving"] >= 1, capacity
        assert capacity["memory_free_for_workers_mb"] == 6000 - capacity["memory_reserved_mb"] - 300
        text = client.get("/metrics").text
        assert metric(text, "orchestrator_host_memory_available_mb") == 6000
        assert metric(text, "orchestrator_host_memory_headroom_mb") == 300
        assert metric(text, "orchestrator_host_memory_reserved_mb") >= 700
        free = metric(text, "orchestrator_host_memory_free_for_workers_mb")
        assert free == 6000 - metric(text, "orchestrator_host_memory_reserved_mb") - 300
        assert f'host="{capacity["host"]}"' in text
        client.post(f"/api/jobs/{job['id']}/cancel")
