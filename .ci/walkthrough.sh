#!/usr/bin/env bash
# Runs the README's two-machine walk-through as written, on one machine: the blocks marked
# <!-- walkthrough:NAME --> are executed line by line. The only changes: /etc/trio-bridge and ~
# point into a scratch directory, https://llm.example.com at the loopback broker, the token and
# key that `tokens add` / `keys add` print are kept for the lines that need them ('tbc_…' and
# 'tbk_…' stand for them), the two roles run in the background, and "edit broker_urls and
# local_url" is done with sed.
# Then what the README promises beside it: `check`'s diagnoses of a wrong relay path, of the
# admin port, and of wss:// against a plain-HTTP broker; a 429 counted in `usage`; and the
# demo's Ctrl-C drain (a request meanwhile gets 503 + Retry-After, the stream in flight ends).
# Needs: python3, curl; the project's .venv with the openai SDK (the test extra) for the
# Python client block. Ports: 8080 (broker), 9180/9181 (admin), 8099 (test model).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
T=$(mktemp -d /tmp/tb-walk.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$T"
}
trap cleanup EXIT

for port in 8080 9180 9181 8099; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "walkthrough: port $port is in use here; cannot run" >&2
        exit 1
    fi
done

export HOME=$T/home PIPX_HOME=$T/pipx PIPX_BIN_DIR=$T/bin PATH=$T/bin:$PATH
mkdir -p "$HOME" "$T/bin"
python3 -m venv "$T/pipx-venv" && "$T/pipx-venv/bin/pip" install -q pipx
ln -s "$T/pipx-venv/bin/pipx" "$T/bin/pipx"

