"""Getting a job's result back (issue 15): the result and diff API, and the CLI's result, diff,
apply and submit --wait, against a real server, real workers and a real git repository."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.cli.support import assert_one_error_line, cli_env, ok, run
from tests.integration.test_engine_lifecycle import submit, wait_final, workers_of
from tests.integration.test_engine_workspaces_tokens import git, make_repo
from tests.support.servers import ServerFactory

FILES = {"file-{index}.txt": "written by worker {index}\n"}


def test_result_and_diff_api(servers: ServerFactory) -> None:
    repo = make_repo(servers.root)
    server = servers.start()
    with server.client() as client:
        running = submit(client, repository=str(repo), agent_options={"duration_seconds": 60})
        early = client.get(f"/api/jobs/{running['id']}/result")
        assert early.status_code == 404 and "no result yet" in early.json()["detail"]
        assert client.get(f"/api/jobs/{running['id']}/diff").status_code == 404
        plain = submit(client, agent_options={"duration_seconds": 0})
        wait_final(client, plain["id"])
        no_repo = client.get(f"/api/jobs/{plain['id']}/result")
        assert no_repo.status_code == 400 and "no repository" in no_repo.json()["detail"]
        assert client.get("/api/jobs/j_000000000000/result").status_code == 404

        job = submit(
            client,
            worker_count=2,
            repository=str(repo),
            agent_options={"duration_seconds": 0, "files": FILES},
        )
        assert wait_final(client, job["id"])["status"] == "COMPLETED"
        body = client.get(f"/api/jobs/{job['id']}/result").json()
        branch = f"orchestrator/{job['id']}/result"
        assert body["branch"] == branch and body["repository"] == str(repo.resolve())
        assert body["commit"] == git(repo, "rev-parse", branch)
        assert body["base_commit"] == git(repo, "rev-parse", "main")
        workers = sorted(workers_of(client, job["id"]), key=lambda w: w["worker_index"])
        assert [(m["branch"], m["commit"]) for m in body["merged"]] == [
            (w["branch"], w["commit"]) for w in workers
        ]
        assert (body["files_changed"], body["insertions"], body["deletions"]) == (2, 2, 0)
        assert "file-0.txt" in body["diff_stat"] and body["conflicts"] == [] and body["status"] == "done"

        whole = client.get(f"/api/jobs/{job['id']}/diff")
        assert whole.status_code == 200 and whole.headers["x-diff-truncated"] == "false"
        assert whole.text.count("diff --git") == 2 and "+written by worker 1" in whole.text
        one = client.get(f"/api/jobs/{job['id']}/diff", params={"path": "file-1.txt"})
        assert one.text.count("diff --git") == 1 and "a/file-1.txt" in one.text
        magic = client.get(f"/api/jobs/{job['id']}/diff", params={"path": ":(glob)*"})
        assert magic.status_code == 200 and magic.text == "", "paths are literal, not pathspec magic"
        cut = client.get(f"/api/jobs/{job['id']}/diff", params={"max_bytes": 20})
        assert cut.headers["x-diff-truncated"] == "true" and len(cut.content) <= 20
        for bad in ({"max_bytes": 0}, {"path": "/etc/passwd"}, {"path": "a\0b"}):
            response = client.get(f"/api/jobs/{job['id']}/diff", params=bad)
            assert response.status_code in (400, 422) and "detail" in response.json(), bad
        client.post(f"/api/jobs/{running['id']}/cancel")
        # A worker token of another tree cannot read this result.
        other = httpx.get(f"{server.url}/api/jobs/{job['id']}/result")
        assert other.status_code == 401


def test_cli_result_diff_apply_and_submit_wait(servers: ServerFactory, tmp_path: Path) -> None:
    repo = make_repo(servers.root)
    server = servers.start()
    env = cli_env(tmp_path / "home", server)
    (tmp_path / "home").mkdir()
    out = ok(
        env, "submit", "two files", "--workers", "2", "--repo", str(repo), "--wait",
        "-o", "duration_seconds=0", "-o", 'files={"file-{index}.txt": "written by worker {index}\\n"}',
        timeout=120,
    )  # fmt: skip
    job_id = out.split("Submitted ", 1)[1].split()[0]
    branch = f"orchestrator/{job_id}/result"
    assert f"Result {branch}" in out, out  # submit --wait ends with the result summary
    assert "2 file(s) changed" in out

    summary = ok(env, "result", job_id)
    assert branch in summary and "2 branch(es) merged" in summary and "file-0.txt" in summary
    plain = ok(env, "diff", job_id, "file-0.txt", "--no-color")
    assert plain.count("diff --git") == 1 and "+written by worker 0" in plain and "\x1b[" not in plain
    coloured = ok(env, "diff", job_id, "--color", "--no-pager")
    assert "\x1b[32m+written by worker 1" in coloured

    (repo / "README.md").write_text("dirty\n")
    refused = run(env, "apply", job_id)
    assert refused.returncode == 1 and refused.stdout == "" and "Traceback" not in refused.stderr
    first, *details = refused.stderr.strip().splitlines()
    assert first.startswith("error: ") and "uncommitted changes" in first, first
    assert details == ["  M README.md"], details
    assert git(repo, "rev-parse", "HEAD") == git(repo, "rev-parse", "main")
    git(repo, "checkout", "--", "README.md")
    git(repo, "branch", "feature")
    git(repo, "config", "user.name", "Someone")  # the user's identity: the merge is theirs
    git(repo, "config", "user.email", "someone@example.com")
    applied = ok(env, "apply", job_id, "--into", "feature")
    assert "into feature" in applied
    assert git(repo, "rev-parse", "--abbrev-ref", "HEAD") == "feature"
    assert git(repo, "show", "feature:file-1.txt") == "written by worker 1"
    assert git(repo, "rev-list", "--parents", "-n", "1", "feature").count(" ") == 2, "a merge commit"
    missing = run(env, "result", "j_000000000000")
    assert_one_error_line(missing, contains="not found")
