"""The precision rules of issue 2 that the guide leaves open: bounds, filters, parent/child rules,
partial and zero grants, release semantics, probes and docs, and no 500 for any input."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.checks import no_server_errors
from tests.support.db import set_job_status
from tests.support.servers import Server, server_factory

QUOTAS = [10, 8, 5, 3, 2, 1]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with server_factory(tmp_path_factory.mktemp("validation")) as factory:
        yield factory.start(ORCHESTRATOR_ENGINE="false")


@pytest.fixture(scope="module")
def client(api: Server) -> Iterator[httpx.Client]:
    with api.client() as c:
        yield c


@pytest.fixture(autouse=True)
def _no_500s(request: pytest.FixtureRequest) -> Iterator[None]:
    yield from no_server_errors(request)


def submit(client: httpx.Client, **body: Any) -> dict[str, Any]:
    body.setdefault("task_description", "validation job")
    r = client.post("/api/jobs/submit", json=body)
    assert r.status_code == 201, r.text
    job: dict[str, Any] = r.json()
    return job


def allocate(
    client: httpx.Client, job: dict[str, Any], count: int, depth: int | None = None
) -> httpx.Response:
    depth = job["depth"] if depth is None else depth
    return client.post(
        "/api/resources/allocate", json={"job_id": job["id"], "depth": depth, "worker_count": count}
    )


def granted(client: httpx.Client, job: dict[str, Any], count: int) -> tuple[int, int]:
    """(granted, newly_allocated): what the job holds for the request, and what this call took."""
    r = allocate(client, job, count)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == {
        "job_id": job["id"],
        "depth": job["depth"],
        "requested": count,
        "granted": body["granted"],
        "newly_allocated": body["newly_allocated"],
        "bound_to_workers": 0,  # no engine here: no worker holds a slot
        "held": body["held"],
    }
    assert body["granted"] == min(count, body["held"]) and body["held"] <= job["worker_count"]
    return body["granted"], body["newly_allocated"]


def release(client: httpx.Client, job: dict[str, Any]) -> int:
    r = client.post("/api/resources/release", json={"job_id": job["id"], "depth": job["depth"]})
    assert r.status_code == 200, r.text
    assert set(r.json()) == {"job_id", "depth", "released", "still_bound", "reason"}
    assert r.json()["job_id"] == job["id"] and r.json()["depth"] == job["depth"]
    assert r.json()["still_bound"] == 0 and r.json()["reason"]
    value: int = r.json()["released"]
    return value


def usage(client: httpx.Client) -> dict[int, dict[str, int]]:
    r = client.get("/api/resources/usage")
    assert r.status_code == 200
    rows = r.json()["usage"]
    assert [row["depth"] for row in rows] == list(range(len(QUOTAS)))
    for row in rows:
        assert row["allocated"] + row["available"] == QUOTAS[row["depth"]], row
        assert 0 <= row["allocated"] <= QUOTAS[row["depth"]]
    return {row["depth"]: row for row in rows}


def assert_422(r: httpx.Response, loc_tail: str | None = None) -> None:
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert isinstance(detail, list) and detail, detail
    for item in detail:
        assert {"type", "loc", "msg"} <= set(item)
    if loc_tail is not None:
        assert any(item["loc"][-1] == loc_tail for item in detail), detail


# --- list parameters ----------------------------------------------------------------------------

LISTS = ["/api/jobs", "/api/supervisor/workers", "/api/workspaces"]


@pytest.mark.parametrize("path", LISTS)
@pytest.mark.parametrize("limit", ["0", "-1", "1001", "100000", "abc", "1.5", ""])
def test_limit_out_of_range_is_422(client: httpx.Client, path: str, limit: str) -> None:
    assert_422(client.get(path, params={"limit": limit}), "limit")


@pytest.mark.parametrize("path", LISTS)
@pytest.mark.parametrize("limit", [1, 50, 1000])
def test_limit_in_range_is_echoed(client: httpx.Client, path: str, limit: int) -> None:
    r = client.get(path, params={"limit": limit})
    assert r.status_code == 200 and r.json()["limit"] == limit


@pytest.mark.parametrize("path", LISTS)
def test_offset_must_not_be_negative(client: httpx.Client, path: str) -> None:
    assert_422(client.get(path, params={"offset": -1}), "offset")
    assert_422(client.get(path, params={"offset": "x"}), "offset")
    r = client.get(path, params={"offset": 0})
    assert r.status_code == 200 and r.json()["offset"] == 0
    r = client.get(path, params={"offset": 10**6})
    assert r.status_code == 200 and r.json()["offset"] == 10**6
    assert r.json()[path.rsplit("/", 1)[1]] == []


@pytest.mark.parametrize(("path", "bad"), [(LISTS[0], "BOGUS"), (LISTS[0], "pending"), (LISTS[0], "IDLE")])
def test_unknown_job_status_filter_is_422(client: httpx.Client, path: str, bad: str) -> None:
    assert_422(client.get(path, params={"status": bad}), "status")


@pytest.mark.parametrize("bad", ["BOGUS", "running", "PENDING", "CANCELED"])
def test_unknown_worker_status_filter_is_422(client: httpx.Client, bad: str) -> None:
    assert_422(client.get("/api/supervisor/workers", params={"status": bad}), "status")


@pytest.mark.parametrize("status", ["PENDING", "RUNNING", "COMPLETED", "FAILED", "CANCELED"])
def test_every_job_status_is_a_valid_filter(client: httpx.Client, status: str) -> None:
    r = client.get("/api/jobs", params={"status": status})
    assert r.status_code == 200
    assert all(j["status"] == status for j in r.json()["jobs"])


@pytest.mark.parametrize("status", ["IDLE", "RUNNING", "PAUSED", "COMPLETED", "FAILED", "TERMINATED"])
def test_every_worker_status_is_a_valid_filter(client: httpx.Client, status: str) -> None:
    assert client.get("/api/supervisor/workers", params={"status": status}).status_code == 200


def test_depth_filter_must_not_be_negative(client: httpx.Client) -> None:
    assert_422(client.get("/api/jobs", params={"depth": -1}), "depth")


# --- submit -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", " ", "   \t\n  "])
def test_empty_or_blank_task_description_is_422(client: httpx.Client, text: str) -> None:
    assert_422(client.post("/api/jobs/submit", json={"task_description": text}), "task_description")


@pytest.mark.parametrize("depth", range(len(QUOTAS)))
def test_worker_count_bounded_by_the_quota_of_its_depth(client: httpx.Client, depth: int) -> None:
    quota = QUOTAS[depth]
    for bad in (0, -1, quota + 1):
        r = client.post(
            "/api/jobs/submit", json={"task_description": "t", "depth": depth, "worker_count": bad}
        )
        assert_422(r, "worker_count")
    for good in sorted({1, quota}):
        job = submit(client, depth=depth, worker_count=good)
        assert job["worker_count"] == good and job["depth"] == depth


def test_over_quota_message_names_the_quota(client: httpx.Client) -> None:
    r = client.post("/api/jobs/submit", json={"task_description": "t", "depth": 2, "worker_count": 6})
    assert r.json() == {
        "detail": [
            {
                "type": "value_error",
                "loc": ["body", "worker_count"],
                "msg": "worker_count must be at most 5, the quota of depth 2",
                "input": 6,
            }
        ]
    }


@pytest.mark.parametrize("field", ["worker_count", "depth", "priority", "max_turns"])
@pytest.mark.parametrize("value", [True, "1", 1.0, None, [1]])
def test_integer_fields_take_json_integers_only(client: httpx.Client, field: str, value: Any) -> None:
    if value is None and field == "max_turns":
        return  # max_turns is optional: null means "no limit"
    assert_422(client.post("/api/jobs/submit", json={"task_description": "t", field: value}), field)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_finite_numbers_are_422(client: httpx.Client, literal: bytes) -> None:
    for field in (b"timeout_seconds", b"max_cost_usd", b"worker_count"):
        r = client.post(
            "/api/jobs/submit",
            content=b'{"task_description": "t", "' + field + b'": ' + literal + b"}",
            headers={"Content-Type": "application/json"},
        )
        assert_422(r, field.decode())


@pytest.mark.parametrize("field", ["task_description", "parent_job_id", "agent", "repository", "base_ref"])
def test_nul_characters_are_422(client: httpx.Client, field: str) -> None:
    assert_422(client.post("/api/jobs/submit", json={"task_description": "t", field: "a\u0000b"}), field)


def test_unicode_task_description_round_trips(client: httpx.Client) -> None:
    text = "Implémenter l'authentification ✓ 🚀 — 認証"
    job = submit(client, task_description=text)
    assert job["task_description"] == text
    assert client.get(f"/api/jobs/{job['id']}").json()["task_description"] == text


@pytest.mark.parametrize("depth", [-1, 6, 100])
def test_depth_outside_0_to_5_is_422(client: httpx.Client, depth: int) -> None:
    assert_422(client.post("/api/jobs/submit", json={"task_description": "t", "depth": depth}), "depth")


def test_unknown_parent_is_404(client: httpx.Client) -> None:
    r = client.post(
        "/api/jobs/submit", json={"task_description": "t", "depth": 1, "parent_job_id": "j_aaaaaaaaaaaa"}
    )
    assert r.status_code == 404
    assert r.json() == {"detail": "Parent job j_aaaaaaaaaaaa not found"}


def test_child_depth_must_be_parent_depth_plus_one(client: httpx.Client) -> None:
    parent = submit(client, depth=1)
    for depth in (0, 1, 3, 4):
        r = client.post(
            "/api/jobs/submit", json={"task_description": "t", "depth": depth, "parent_job_id": parent["id"]}
        )
        assert r.status_code == 400, (depth, r.text)
        assert "depth must be 2" in r.json()["detail"]
    child = submit(client, depth=2, parent_job_id=parent["id"])
    assert child["parent_job_id"] == parent["id"] and child["depth"] == 2
    grandchild = submit(client, depth=3, parent_job_id=child["id"], worker_count=3)
    assert grandchild["parent_job_id"] == child["id"]
    listed = client.get("/api/jobs", params={"parent_job_id": parent["id"]}).json()
    assert [j["id"] for j in listed["jobs"]] == [child["id"]] and listed["total"] == 1


@pytest.mark.parametrize("final", ["COMPLETED", "FAILED", "CANCELED"])
def test_finished_parent_takes_no_children(api: Server, client: httpx.Client, final: str) -> None:
    parent = submit(client)
    set_job_status(api, parent["id"], final)
    r = client.post(
        "/api/jobs/submit", json={"task_description": "t", "depth": 1, "parent_job_id": parent["id"]}
    )
    assert r.status_code == 400
    assert final in r.json()["detail"]


def test_running_parent_takes_children(api: Server, client: httpx.Client) -> None:
    parent = submit(client)
    set_job_status(api, parent["id"], "RUNNING")
    assert submit(client, depth=1, parent_job_id=parent["id"])["status"] == "PENDING"


def test_cancel_cascades_to_unfinished_children(api: Server, client: httpx.Client) -> None:
    parent = submit(client)
    child = submit(client, depth=1, parent_job_id=parent["id"])
    done = submit(client, depth=1, parent_job_id=parent["id"])
    set_job_status(api, done["id"], "COMPLETED")
    assert client.post(f"/api/jobs/{parent['id']}/cancel").json()["status"] == "CANCELED"
    assert client.get(f"/api/jobs/{child['id']}").json()["status"] == "CANCELED"
    assert client.get(f"/api/jobs/{done['id']}").json()["status"] == "COMPLETED"


# --- allocate / release / usage -----------------------------------------------------------------


def test_partial_and_zero_grants(client: httpx.Client) -> None:
    """Depth 3 (quota 3) is used by this test only; it leaves it empty."""
    assert usage(client)[3]["allocated"] == 0
    a = submit(client, depth=3, worker_count=2)
    b = submit(client, depth=3, worker_count=3)
    c = submit(client, depth=3, worker_count=1)

    assert granted(client, a, 2) == (2, 2)
    assert granted(client, b, 3) == (1, 1)  # partial: only one slot left at depth 3
    assert granted(client, c, 1) == (0, 0)  # zero grant is still 200
    assert usage(client)[3] == {"depth": 3, "allocated": 3, "available": 0, "max_workers": 3}

    assert release(client, a) == 2
    assert release(client, a) == 0  # releasing again releases nothing
    assert granted(client, b, 3) == (3, 2)  # b lacked 2 of its 3
    assert granted(client, b, 1) == (1, 0)  # b holds it already: asking again takes nothing
    assert granted(client, c, 1) == (0, 0)
    assert release(client, b) == 3
    assert granted(client, c, 5) == (1, 1)  # never more than c's worker_count
    assert release(client, c) == 1
    assert usage(client)[3]["allocated"] == 0


def test_grants_never_exceed_what_the_job_lacks(client: httpx.Client) -> None:
    job = submit(client, depth=0, worker_count=4)
    start = usage(client)[0]["allocated"]
    assert granted(client, job, 1) == (1, 1)
    assert granted(client, job, 10) == (4, 3)  # the 3 it lacked; never more than worker_count
    assert granted(client, job, 1) == (1, 0)
    assert usage(client)[0]["allocated"] == start + 4
    assert release(client, job) == 4
    assert release(client, job) == 0
    assert usage(client)[0]["allocated"] == start


def test_allocate_unknown_job_is_404_and_wrong_depth_400(client: httpx.Client) -> None:
    r = client.post(
        "/api/resources/allocate", json={"job_id": "j_bbbbbbbbbbbb", "depth": 0, "worker_count": 1}
    )
    assert r.status_code == 404 and r.json() == {"detail": "Job j_bbbbbbbbbbbb not found"}
    job = submit(client, depth=1)
    r = allocate(client, job, 1, depth=0)
    assert r.status_code == 400 and r.json() == {"detail": f"Job {job['id']} is at depth 1, not 0"}
    r = client.post("/api/resources/release", json={"job_id": job["id"], "depth": 2})
    assert r.status_code == 400 and "depth 1, not 2" in r.json()["detail"]
    r = client.post("/api/resources/release", json={"job_id": "j_bbbbbbbbbbbb", "depth": 0})
    assert r.status_code == 404


def test_allocate_for_finished_job_is_400_and_cancel_frees_slots(client: httpx.Client) -> None:
    job = submit(client, depth=4, worker_count=2)
    before = usage(client)[4]["allocated"]
    assert granted(client, job, 2) == (2, 2)
    assert client.post(f"/api/jobs/{job['id']}/cancel").status_code == 200
    assert usage(client)[4]["allocated"] == before  # cancel returned the job's unbound slots
    r = allocate(client, job, 1)
    assert r.status_code == 400 and "CANCELED" in r.json()["detail"]
    assert release(client, job) == 0


@pytest.mark.parametrize(
    "body",
    [
        {"depth": 0, "worker_count": 1},
        {"job_id": "j_000000000000", "worker_count": 1},
        {"job_id": "j_000000000000", "depth": 0},
        {"job_id": "j_000000000000", "depth": 0, "worker_count": 0},
        {"job_id": "j_000000000000", "depth": -1, "worker_count": 1},
        {"job_id": "j_000000000000", "depth": 0, "worker_count": 1, "extra": True},
    ],
)
def test_allocate_body_validation(client: httpx.Client, body: dict[str, Any]) -> None:
    assert_422(client.post("/api/resources/allocate", json=body))


def test_usage_lists_every_depth(client: httpx.Client) -> None:
    rows = usage(client)
    assert sorted(rows) == [0, 1, 2, 3, 4, 5]
    for depth, row in rows.items():
        assert row["max_workers"] == QUOTAS[depth]


def test_quotas_follow_orchestrator_quotas(servers: Any) -> None:
    server = servers.start(ORCHESTRATOR_ENGINE="false", ORCHESTRATOR_QUOTAS="4,2")
    with server.client() as c:
        assert c.get("/api/resources/quotas").json() == {
            "quotas": [{"depth": 0, "max_workers": 4}, {"depth": 1, "max_workers": 2}]
        }
        assert [u["depth"] for u in c.get("/api/resources/usage").json()["usage"]] == [0, 1]
        assert_422(c.post("/api/jobs/submit", json={"task_description": "t", "depth": 2}), "depth")
        assert_422(
            c.post("/api/jobs/submit", json={"task_description": "t", "worker_count": 5}), "worker_count"
        )


# --- probes and docs ----------------------------------------------------------------------------


def test_health_needs_no_auth(api: Server) -> None:
    r = httpx.get(f"{api.url}/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    assert r.json()["database"] in ("sqlite", "postgresql")


@pytest.mark.parametrize(
    ("path", "kind"), [("/docs", "text/html"), ("/redoc", "text/html"), ("/openapi.json", "json")]
)
def test_docs_are_served_without_auth(api: Server, path: str, kind: str) -> None:
    r = httpx.get(f"{api.url}{path}")
    assert r.status_code == 200
    assert kind in r.headers["content-type"]


def test_every_api_route_requires_auth(api: Server) -> None:
    spec = httpx.get(f"{api.url}/openapi.json").json()
    count = 0
    for path, operations in spec["paths"].items():
        if not path.startswith("/api/"):
            continue
        concrete = path.replace("{job_id}", "j_000000000000").replace("{worker_id}", "w_000000000000")
        for method in operations:
            r = httpx.request(method.upper(), f"{api.url}{concrete}", json={})
            assert r.status_code == 401, (method, path, r.status_code)
            count += 1
    assert count >= 15


# --- no input ever gets a 500 -------------------------------------------------------------------

HUGE = 10**30
WEIRD_VALUES: list[Any] = [
    None,
    True,
    -1,
    0,
    HUGE,
    -HUGE,
    2**63,
    1.5,
    1e308,
    "",
    "3",
    "ünïcødé ✓ 🚀",
    "\u0000nul",
    "x" * 20_000,
    [],
    [1, 2],
    {},
    {"a": {"b": [None]}},
]
SUBMIT_FIELDS = [
    "task_description",
    "worker_count",
    "depth",
    "parent_job_id",
    "priority",
    "agent",
    "agent_options",
    "timeout_seconds",
    "repository",
    "base_ref",
    "max_cost_usd",
    "max_turns",
]


def _accepted_or_client_error(r: httpx.Response) -> None:
    assert r.status_code in (200, 201, 400, 404, 422), (r.status_code, r.text[:500])
    body = r.json()
    if r.status_code >= 400:
        assert set(body) == {"detail"}, body


@pytest.mark.parametrize("field", SUBMIT_FIELDS)
def test_submit_fuzz_never_500(client: httpx.Client, field: str) -> None:
    for value in WEIRD_VALUES:
        r = client.post("/api/jobs/submit", json={"task_description": "fuzz", field: value})
        _accepted_or_client_error(r)
        if r.status_code == 201:
            job = r.json()
            assert client.get(f"/api/jobs/{job['id']}").json() == job


@pytest.mark.parametrize("path", ["/api/resources/allocate", "/api/resources/release"])
@pytest.mark.parametrize("field", ["job_id", "depth", "worker_count"])
def test_resources_fuzz_never_500(client: httpx.Client, path: str, field: str) -> None:
    job = submit(client, depth=5)
    for value in WEIRD_VALUES:
        body: dict[str, Any] = {"job_id": job["id"], "depth": 5, "worker_count": 1}
        if path.endswith("release"):
            del body["worker_count"]
        body[field] = value
        _accepted_or_client_error(client.post(path, json=body))
    client.post("/api/resources/release", json={"job_id": job["id"], "depth": 5})
    assert usage(client)[5]["allocated"] == 0


@pytest.mark.parametrize(
    "raw",
    [b"", b"null", b"[]", b'"text"', b"123", b"{", b'{"task_description": NaN}', b"\xff\xfe", b'{"a":' * 500],
)
def test_raw_bodies_never_500(client: httpx.Client, raw: bytes) -> None:
    for path in ("/api/jobs/submit", "/api/resources/allocate", "/api/resources/release"):
        r = client.post(path, content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 422, (path, raw[:20], r.status_code, r.text[:300])


@pytest.mark.parametrize(
    "params",
    [
        {"depth": HUGE},
        {"depth": 2**31},
        {"offset": HUGE},
        {"offset": 2**63},
        {"limit": HUGE},
        {"parent_job_id": "\u0000"},
        {"parent_job_id": "ü" * 5000},
        {"status": "\u0000"},
        {"workspace_id": "\u0000"},
        {"job_id": "x" * 5000},
    ],
)
def test_query_fuzz_never_500(client: httpx.Client, params: dict[str, Any]) -> None:
    for path in LISTS:
        r = client.get(path, params=params)
        assert r.status_code in (200, 422), (path, params, r.status_code, r.text[:300])


@pytest.mark.parametrize(
    "entity_id", ["x", "j_%00", "%00", "ü" * 300, "j_" + "a" * 5000, "..", "j_000000000000%20"]
)
def test_path_ids_never_500(client: httpx.Client, entity_id: str) -> None:
    for method, template in [
        ("GET", "/api/jobs/{}"),
        ("POST", "/api/jobs/{}/cancel"),
        ("GET", "/api/jobs/{}/events"),
        ("GET", "/api/supervisor/workers/{}"),
        ("POST", "/api/supervisor/workers/{}/terminate"),
        ("POST", "/api/supervisor/workers/{}/pause"),
        ("POST", "/api/supervisor/workers/{}/resume"),
        ("GET", "/api/supervisor/workers/{}/logs"),
    ]:
        r = client.request(method, template.format(entity_id))
        assert r.status_code in (404, 405, 422), (
            method,
            template,
            entity_id[:20],
            r.status_code,
            r.text[:300],
        )
