#!/usr/bin/env bash
# Judging spread over several `rlvr serve` processes (benches/fleet_judge.rhai): the first N
# MedQA questions of the sample data judged once each (MAX_TOKENS new tokens, temperature 0.7) over
# 1, 2 and 4 servers of one model on this machine, then over 2 servers of which the second
# is killed (SIGKILL) once a third of the responses are cached: the wall time, the cache's
# lines and distinct keys (nothing lost, nothing judged twice) and how many responses differ
# from the 2-server run that was not interrupted.
#
# Usage: benches/fleet.sh [MODEL]
#   MODEL        what `rlvr serve --model` takes (default gemma-3-270m, fetched with
#                `rlvr models fetch gemma-3-270m`)
#   RLVR_BIN     rlvr binary (default: ${CARGO_TARGET_DIR:-target}/debug/rlvr)
#   N            questions (default 200); SERVERS (default "1 2 4"); CONCURRENCY per server (8);
#                MAX_TOKENS per response (default 64)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODEL="${1:-gemma-3-270m}"
RLVR_BIN="${RLVR_BIN:-${CARGO_TARGET_DIR:-target}/debug/rlvr}"
N="${N:-200}" SERVERS="${SERVERS:-1 2 4}" CONCURRENCY="${CONCURRENCY:-8}" MAX_TOKENS="${MAX_TOKENS:-64}"
MODELS_HOME="${RLVR_HOME:-$HOME/.cache/rlvr}"
WORK="$(mktemp -d)"
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

# starts `rlvr serve` on a free port; sets URL and PID
start_server() {
    local log="$WORK/serve-$RANDOM"
    RLVR_HOME="$MODELS_HOME" "$RLVR_BIN" serve --model "$MODEL" --port 0 \
        --served-model-name served >"$log.out" 2>"$log.err" &
    PID=$!
    PIDS+=("$PID")
    for _ in $(seq 600); do
        URL="$(sed -n 's/^listening on \([^ ]*\).*/\1/p' "$log.out")"
        [[ -n "$URL" ]] && return 0
        sleep 0.1
    done
    echo "error: rlvr serve did not start: $(cat "$log.err")" >&2
    exit 1
}

# judges over the servers in URLS with a fresh cache in $WORK/$1; prints the seconds
judge_run() {
    local name="$1"
    mkdir -p "$WORK/$name"
    RLVR_HOME="$WORK/$name" "$RLVR_BIN" run benches/fleet_judge.rhai --quiet \
        --out "$WORK/$name/run" --set "urls=$URLS" --set "n=$N" \
        --set "concurrency=$CONCURRENCY" --set "max_tokens=$MAX_TOKENS" \
        --set "out=$WORK/$name/judged.jsonl" |
        sed -n 's/.* in \([0-9.]*\) s$/\1/p'
}

# the cache's records, one a line (the file has no newline after its last record)
cache_of() { cat "$WORK/$1"/cache/judge/*.jsonl 2>/dev/null | grep .; }

# the responses of run $1 that differ from run $2's, by id
differing() {
    python3 - "$WORK/$1/judged.jsonl" "$WORK/$2/judged.jsonl" <<'PY'
import json, sys
a, b = ({r["id"]: r["responses"] for r in map(json.loads, open(p))} for p in sys.argv[1:])
print(sum(a[k] != b.get(k) for k in a))
PY
}

echo "# $(date -u +%FT%TZ) $(nproc) cores, $(git rev-parse --short HEAD); model $MODEL; $N questions, $MAX_TOKENS new tokens, concurrency $CONCURRENCY per server" >&2
echo "# load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for k in $SERVERS; do
    URLS=""
    for _ in $(seq "$k"); do start_server; URLS="${URLS:+$URLS,}$URL"; done
    seconds="$(judge_run "servers-$k")"
    echo "servers=$k seconds=$seconds questions_per_s=$(python3 -c "print(round($N/$seconds, 2))") cached=$(cache_of "servers-$k" | wc -l) differing_from_1=$( [[ $k == 1 ]] && echo 0 || differing "servers-$k" servers-1)"
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    PIDS=()
done

# two servers, the second killed once a third of the responses are in
start_server; first_url="$URL"
start_server; second_pid="$PID"; URLS="$first_url,$URL"
mkdir -p "$WORK/killed"
(seconds="$(judge_run killed)"; echo "$seconds" >"$WORK/killed/seconds") &
runner=$!
while [[ "$(cache_of killed 2>/dev/null | wc -l)" -lt $((N / 3)) ]]; do sleep 0.2; done
kill -9 "$second_pid"
killed_at="$(cache_of killed | wc -l)"
wait "$runner"
lines="$(cache_of killed | wc -l)"
distinct="$(cache_of killed | python3 -c 'import json,sys; print(len({(r["id"], r["sample"]) for r in map(json.loads, sys.stdin)}))')"
echo "killed: second server killed with $killed_at of $N cached; seconds=$(cat "$WORK/killed/seconds") cached=$lines distinct=$distinct differing_from_2=$(differing killed servers-2)"
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
