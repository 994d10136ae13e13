#!/usr/bin/env bash
# Installs the package with pipx into a throw-away home, as a user would, and checks that the
# console script works: --help, and the demo answering a request.
set -euo pipefail
cd "$(dirname "$0")/.."
T=$(mktemp -d /tmp/tb-pipx.XXXXXX)
trap 'kill "${DEMO:-0}" 2>/dev/null || true; rm -rf "$T"' EXIT
python3 -m venv "$T/venv" && "$T/venv/bin/pip" install -q pipx
export PIPX_HOME="$T/home" PIPX_BIN_DIR="$T/bin"
"$T/venv/bin/pipx" install -q . >/dev/null
"$T/bin/trio-bridge" --help | grep -q "demo"
"$T/bin/trio-bridge" demo --port 0 --test-model > "$T/demo.out" 2> "$T/demo.err" &
DEMO=$!
for _ in $(seq 100); do grep -q "Press Ctrl-C" "$T/demo.out" && break; sleep 0.1; done
CMD=$(grep -m1 "^  curl -sS " "$T/demo.out")
bash -c "$CMD" | grep -q "test model"
echo "pipx install: trio-bridge --help and demo OK"
