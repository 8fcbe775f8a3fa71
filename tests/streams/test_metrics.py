"""/metrics, /ready, request ids and structured logs, on real servers."""

from __future__ import annotations

import io
import json
import logging

import httpx
from prometheus_client.parser import text_string_to_metric_families

from orchestrator.api import observability
from tests.support.servers import Server, ServerFactory
from tests.support.wait import wait_until

EXPECTED = {
    "orchestrator_jobs",
    "orchestrator_workers",
    "orchestrator_slots_allocated",
    "orchestrator_slots_available",
    "orchestrator_slots_max",
    "orchestrator_job_submit_to_running_seconds",
    "orchestrator_worker_duration_seconds",
    "orchestrator_agent_cost_usd",
    "orchestrator_agent_tokens",
    "orchestrator_engines_live",
    "orchestrator_http_request_duration_seconds",
    "orchestrator_metrics_scrape_seconds",
}


def scrape(server: Server) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """{sample name: {sorted labels: value}}."""
    resp = httpx.get(f"{server.url}/metrics", timeout=10)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def families(server: Server) -> set[str]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    return {f.name for f in text_string_to_metric_families(text)}


def test_metrics_match_the_api_while_jobs_run(servers: ServerFactory) -> None:
    server = servers.start(workers=2)
    with server.client() as client:
        job = client.post(
            "/api/jobs/submit",
            json={"task_description": "m", "worker_count": 3, "agent_options": {"duration_seconds": 30}},
        ).json()
        wait_until(
            lambda: client.get("/api/resources/usage").json()["usage"][0]["allocated"] == 3,
            timeout=20,
            what="3 slots allocated at depth 0",
        )
        assert families(server) >= EXPECTED
        usage = client.get("/api/resources/usage").json()["usage"]
        samples = scrape(server)
        for row in usage:
            key = (("depth", str(row["depth"])),)
            assert samples["orchestrator_slots_allocated"][key] == row["allocated"]
            assert samples["orchestrator_slots_available"][key] == row["available"]
            assert samples["orchestrator_slots_max"][key] == row["max_workers"]
        assert samples["orchestrator_jobs"][(("depth", "0"), ("status", "RUNNING"))] == 1
        assert samples["orchestrator_workers"][(("depth", "0"), ("status", "RUNNING"))] == 3
        assert samples["orchestrator_job_submit_to_running_seconds_count"][(("depth", "0"),)] == 1
        # One engine for both processes (orchestrator/api/leadership.py): the other stands by.
        assert scrape(server)["orchestrator_engines_live"][()] == 1
        client.post(f"/api/jobs/{job['id']}/cancel").raise_for_status()
        wait_until(
            lambda: scrape(server)["orchestrator_slots_allocated"][(("depth", "0"),)] == 0,
            timeout=20,
            what="slots released after cancel",
        )
        ended = scrape(server)["orchestrator_worker_duration_seconds_count"]
        assert ended[(("status", "TERMINATED"),)] == 3


def test_request_latency_is_summed_over_all_processes(servers: ServerFactory) -> None:
    server = servers.start(workers=2, ORCHESTRATOR_ENGINE="false")
    with server.client() as client:
        for _ in range(40):  # new connections, so both processes answer some
            httpx.get(f"{server.url}/health").raise_for_status()
        job = client.post("/api/jobs/submit", json={"task_description": "x"}).json()
        assert client.get(f"/api/jobs/{job['id']}").status_code == 200
        assert client.get("/api/jobs/j_nope").status_code == 404
    for _ in range(5):  # whichever process answers the scrape, the totals are the same
        counts = scrape(server)["orchestrator_http_request_duration_seconds_count"]
        health = (("method", "GET"), ("route", "/health"), ("status", "200"))
        assert counts[health] >= 40
        assert counts[(("method", "GET"), ("route", "/api/jobs/{job_id}"), ("status", "404"))] == 1
        assert counts[(("method", "GET"), ("route", "/api/jobs/{job_id}"), ("status", "200"))] == 1


def test_ready_with_engine(server: Server) -> None:
    resp = wait_until(lambda: (r := httpx.get(f"{server.url}/ready")).status_code == 200 and r, timeout=20)
    body = resp.json()
    assert body["status"] == "ready"
    assert body["engine_heartbeat_age_seconds"] < 15


def test_ready_without_engine_is_503_with_a_reason(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_ENGINE="false")
    resp = httpx.get(f"{server.url}/ready")
    assert resp.status_code == 503
    assert resp.json()["status"] == "unavailable"
    assert "engine" in resp.json()["reason"]
    assert httpx.get(f"{server.url}/health").status_code == 200


def test_request_id_is_honoured_or_made(servers: ServerFactory) -> None:
    server = servers.start(ORCHESTRATOR_ENGINE="false", ORCHESTRATOR_LOG_FORMAT="json")
    given = httpx.get(f"{server.url}/health", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    made = httpx.get(f"{server.url}/health").headers["x-request-id"]
    assert len(made) == 32
    bad = httpx.get(f"{server.url}/health", headers={"X-Request-ID": "no spaces or\tcontrol"})
    assert bad.headers["x-request-id"] != "no spaces or\tcontrol"
    # The server's own lines are JSON too (startup warnings, if any, are).
    lines = [line for line in server.log().splitlines() if line.startswith("{")]
    for line in lines:
        assert {"ts", "level", "logger", "message", "request_id"} <= json.loads(line).keys()


def test_configure_logging_json_carries_the_request_id() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        observability.configure_logging("json")
        stream = io.StringIO()
        handler = root.handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(stream)
        token = observability.request_id_var.set("req-42")
        try:
            logging.getLogger("orchestrator.test").info("hello %s", "world", extra={"job_id": "j_1"})
        finally:
            observability.request_id_var.reset(token)
        logging.getLogger("orchestrator.test").warning("outside")
        first, second = (json.loads(line) for line in stream.getvalue().splitlines())
        assert (
            first["message"] == "hello world" and first["request_id"] == "req-42" and first["job_id"] == "j_1"
        )
        assert second["request_id"] == "-" and second["level"] == "WARNING"
        observability.configure_logging("text")
        assert "[%(request_id)s]" in str(getattr(root.handlers[0].formatter, "_fmt", ""))
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
