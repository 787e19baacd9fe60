#!/usr/bin/env bash
# lm-eval's `local-chat-completions` against `rlvr serve`: the harness sends its chat payloads
# (messages, max_tokens, temperature, stop, seed) to /v1/chat/completions, 4 at a time, on the
# GSM8K sample. Checks that the server speaks what lm-eval expects; run by hand, never in CI.
#
# Usage: benches/lm_eval_serve.sh [MODEL] [LIMIT]
#   MODEL               what `rlvr serve --model` takes (default: the gemma-3-270m download
#                       folder, $HOME/.cache/rlvr/downloads/gemma-3-270m)
#   LIMIT               questions (default 8)
#   RLVR_BIN            rlvr binary (default: ${CARGO_TARGET_DIR:-target}/debug/rlvr)
#   RLVR_LMEVAL_PYTHON  a python with lm_eval (default: a venv made at
#                       $HOME/.cache/rlvr/lmeval-venv from benches/lm_eval-requirements.txt)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
MODEL="${1:-$HOME/.cache/rlvr/downloads/gemma-3-270m}"
LIMIT="${2:-8}"
RLVR_BIN="${RLVR_BIN:-${CARGO_TARGET_DIR:-target}/debug/rlvr}"
PY="${RLVR_LMEVAL_PYTHON:-}"
if [[ -z "$PY" ]]; then
    VENV="$HOME/.cache/rlvr/lmeval-venv"
    [[ -x "$VENV/bin/python" ]] || {
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet -r benches/lm_eval-requirements.txt
    }
    PY="$VENV/bin/python"
fi

PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
"$RLVR_BIN" serve --model "$MODEL" --served-model-name served --port "$PORT" 2> /tmp/rlvr-serve-lmeval.log &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null 2>&1 && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat /tmp/rlvr-serve-lmeval.log >&2; exit 1; }
    sleep 0.5
done

OUT="$(mktemp -d)"
HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 "$PY" -m lm_eval --model local-chat-completions \
    --apply_chat_template \
    --model_args "model=served,base_url=http://127.0.0.1:$PORT/v1/chat/completions,num_concurrent=4,max_retries=2" \
    --include_path benches/lm_eval --tasks rlvr_gsm8k_sample --limit "$LIMIT" \
    --log_samples --output_path "$OUT"
echo "# requests as the server logged them:"
grep "/v1/chat/completions" /tmp/rlvr-serve-lmeval.log
echo "# responses:"
"$PY" - "$OUT" <<'PY'
import glob, json, sys
for path in glob.glob(f"{sys.argv[1]}/**/samples_*.jsonl", recursive=True):
    for line in open(path):
        row = json.loads(line)
        print(f"target {row['target']!r:>8}  response {row['resps'][0][0][:70]!r}")
PY
