#!/usr/bin/env bash
# Idempotently install the agent CLIs used by the test harness from the npm registry.
#
#   bash tests/fakes/install_claude.sh            # Claude Code only (default)
#   bash tests/fakes/install_claude.sh --codex    # Claude Code and Codex
#
# Prints the path of each installed binary on stdout (claude first, then codex).
# Versions are pinned; override with CLAUDE_CODE_VERSION / CODEX_VERSION.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CLAUDE_CODE_VERSION="${CLAUDE_CODE_VERSION:-2.1.332}"
CODEX_VERSION="${CODEX_VERSION:-0.171.0}"

want_codex=0
for arg in "$@"; do
  case "$arg" in
    --codex) want_codex=1 ;;
    *) echo "usage: $0 [--codex]" >&2; exit 2 ;;
  esac
done

command -v npm >/dev/null 2>&1 || { echo "install_claude.sh: npm not found (apt-get install nodejs npm)" >&2; exit 1; }

# install PREFIX PACKAGE VERSION BIN_NAME
install_pkg() {
  local prefix="$1" pkg="$2" version="$3" bin="$4"
  local dir="$ROOT/.tools/$prefix"
  local binpath="$dir/node_modules/.bin/$bin"
  local have=""
  if [[ -f "$dir/node_modules/$pkg/package.json" ]]; then
    have="$(node -p "require('$dir/node_modules/$pkg/package.json').version" 2>/dev/null || true)"
  fi
  # Installed at the pinned version and the binary actually runs: nothing to do.
  if [[ "$have" == "$version" && -x "$binpath" ]] && "$binpath" --version >/dev/null 2>&1; then
    echo "$binpath"
    return 0
  fi
  mkdir -p "$dir"
  echo "install_claude.sh: installing $pkg@$version into $dir" >&2
  # --include=optional: the native binary ships as an optional dependency.
  npm install --prefix "$dir" --no-audit --no-fund --loglevel=error --include=optional \
    "$pkg@$version" >&2
  if ! "$binpath" --version >/dev/null 2>&1; then
    echo "install_claude.sh: $binpath does not run after install" >&2
    return 1
  fi
  echo "$binpath"
}

install_pkg claude @anthropic-ai/claude-code "$CLAUDE_CODE_VERSION" claude
if [[ "$want_codex" == 1 ]]; then
  install_pkg codex @openai/codex "$CODEX_VERSION" codex
fi
