"""Workers on a real multi-node Ray cluster: placement within the nodes' slots, control of a
remote worker, a node lost mid-run, and an engine killed and restarted mid-run.

Every worker runs in the sandbox on its node, through its actor; the engine reads its output
and exit status only through the actor (the node keeps its files in a directory of its own)."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_engine_lifecycle import log_lines, submit, usage_allocated, wait_final, workers_of
from tests.ray.conftest import RayCluster, current
from tests.support.servers import Server, ServerFactory
from tests.support.wait import wait_until

LONG = 120.0
_marks = itertools.count(int(time.time()) % 100_000 * 10 + 7_000_000)

# The task (stdin) is a number: the agent leaves a grandchild `sleep <number>` in its process
# group, deaf to SIGTERM (so it outlives the agent's own end), which a test finds on the host
# and must see gone.
PROFILES = """
[agents.ticker]
type = "command"
command = ["bash", "-c", "t=$(cat); (trap '' TERM; exec sleep $t) & i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.2; done"]

[agents.short]
type = "command"
command = ["bash", "-c", "t=$(cat); echo start $t; sleep 3; echo done $t"]
"""


def start_server(servers: ServerFactory, cluster: RayCluster, **extra: str) -> Server:
    path = servers.root / "agents.toml"
    path.write_text(PROFILES)
    env = {"ORCHESTRATOR_AGENTS_FILE": str(path), "ORCHESTRATOR_QUOTAS": "6", **cluster.env(), **extra}
    return servers.start(**env)


def mark() -> str:
    return str(next(_marks))


def processes_with(argv: list[str]) -> list[int]:
    """PIDs on this machine (every node of the test cluster) whose command line is `argv`."""
    wanted = "\0".join(argv).encode() + b"\0"
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if Path(f"/proc/{name}/cmdline").read_bytes() == wanted:
                    found.append(int(name))
            except OSError:
                continue
    return found


def grandchildren(task: str) -> list[int]:
    return processes_with(["sleep", task])


def group_states(pgid: int) -> set[str]:
    states = set()
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                fields = Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid:
                states.add(fields[0])
    return states


def running(client: httpx.Client, job_ids: list[str]) -> list[dict[str, Any]] | None:
    workers = [w for job_id in job_ids for w in workers_of(client, job_id)]
    if len(workers) == len(job_ids) and all(w["status"] == "RUNNING" and w["pid"] for w in workers):
        return workers
    return None


def assert_ticks(lines: list[str]) -> None:
    """Every tick once, in order (bash may add a line as it is terminated)."""
    ticks = [line for line in lines if line.startswith("tick ")]
    assert ticks == [f"tick {n}" for n in range(1, len(ticks) + 1)], "log lines lost or duplicated"
    assert len(lines) - len(ticks) <= 1, lines


def node_ids(cluster: RayCluster) -> list[str]:
    return [str(node.node_id) for node in cluster.nodes]  # type: ignore[attr-defined]


def test_jobs_spread_over_both_nodes_within_their_slots(
    servers: ServerFactory, ray_cluster: RayCluster
) -> None:
    server = start_server(servers, ray_cluster)
    with server.client() as client:
        tasks = [mark() for _ in range(4)]
        jobs = [submit(client, agent="ticker", task_description=task) for task in tasks]
        workers = wait_until(
            lambda: running(client, [j["id"] for j in jobs]), timeout=LONG * 2, what="running"
        )
        hosts = sorted(w["host"] for w in workers)
        # Two slots per node, four workers running at once: two on each node (none on the head).
        assert sorted(set(hosts)) == sorted(node_ids(ray_cluster)), hosts
        assert hosts.count(hosts[0]) == 2
        for worker in workers:
            wait_until(lambda w=worker: len(log_lines(client, w["id"])) >= 2, timeout=LONG, what="ticks")
            assert client.post(f"/api/supervisor/workers/{worker['id']}/terminate").status_code == 200
        for job in jobs:
            wait_final(client, job["id"], timeout=LONG)
        for worker in workers:
            assert_ticks(log_lines(client, worker["id"]))
        assert usage_allocated(client)[0] == 0
        ready = client.get("/ready").json()
        assert ready["cluster"]["status"] == "connected", ready


def test_starts_beyond_the_clusters_slots_wait_idle_and_start_when_a_slot_frees(
    servers: ServerFactory, ray_cluster: RayCluster
) -> None:
    """Quota 6 over 4 `agent_slot`s: the two workers no node has room for wait IDLE, saying why,
    without a slot of the quota (nor a launcher thread: the engine still pauses and resumes a
    worker meanwhile), and start as soon as a node has room again; none fails."""
    server = start_server(servers, ray_cluster)
    with server.client() as client:
        tickers = [submit(client, agent="ticker", task_description=mark()) for _ in range(4)]
        busy = wait_until(
            lambda: running(client, [j["id"] for j in tickers]), timeout=LONG * 2, what="running"
        )
        waiting = [submit(client, agent="short", task_description=mark()) for _ in range(2)]

        def held() -> list[dict[str, Any]] | None:
            found = [w for job in waiting for w in workers_of(client, job["id"])]
            reasons = [w["status_reason"] or "" for w in found]
            ok = len(found) == 2 and all(w["status"] == "IDLE" for w in found)
            return (
                found
                if ok and all(r.startswith("waiting for a Ray node with a free agent_slot") for r in reasons)
                else None
            )

        wait_until(held, timeout=LONG, what="the workers beyond the cluster's slots waiting IDLE")
        assert usage_allocated(client)[0] == 4
        ticker = busy[0]
        assert client.post(f"/api/supervisor/workers/{ticker['id']}/pause").status_code == 200
        wait_until(lambda: "T" in group_states(ticker["pid"]), timeout=LONG, what="paused meanwhile")
        assert client.post(f"/api/supervisor/workers/{ticker['id']}/resume").status_code == 200
        wait_until(lambda: "T" not in group_states(ticker["pid"]), timeout=LONG, what="resumed meanwhile")
        assert held(), "still waiting while every slot is busy"
        for worker in busy[:2]:
            assert client.post(f"/api/supervisor/workers/{worker['id']}/terminate").status_code == 200
        done = [wait_final(client, job["id"], timeout=LONG * 2) for job in waiting]
        assert [job["status"] for job in done] == ["COMPLETED", "COMPLETED"], done
        for job in waiting:
            started_once(client, job["id"])
        for worker in busy[2:]:
            assert client.post(f"/api/supervisor/workers/{worker['id']}/terminate").status_code == 200
        for job in tickers:
            wait_final(client, job["id"], timeout=LONG)
        assert usage_allocated(client)[0] == 0


def started_once(client: httpx.Client, job_id: str) -> None:
    events = client.get(f"/api/jobs/{job_id}/events").json()["events"]
    starts = [e for e in events if e["kind"] == "worker.status" and e["to_status"] == "RUNNING"]
    assert len(starts) == 1, starts


@pytest.mark.parametrize("sandbox", ["on", "off"])
def test_pause_resume_terminate_a_remote_worker(
    servers: ServerFactory, ray_cluster: RayCluster, sandbox: str
) -> None:
    """Unsandboxed, no PID namespace ends the grandchild with the agent: only the executor's kill
    of the whole process group on the node does (Ray's own actor kill does not reach it)."""
    server = start_server(servers, ray_cluster, ORCHESTRATOR_SANDBOX=sandbox)
    task = mark()
    with server.client() as client:
        job = submit(client, agent="ticker", task_description=task)
        worker = wait_until(lambda: running(client, [job["id"]]), timeout=LONG, what="worker running")[0]
        assert worker["host"] in node_ids(ray_cluster)
        pid = worker["pid"]
        wait_until(lambda: len(log_lines(client, worker["id"])) >= 3, timeout=LONG, what="ticks")
        assert len(grandchildren(task)) == 1

        assert client.post(f"/api/supervisor/workers/{worker['id']}/pause").status_code == 200
        wait_until(lambda: "T" in group_states(pid), timeout=LONG, what="the worker's group stopped")
        assert client.post(f"/api/supervisor/workers/{worker['id']}/resume").status_code == 200
        wait_until(lambda: "T" not in group_states(pid), timeout=LONG, what="the worker's group resumed")
        seen = len(log_lines(client, worker["id"]))
        wait_until(lambda: len(log_lines(client, worker["id"])) > seen + 2, timeout=LONG, what="ticks again")

        assert client.post(f"/api/supervisor/workers/{worker['id']}/terminate").status_code == 200
        done = wait_final(client, job["id"], timeout=LONG)
        assert workers_of(client, job["id"])[0]["status"] == "TERMINATED", done
        wait_until(lambda: not grandchildren(task), timeout=LONG, what="the grandchild gone")
        wait_until(lambda: not group_states(pid), timeout=LONG, what="the worker's process group gone")
        assert_ticks(log_lines(client, worker["id"]))
        assert usage_allocated(client)[0] == 0


def test_engine_killed_mid_run_readopts_its_workers_by_name(
    servers: ServerFactory, ray_cluster: RayCluster
) -> None:
    first = start_server(servers, ray_cluster)
    tasks = [mark(), mark()]
    with first.client() as client:
        jobs = [submit(client, agent="ticker", task_description=task) for task in tasks]
        before = wait_until(lambda: running(client, [j["id"] for j in jobs]), timeout=LONG, what="running")
        for worker in before:
            wait_until(lambda w=worker: len(log_lines(client, w["id"])) >= 3, timeout=LONG, what="ticks")
    first.kill9()
    time.sleep(0)  # the workers keep ticking on their nodes while no engine watches
    second = servers.make(port=first.port, **first_env(first)).start()
    with second.client() as client:
        for worker in before:
            seen = len(log_lines(client, worker["id"]))
            wait_until(
                lambda w=worker, s=seen: len(log_lines(client, w["id"])) > s + 3,
                timeout=LONG,
                what="ticks flowing again through the new engine",
            )
        after = {w["id"]: w for w in running(client, [j["id"] for j in jobs]) or []}
        for worker in before:
            # The same process on the same node: adopted, not started again.
            assert (
                after[worker["id"]]["pid"] == worker["pid"] and after[worker["id"]]["host"] == worker["host"]
            )
        for task in tasks:
            assert len(grandchildren(task)) == 1, "a worker was started twice"
        for job in jobs:
            events = client.get(f"/api/jobs/{job['id']}/events").json()["events"]
            started = [e for e in events if e["kind"] == "worker.status" and e["to_status"] == "RUNNING"]
            assert len(started) == 1, started
        for worker in before:
            assert client.post(f"/api/supervisor/workers/{worker['id']}/terminate").status_code == 200
        for job in jobs:
            wait_final(client, job["id"], timeout=LONG)
        for worker in before:
            assert_ticks(log_lines(client, worker["id"]))
        for task in tasks:
            wait_until(lambda t=task: not grandchildren(t), timeout=LONG, what="grandchildren gone")
        assert usage_allocated(client)[0] == 0


def test_an_engine_with_a_data_dir_of_its_own_takes_over_and_mirrors_on(
    servers: ServerFactory, ray_cluster: RayCluster, tmp_path: Path
) -> None:
    """The engine that takes over runs on another host: its data dir holds nothing of the dead
    engine's workers (their run dirs were on the other disk). It adopts them all the same, and
    their output flows again, each line once, from where the database left it."""
    first = start_server(servers, ray_cluster)
    task = mark()
    with first.client() as client:
        job = submit(client, agent="ticker", task_description=task)
        (worker,) = wait_until(lambda: running(client, [job["id"]]), timeout=LONG, what="running")
        wait_until(lambda: len(log_lines(client, worker["id"])) >= 3, timeout=LONG, what="ticks")
    first.kill9()
    elsewhere = {**first_env(first), "ORCHESTRATOR_DATA_DIR": str(tmp_path / "another-host")}
    second = servers.make(port=first.port, **elsewhere).start()
    with second.client() as client:
        seen = len(log_lines(client, worker["id"]))
        wait_until(
            lambda: len(log_lines(client, worker["id"])) > seen + 3,
            timeout=LONG,
            what="ticks flowing again through the engine of another host",
        )
        (after,) = running(client, [job["id"]]) or [{}]
        assert (after.get("pid"), after.get("host")) == (worker["pid"], worker["host"])
        assert len(grandchildren(task)) == 1, "the worker was started twice"
        assert client.post(f"/api/supervisor/workers/{worker['id']}/terminate").status_code == 200
        wait_final(client, job["id"], timeout=LONG)
        assert_ticks(log_lines(client, worker["id"]))
        wait_until(lambda: not grandchildren(task), timeout=LONG, what="the grandchild gone")
        assert usage_allocated(client)[0] == 0


def first_env(server: Server) -> dict[str, str]:
    keys = ("ORCHESTRATOR_AGENTS_FILE", "ORCHESTRATOR_QUOTAS", "ORCHESTRATOR_EXECUTOR", "RAY_ADDRESS")
    return {key: server.env[key] for key in keys} | {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def test_node_lost_mid_run_fails_its_workers_and_frees_their_slots(
    servers: ServerFactory, ray_cluster: RayCluster
) -> None:
    """Runs last: it adds a third node and removes it (its raylet killed) mid-run."""
    extra = ray_cluster.add_node()
    lost_node = str(extra.node_id)  # type: ignore[attr-defined]
    server = start_server(servers, ray_cluster)
    tasks = [mark() for _ in range(6)]
    with server.client() as client:
        jobs = [submit(client, agent="ticker", task_description=task) for task in tasks]
        workers = wait_until(
            lambda: running(client, [j["id"] for j in jobs]), timeout=LONG * 2, what="running"
        )
        on_lost = [w for w in workers if w["host"] == lost_node]
        others = [w for w in workers if w["host"] != lost_node]
        assert len(on_lost) == 2 and len(others) == 4, [w["host"] for w in workers]
        lost_tasks = [tasks[[j["id"] for j in jobs].index(w["job_id"])] for w in on_lost]

        processes = ray_cluster.node_processes(extra)
        ray_cluster.cluster.remove_node(extra, allow_graceful=False)

        def lost_recorded() -> bool:
            current = {w["id"]: w for j in jobs for w in workers_of(client, j["id"])}
            return all(current[w["id"]]["status"] == "FAILED" for w in on_lost)

        wait_until(lost_recorded, timeout=LONG, what="the lost node's workers FAILED")
        for worker in on_lost:
            current = workers_of(client, worker["job_id"])[0]
            assert current["status_reason"] == f"lost: node {lost_node} died", current
        for task in lost_tasks:
            wait_until(
                lambda t=task: not grandchildren(t), timeout=LONG, what="the lost workers' processes gone"
            )
        # The others are undisturbed, and the lost workers' slots came back.
        assert all(workers_of(client, w["job_id"])[0]["status"] == "RUNNING" for w in others)
        wait_until(lambda: usage_allocated(client)[0] == 4, timeout=LONG, what="the lost slots freed")
        for worker in others:
            seen = len(log_lines(client, worker["id"]))
            wait_until(
                lambda w=worker, s=seen: len(log_lines(client, w["id"])) > s, timeout=LONG, what="ticks"
            )
            assert client.post(f"/api/supervisor/workers/{worker['id']}/terminate").status_code == 200
        for job in jobs:
            wait_final(client, job["id"], timeout=LONG)
        assert usage_allocated(client)[0] == 0
    # Ray's agents of the removed node outlive it (nobody reaps them): gone before the next test.
    ray_cluster.finish_node(extra, processes)


def test_cluster_unreachable_ready_says_so_and_jobs_wait(
    servers: ServerFactory, ray_cluster: RayCluster
) -> None:
    """No Ray cluster at RAY_ADDRESS: the server runs, /ready says why it is not ready, and a job
    waits PENDING (its worker is not started, nor failed) instead of failing."""
    from tests.support.servers import free_port

    server = start_server(servers, ray_cluster, RAY_ADDRESS=f"127.0.0.1:{free_port()}")
    with server.client() as client:
        job = submit(client, agent="short", task_description=mark())

        def unready() -> dict[str, Any] | None:
            response = client.get("/ready")
            body: dict[str, Any] = response.json()
            return body if response.status_code == 503 and "cluster" in body else None

        body = wait_until(unready, timeout=LONG, what="/ready naming the unreachable cluster")
        assert body["cluster"]["status"] == "unavailable" and "unreachable" in body["cluster"]["reason"], body
        assert "worker cluster" in body["reason"]
        # The engine heartbeats (so /ready got this far) and passes run: the job waits, unfailed.
        assert client.get(f"/api/jobs/{job['id']}").json()["status"] == "PENDING"
        assert all(w["status"] == "IDLE" for w in workers_of(client, job["id"]))
        assert server.process is not None and server.process.poll() is None


def test_cluster_lost_mid_run_the_server_keeps_serving(
    servers: ServerFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cluster's head dies under a running worker: /ready says so, new jobs wait, and the
    server outlives the Ray driver's own deadline for a missing GCS (cut to 5 s here, which
    would end the process without the executor's override). The running worker stays RUNNING
    for the head's grace (a head that comes back finds it running), then ends FAILED `lost: ...`
    with its slot back; its node's raylet gives up on the GCS (its own timeout, cut to 10 s) and
    the worker's processes go with it."""
    # The node's raylet only (its environment): in the cluster's system config it would reach
    # the server's Ray driver too, over the executor's own setting, and end the server with it.
    monkeypatch.setenv("RAY_gcs_rpc_server_reconnect_timeout_s", "10")
    cluster = RayCluster(tmp_path, nodes=1)
    monkeypatch.delenv("RAY_gcs_rpc_server_reconnect_timeout_s")
    node_processes: set[int] = set()
    try:
        server = start_server(
            servers, cluster, RAY_gcs_rpc_server_reconnect_timeout_s="5", RAY_HEAD_GRACE_SECONDS="15"
        )
        task = mark()
        with server.client() as client:
            first = submit(client, agent="ticker", task_description=task)
            (worker,) = wait_until(
                lambda: running(client, [first["id"]]), timeout=LONG, what="worker running"
            )
            node_processes = cluster.node_processes(cluster.nodes[0])
            cluster.cluster.head_node.kill_all_processes(check_alive=False, allow_graceful=False)

            def unready() -> dict[str, Any] | None:
                response = client.get("/ready")
                body: dict[str, Any] = response.json()
                return body if response.status_code == 503 and "cluster" in body else None

            body = wait_until(unready, timeout=LONG, what="/ready naming the lost cluster")
            assert "unreachable" in body["cluster"]["reason"], body
            second = submit(client, agent="short", task_description=mark())
            served = 0
            deadline = time.monotonic() + 20  # four times the driver's cut deadline
            while time.monotonic() < deadline:
                assert client.get("/health").status_code == 200
                served += 1
                time.sleep(0.5)
            assert server.process is not None and server.process.poll() is None, server.log()
            assert client.get(f"/api/jobs/{second['id']}").json()["status"] == "PENDING"
            assert served > 0
            lost = wait_until(
                lambda: (w := workers_of(client, first["id"])[0])["status"] == "FAILED" and w,
                timeout=LONG,
                what="the worker declared lost after the head's grace",
            )
            assert lost["status_reason"].startswith("lost: the Ray cluster's head was unreachable for "), lost
            assert usage_allocated(client)[0] == 0
            wait_until(lambda: not grandchildren(task), timeout=LONG, what="its processes gone with the node")
            wait_until(lambda: not group_states(worker["pid"]), timeout=LONG, what="its process group gone")
    finally:
        cluster.shutdown()
        cluster.finish_node(cluster.nodes[0], node_processes)


def test_a_head_that_hangs_is_unready_until_it_answers_and_its_workers_run_on(
    servers: ServerFactory, tmp_path: Path
) -> None:
    """The head's GCS stops answering (SIGSTOP: its socket still accepts connections, so a TCP
    probe sees nothing wrong): /ready says the cluster does not answer and a new job waits.
    Back within the head's grace: /ready is ready again, the running worker was never declared
    lost and its output goes on, each tick once, and the job that waited runs. (A cluster of its
    own: a head stopped past the nodes' own deadline would take the shared one down.)"""
    import signal

    cluster = RayCluster(tmp_path, nodes=1)
    try:
        server = start_server(servers, cluster)
        gcs = cluster.cluster.head_node.all_processes["gcs_server"][0].process
        with server.client() as client:
            first = submit(client, agent="ticker", task_description=mark())
            (worker,) = wait_until(
                lambda: running(client, [first["id"]]), timeout=LONG, what="worker running"
            )
            wait_until(lambda: len(log_lines(client, worker["id"])) >= 2, timeout=LONG, what="ticks")

            def unready() -> dict[str, Any] | None:
                response = client.get("/ready")
                body: dict[str, Any] = response.json()
                return body if response.status_code == 503 and "cluster" in body else None

            os.kill(gcs.pid, signal.SIGSTOP)
            try:
                body = wait_until(unready, timeout=LONG, what="/ready naming the silent cluster")
                assert "does not answer" in body["cluster"]["reason"], body
                second = submit(client, agent="short", task_description=mark())
                assert client.get("/health").status_code == 200
            finally:
                os.kill(gcs.pid, signal.SIGCONT)
            wait_until(lambda: client.get("/ready").status_code == 200, timeout=LONG, what="/ready again")
            seen = len(log_lines(client, worker["id"]))
            wait_until(
                lambda: len(log_lines(client, worker["id"])) > seen + 2, timeout=LONG, what="ticks again"
            )
            assert current(client, worker)["status"] == "RUNNING"
            assert wait_final(client, second["id"], timeout=LONG)["status"] == "COMPLETED"

            assert client.post(f"/api/supervisor/workers/{worker['id']}/terminate").status_code == 200
            wait_final(client, first["id"], timeout=LONG)
            assert_ticks(log_lines(client, worker["id"]))
            assert usage_allocated(client)[0] == 0
    finally:
        cluster.shutdown()


def test_a_killed_actor_fails_its_worker_and_takes_its_processes_along(
    servers: ServerFactory, ray_cluster: RayCluster
) -> None:
    """The actor process itself killed (kill -9, say the OOM killer) on a node that lives on: the
    worker ends FAILED `lost: ...`, its slot comes back, and its fence kills the process group
    the actor started (Ray would leave it running)."""
    server = start_server(servers, ray_cluster)
    task = mark()
    with server.client() as client:
        job = submit(client, agent="ticker", task_description=task)
        worker = wait_until(lambda: running(client, [job["id"]]), timeout=LONG, what="worker running")[0]
        stat = Path(f"/proc/{worker['pid']}/stat").read_text().rsplit(")", 1)[1].split()
        actor_pid = int(stat[1])  # the wrapper's parent: the actor that started it
        assert "ray::" in Path(f"/proc/{actor_pid}/cmdline").read_text(errors="replace")
        os.kill(actor_pid, 9)
        wait_final(client, job["id"], timeout=LONG)
        current = workers_of(client, job["id"])[0]
        assert current["status"] == "FAILED" and current["status_reason"].startswith("lost: "), current
        wait_until(lambda: not grandchildren(task), timeout=LONG, what="the grandchild gone")
        wait_until(lambda: not group_states(worker["pid"]), timeout=LONG, what="the process group gone")
        assert usage_allocated(client)[0] == 0
