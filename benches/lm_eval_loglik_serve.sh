#!/usr/bin/env bash
# Log-likelihood scoring through a server, three ways on the same MMLU questions (0-shot,
# lm-eval's prompt, the letters as continuations): lm-eval's `local-completions` model against
# `rlvr serve` (benches/lm_eval_completions.py), rlvr's endpoint backend against the same
# server, and rlvr's local backend on the same model (benches/eval_served.rhai). Prints the
# share of identical predictions and the largest difference of an option's log-likelihood.
# Run by hand, never in CI.
#
# Usage: benches/lm_eval_loglik_serve.sh [MODEL_DIR] [SUBJECTS]
#   MODEL_DIR            a folder with one .gguf, tokenizer.json and tokenizer_config.json
#                        (default: $RLVR_HOME/models/gemma-3-270m, `rlvr models fetch gemma-3-270m`)
#   SUBJECTS             how many subjects of data/samples/mmlu, 10 questions each (default 2)
#   RLVR_BIN             rlvr binary (default: ${CARGO_TARGET_DIR:-target}/debug/rlvr)
#   RLVR_REFERENCE_VENV  the pinned reference venv with lm_eval (reference/setup.sh); lm-eval's
#                        API models also need `tenacity`, installed here into a folder of its own
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODEL_DIR="${1:-${RLVR_HOME:-$HOME/.cache/rlvr}/models/gemma-3-270m}"
GGUF="$(ls "$MODEL_DIR"/*.gguf | head -1)"
RLVR_BIN="${RLVR_BIN:-${CARGO_TARGET_DIR:-target}/debug/rlvr}"
PY="${RLVR_REFERENCE_VENV:-$HOME/.cache/rlvr/reference-venv}/bin/python"
EXTRA="$HOME/.cache/rlvr/lmeval-api-extra"
[[ -d "$EXTRA/tenacity" ]] || "$PY" -m pip install --quiet --target "$EXTRA" tenacity==9.1.2
DATA="$ROOT/data/samples/mmlu"
SUBJECTS="$(ls "$DATA/test" | sed "s/_test\\.csv$//" | head -"${2:-2}" | paste -sd, -)"
OUT="$(mktemp -d)"

PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$RLVR_BIN" serve --model "$GGUF" --served-model-name served --port "$PORT" 2> "$OUT/serve.log" &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null || true; rm -rf "$OUT"' EXIT
for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null 2>&1 && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$OUT/serve.log" >&2; exit 1; }
    sleep 0.5
done

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
PYTHONPATH="$EXTRA" "$PY" benches/lm_eval_completions.py \
    --base-url "http://127.0.0.1:$PORT/v1/completions" --model served --tokenizer "$MODEL_DIR" \
    --data "$DATA" --subjects "$SUBJECTS" --out "$OUT/lm_eval.json"
"$RLVR_BIN" run benches/eval_served.rhai --quiet --out "$OUT/run-endpoint" \
    --set "url=http://127.0.0.1:$PORT/v1" --set "data=$DATA" --set "subjects=$SUBJECTS" \
    --set "predictions=$OUT/endpoint.jsonl"
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true
"$RLVR_BIN" run benches/eval_served.rhai --quiet --out "$OUT/run-local" \
    --set "model=$GGUF" --set "data=$DATA" --set "subjects=$SUBJECTS" \
    --set "predictions=$OUT/local.jsonl"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "requests the server answered: $(grep -c 'POST /v1/completions 200' "$OUT/serve.log")"
"$PY" - "$OUT/lm_eval.json" "$OUT/endpoint.jsonl" "$OUT/local.jsonl" <<'PY'
import json, sys
lm_eval = json.load(open(sys.argv[1]))["preds"]
endpoint = {r["id"]: r for r in map(json.loads, open(sys.argv[2]))}
local = {r["id"]: r for r in map(json.loads, open(sys.argv[3]))}
ids = sorted(set(lm_eval) & set(endpoint) & set(local))
for name, a, b in [("lm-eval local-completions vs rlvr endpoint", lm_eval, endpoint),
                   ("rlvr endpoint vs rlvr local", endpoint, local),
                   ("lm-eval local-completions vs rlvr local", lm_eval, local)]:
    same = sum(a[i]["pred"] == b[i]["pred"] for i in ids)
    diff = max(abs(x - y) for i in ids for x, y in zip(a[i]["logprobs"], b[i]["logprobs"]))
    print(f"{name}: identical predictions {same}/{len(ids)}, largest log-likelihood difference {diff:.2e}")
PY
