#!/usr/bin/env bash
# Every check and test: lint, types, the whole suite on SQLite, then the integration suite on PostgreSQL,
# then the Ray group (tests/ray: a real multi-node Ray cluster on this machine, on PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin

echo "== ruff"
$BIN/ruff check orchestrator tests scripts bench
$BIN/ruff format --check orchestrator tests scripts bench
echo "== mypy --strict"
$BIN/mypy orchestrator

mkdir -p test-artifacts

# System tools the suite drives for real: a headless browser for the dashboard test, git for worktrees,
# bubblewrap (the worker sandbox, and the host kind on which the Codex profile must work).
if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1 \
  || ! command -v git >/dev/null 2>&1 || ! command -v bwrap >/dev/null 2>&1; then
  echo "== installing chromium, chromium-driver, git and bubblewrap (Debian packages)"
  if [ "$(id -u)" = "0" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver git bubblewrap >/dev/null \
      || echo "could not install them; the tests that need them will fail and say why"
  else
    echo "not root: install chromium, chromium-driver, git and bubblewrap yourself; the tests that need them will fail and say why"
  fi
fi
# The worker sandbox (bubblewrap) and its network guard (nftables): every worker in the suite runs in them.
if ! command -v bwrap >/dev/null 2>&1 || ! { command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ]; }; then
  echo "== installing bubblewrap and nftables (Debian packages)"
  if [ "$(id -u)" = "0" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap nftables >/dev/null \
      || echo "could not install bubblewrap and nftables; every test that starts a worker will fail and say why"
  else
    echo "not root: install bubblewrap and nftables yourself; every test that starts a worker will fail and say why"
  fi
fi
# The real Claude Code CLI (npm registry), for the agent tests.
bash tests/fakes/install_claude.sh >/dev/null || echo "could not install the Claude Code CLI; the agent tests will fail and say why"
# Both halves always run (a failure in the first must not hide the second's); each half's whole output is
# kept in test-artifacts/, and both summary lines are printed at the end. pytest's exit 5 ("no tests
# collected", e.g. a -k that matches only one half) is fine for one half, not for both.
run_half() {  # NAME LOG ARGS...: run pytest, tee its output to LOG, return its exit status
  local name="$1" log="$2"
  shift 2
  echo "== pytest ($name)"
  set +e
  "$@" 2>&1 | tee "$log"
  local rc="${PIPESTATUS[0]}"
  set -e
  return "$rc"
}
summary_of() {  # the last summary line pytest printed in LOG, or what went wrong
  local line
  line="$(grep -E '([0-9]+ (passed|failed|errors?|skipped|deselected|xfailed|xpassed)|no tests ran)' "$1" | tail -1 || true)"
  echo "${line:-no pytest summary (see $1)}"
}

SQLITE_LOG=test-artifacts/pytest-sqlite.log
PG_LOG=test-artifacts/pytest-postgres.log
sqlite_rc=0
run_half SQLite "$SQLITE_LOG" env TEST_DATABASE=sqlite $BIN/python -m pytest -q -ra --ignore=tests/ray "$@" || sqlite_rc=$?

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "PostgreSQL is not accepting connections on 127.0.0.1:5432; trying to start it"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
pg_rc=0
run_half "PostgreSQL: integration, streams, agents" "$PG_LOG" \
  env TEST_DATABASE=postgres $BIN/python -m pytest -q -ra tests/integration tests/streams tests/agents "$@" || pg_rc=$?
# Ray: workers as actors on a head and two nodes (a few minutes; the `ray` package comes with the dev extra).
RAY_LOG=test-artifacts/pytest-ray.log
ray_rc=0
run_half "Ray cluster (PostgreSQL)" "$RAY_LOG" \
  env TEST_DATABASE=postgres $BIN/python -m pytest -q -ra tests/ray "$@" || ray_rc=$?

echo "== summary"
echo "SQLite (exit $sqlite_rc): $(summary_of "$SQLITE_LOG")   [$SQLITE_LOG]"
echo "PostgreSQL (exit $pg_rc): $(summary_of "$PG_LOG")   [$PG_LOG]"
echo "Ray (exit $ray_rc): $(summary_of "$RAY_LOG")   [$RAY_LOG]"
ok() { [ "$1" = 0 ] || [ "$1" = 5 ]; }
if ! ok "$sqlite_rc" || ! ok "$pg_rc" || ! ok "$ray_rc"; then
  echo "FAILED: $( ok "$sqlite_rc" || echo "SQLite half (exit $sqlite_rc) " )$( ok "$pg_rc" || echo "PostgreSQL half (exit $pg_rc) " )$( ok "$ray_rc" || echo "Ray group (exit $ray_rc)" )"
  exit 1
fi
if [ "$sqlite_rc" = 5 ] && [ "$pg_rc" = 5 ]; then
  echo "FAILED: no tests ran in either half"
  exit 5
fi
echo "OK: every group passed"
