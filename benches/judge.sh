#!/usr/bin/env bash
# Judge throughput (BENCHMARKS.md "The generation engine"): the same `judge` call
# (benches/judge.rhai: MedQA sample questions × k samples, temperature 1, up to N new tokens)
# run by this rlvr on the model itself, by an older rlvr binary the same way, and through
# the endpoint client against llama.cpp's own server (llama-server, continuous batching with
# parallel slots) serving the same GGUF. One after the other, each in a fresh RLVR_HOME;
# completion tokens are counted by re-tokenizing every response with the model's
# tokenizer.json, the same way for all three. Run by hand, never in CI.
#
# Usage: benches/judge.sh [GGUF]
#   GGUF            default: ~/.cache/rlvr/models/gemma-3-270m/*.gguf (tokenizer.json beside it)
#   RLVR_BIN        this rlvr (default: ${CARGO_TARGET_DIR:-target}/debug/rlvr)
#   RLVR_OLD_BIN    an older rlvr binary to compare with (optional)
#   LLAMA_SERVER    llama.cpp's llama-server binary (optional; its libraries beside it)
#   LLAMA_ARGS      more llama-server arguments, e.g. "--no-repack" where AMX is not enabled
#   QUESTIONS (64), SAMPLES (4), MAX_TOKENS (256), BATCH (16 conversations per call; for the
#   server, requests in flight), PARALLEL (llama-server's slots, 16), THREADS (2)
#   RLVR_REFERENCE_VENV  python with `tokenizers` (default ~/.cache/rlvr/reference-venv)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
GGUF="${1:-$(ls "$HOME"/.cache/rlvr/models/gemma-3-270m/*.gguf | head -n 1)}"
TOKENIZER="$(dirname "$GGUF")/tokenizer.json"
RLVR_BIN="${RLVR_BIN:-${CARGO_TARGET_DIR:-target}/debug/rlvr}"
PY="${RLVR_REFERENCE_VENV:-$HOME/.cache/rlvr/reference-venv}/bin/python"
QUESTIONS="${QUESTIONS:-64}" SAMPLES="${SAMPLES:-4}" MAX_TOKENS="${MAX_TOKENS:-256}"
BATCH="${BATCH:-16}" PARALLEL="${PARALLEL:-16}" THREADS="${THREADS:-2}"
[[ -f "$GGUF" && -f "$TOKENIZER" ]] || { echo "error: $GGUF or $TOKENIZER missing" >&2; exit 1; }
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"; [[ -n "${SERVER_PID:-}" ]] && kill "$SERVER_PID" 2>/dev/null || true' EXIT
ARGS=(--set "questions=$QUESTIONS" --set "samples=$SAMPLES" --set "max_tokens=$MAX_TOKENS" --set "batch=$BATCH")

# tokens NAME: counts the completion tokens of $WORK/NAME.jsonl and prints the summary line.
tokens() {
    "$PY" - "$TOKENIZER" "$WORK/$1.jsonl" "$1" "$2" <<'PYEOF'
import json, sys
from tokenizers import Tokenizer
tok = Tokenizer.from_file(sys.argv[1])
responses = [r for line in open(sys.argv[2]) for r in json.loads(line)["responses"]]
n = sum(len(tok.encode(r, add_special_tokens=False).ids) for r in responses)
seconds = float(sys.argv[4])
print(f"{sys.argv[3]}: {len(responses)} answers, {n} completion tokens in {seconds:.1f} s = {n / seconds:.1f} tokens/s")
PYEOF
}

# judge NAME BIN EXTRA-ARGS...: one judge run in a fresh RLVR_HOME; prints its token rate.
judge() {
    local name="$1" bin="$2"
    shift 2
    echo "# $name (load average before: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    local line
    line="$(RLVR_HOME="$(mktemp -d -p "$WORK")" RAYON_NUM_THREADS="$THREADS" "$bin" run -q \
        --out "$WORK/run-$name" benches/judge.rhai "${ARGS[@]}" --set "responses=$WORK/$name.jsonl" "$@" | grep '^judge:')"
    echo "#   $line" >&2
    tokens "$name" "$(sed -E 's/.* ([0-9.]+) s$/\1/' <<<"$line")"
}

judge rlvr "$RLVR_BIN" --set "model=$GGUF"
if [[ -n "${RLVR_OLD_BIN:-}" ]]; then
    judge rlvr-old "$RLVR_OLD_BIN" --set "model=$GGUF"
fi
if [[ -n "${LLAMA_SERVER:-}" ]]; then
    PORT=18391
    CTX=$(( PARALLEL * (1024 + MAX_TOKENS) ))
    LD_LIBRARY_PATH="$(dirname "$LLAMA_SERVER")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$LLAMA_SERVER" -m "$GGUF" --port "$PORT" -t "$THREADS" -tb "$THREADS" -np "$PARALLEL" \
        -c "$CTX" --chat-template gemma --no-webui ${LLAMA_ARGS:-} >"$WORK/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 120); do
        curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
        sleep 1
    done
    judge llama-server "$RLVR_BIN" --set "server=http://127.0.0.1:$PORT/v1" \
        --set "served_model=$(basename "$GGUF")" --set "concurrency=$PARALLEL"
    kill "$SERVER_PID"
fi
