#!/usr/bin/env bash
# Every check and test: lint, types, the whole suite on SQLite, then the integration suite on PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

echo "== ruff"
$BIN/ruff check orchestrator tests scripts bench
$BIN/ruff format --check orchestrator tests scripts bench
echo "== mypy --strict"
$BIN/mypy orchestrator

mkdir -p test-artifacts

# System tools the suite drives for real: a headless browser for the dashboard test, git for worktrees.
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1 || ! command -v git >/dev/null 2>&1; then
  echo "== installing chromium, chromium-driver and git (Debian packages)"
  if [ "$(id -u)" = "0" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver git >/dev/null \
      || echo "could not install them; the tests that need them will fail and say why"
  else
    echo "not root: install chromium, chromium-driver and git yourself; the tests that need them will fail and say why"
  fi
fi
# The worker sandbox (bubblewrap): every worker in the suite runs in it.
if ! command -v bwrap >/dev/null 2>&1; then
  echo "== installing bubblewrap (Debian package)"
  if [ "$(id -u)" = "0" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap >/dev/null \
      || echo "could not install bubblewrap; every test that starts a worker will fail and say why"
  else
    echo "not root: install bubblewrap yourself; every test that starts a worker will fail and say why"
  fi
fi
# The real Claude Code CLI (npm registry), for the agent tests.
bash tests/fakes/install_claude.sh >/dev/null || echo "could not install the Claude Code CLI; the agent tests will fail and say why"
echo "== pytest (SQLite)"
TEST_DATABASE=sqlite $BIN/python -m pytest -q -ra "$@"

echo "== pytest integration, streams and agents (PostgreSQL)"
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "PostgreSQL is not accepting connections on 127.0.0.1:5432; trying to start it"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
TEST_DATABASE=postgres $BIN/python -m pytest -q -ra tests/integration tests/streams tests/agents "$@"