block() {  # the lines of the README block marked <!-- walkthrough:$1 -->
    awk -v tag="<!-- walkthrough:$1 -->" '
        $0 == tag {found = 1; next}
        found && /^```/ {if (inside) exit; inside = 1; next}
        inside {print}' README.md
}

run_line() {  # one command line of a block, as a user would type it
    local line=$1
    line=${line//\/etc\/trio-bridge/$T/etc/trio-bridge}
    line=${line//https:\/\/llm.example.com/http:\/\/127.0.0.1:8080}
    line=${line//\'tbc_…\'/\"\$TOKEN\"}
    line=${line//\'tbk_…\'/\"\$KEY\"}
    echo "\$ $line"
    case "$line" in
        *"tokens add"*) TOKEN=$(eval "$line"); export TOKEN ;;
        *"keys add"*) KEY=$(eval "$line"); export KEY ;;
        "trio-bridge broker "* | "trio-bridge connector "*)
            eval "${line%%#*} &> $T/$(echo "$line" | cut -d' ' -f2).log &"
            PIDS+=($!)
            ;;
        *) eval "$line" ;;
    esac
}

run_block() {
    local joined=""
    while IFS= read -r raw; do
        if [[ $raw == *'\' ]]; then joined+="${raw%\\} "; continue; fi
        local line="$joined$raw"
        joined=""
        [[ -z ${line// /} ]] && continue
        if [[ $line == \#* ]]; then
            if [[ $line == *"edit broker_urls and local_url"* ]]; then
                echo "\$ (edit broker_urls and local_url)"
                sed -i -e 's|^broker_urls = .*|broker_urls = ["ws://127.0.0.1:8080/_bridge/relay"]|' \
                    -e 's|^local_url = .*|local_url = "http://127.0.0.1:8099"|' \
                    "$HOME/.config/trio-bridge/connector.toml"
            fi
            continue
        fi
        run_line "$line"
    done < <(block "$1")
}

wait_ready() {  # $1: admin port
    for _ in $(seq 200); do
        trio-bridge status --ready --url "http://127.0.0.1:$1" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    echo "walkthrough: nothing ready on admin port $1" >&2
    cat "$T"/*.log >&2
    return 1
}

echo "== broker machine"
run_block broker
wait_ready 9180

echo "== an LLM (the built-in test model stands in for it)"
trio-bridge test-model --listen 127.0.0.1:8099 > "$T/model.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 100); do grep -q "serving at" "$T/model.log" && break; sleep 0.1; done

echo "== connector machine"
run_block connector
wait_ready 9181

echo "== a user: curl, streaming"
out=$(run_block client 2>/dev/null)
echo "$out" | tail -3
grep -q '^data: \[DONE\]' <<< "$out"
[ "$(grep -c '"content": ' <<< "$out")" -ge 3 ]  # token by token

echo "== a user: the openai SDK, streaming"
block client-python | sed 's|https://llm.example.com|http://127.0.0.1:8080|' > "$T/client.py"
sdk=$("$REPO/.venv/bin/python" "$T/client.py")
echo "$sdk"
grep -q 'You said: Hi' <<< "$sdk"

echo "== the admin pages, from the installed package"
curl -sf http://127.0.0.1:9181/ | grep -q '<title>trio-bridge connector</title>'
curl -sf http://127.0.0.1:9181/ui/connector.js | grep -q 'EventSource'
curl -sf http://127.0.0.1:9180/api/routes | grep -q '"default"'

CFG=$HOME/.config/trio-bridge/connector.toml
echo "== check: one line for each broken setup"
diagnose() {  # $1: a broker URL; prints check's line about it (check must exit 1)
    sed "s|^broker_urls = .*|broker_urls = [\"$1\"]|" "$CFG" > "${CFG%/*}/check.toml"
    local rc=0 out
    out=$(trio-bridge check -c "${CFG%/*}/check.toml") || rc=$?
    [ "$rc" = 1 ] || { echo "walkthrough: check exited $rc for $1" >&2; return 1; }
    grep "^FAIL  broker " <<< "$out"
}
line=$(diagnose ws://127.0.0.1:8080/relay)
echo "$line"
[[ $line == *"expected a path like …/_bridge/relay)" ]]  # one parenthesis, at the end
line=$(diagnose ws://127.0.0.1:9180/_bridge/relay)
echo "$line"
[[ $line == *"this is an admin port, not the broker's public port"* ]]
t0=$SECONDS
line=$(diagnose wss://127.0.0.1:8080/_bridge/relay)
echo "$line"
[[ $line == *"TLS handshake failed: the server answered in plain HTTP"* ]]
[ $((SECONDS - t0)) -lt 4 ]  # at once, not after connect_timeout

echo "== a 429 is in usage (a refused request of its key)"
BOB=$(trio-bridge keys add bob --rpm 1 -c "$CFG")
code=401
for _ in $(seq 50); do  # the running connector reads the keys file within a second
    code=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/v1/models \
        -H "Authorization: Bearer $BOB")
    [ "$code" = 401 ] || break
    sleep 0.1
done
[ "$code" = 200 ]
code=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:8080/v1/models \
    -H "Authorization: Bearer $BOB")
[ "$code" = 429 ]
counted() {
    trio-bridge usage --key bob --since 0d --format json -c "$CFG" | python3 -c '
import json, sys
rows = json.load(sys.stdin)
print(sum(r["requests"] for r in rows), sum(r["refused"] for r in rows), sum(r["errors"] for r in rows))'
}
for _ in $(seq 50); do [ "$(counted)" = "2 1 0" ] && break; sleep 0.2; done  # flushed every 2 s
trio-bridge usage --key bob --since 0d -c "$CFG"
[ "$(counted)" = "2 1 0" ]

echo "== stop both roles (SIGTERM: drain, exit 0)"
for p in "${PIDS[@]}"; do kill -TERM "$p"; done
for p in "${PIDS[@]}"; do wait "$p"; done
PIDS=()

echo "== the demo: Ctrl-C drains; a request meanwhile gets 503 + Retry-After"
trio-bridge demo --port 0 --test-model > "$T/demo.out" 2> "$T/demo.err" &
DEMO=$!
PIDS+=("$DEMO")
for _ in $(seq 100); do grep -q "Press Ctrl-C" "$T/demo.out" && break; sleep 0.1; done
BASE=$(awk '/Public base URL/ {print $NF}' "$T/demo.out")
DKEY=$(awk '/API key/ {print $NF}' "$T/demo.out")
ask() {  # $1: stream true|false
    curl -sS -i -N "$BASE/chat/completions" -H "Authorization: Bearer $DKEY" \
        -H 'Content-Type: application/json' \
        -d "{\"model\": \"x\", \"stream\": $1, \"messages\": [{\"role\": \"user\", \"content\": \"count to 40\"}]}"
}
ask true > "$T/long.out" &
LONG=$!
for _ in $(seq 100); do grep -q '^data: ' "$T/long.out" && break; sleep 0.05; done
kill -INT "$DEMO"
PAGE=$(grep -o 'Broker page *: http://[^ ]*' "$T/demo.out" | awk '{print $NF}')
for _ in $(seq 100); do  # the drain has begun: the broker is no longer ready
    [ "$(curl -s -o /dev/null -w '%{http_code}' "${PAGE}readyz")" = 503 ] && break
    sleep 0.05
done
refused=$(ask false)
head -1 <<< "$refused"
grep -q '^HTTP/1.1 503' <<< "$refused"
grep -qi '^retry-after: 1' <<< "$refused"
wait "$LONG"
grep -q '^data: \[DONE\]' "$T/long.out"  # the answer in flight finished
wait "$DEMO"  # and the demo exited 0
PIDS=()
echo "walkthrough: README commands OK (two roles, a request and a stream through, check's" \
    "diagnoses, a 429 in usage, the demo's drain)"
