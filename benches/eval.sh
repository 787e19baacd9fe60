#!/usr/bin/env bash
# Evaluation benchmark: log-likelihood scoring of the same 200 MMLU questions (0-shot,
# lm-evaluation-harness's prompt; the first 20 subjects of the data sample, 10 questions each)
# with gemma-3-270m on the CPU, rlvr (`benches/eval_loglik.rhai`) against lm-eval's `hf`
# backend (`benches/eval_lm_eval.py`, float32, 2 torch threads), one after the other.
# Prints questions/s for each and the share of identical predictions.
#
# Usage: benches/eval.sh [GGUF]
#   GGUF                 default: $HOME/.cache/rlvr/downloads/gemma-3-270m/gemma-3-270m-q4_k_m.gguf
#                        (tokenizer.json and tokenizer_config.json beside it)
#   RLVR_BIN             rlvr binary (default: ${CARGO_TARGET_DIR:-target}/debug/rlvr)
#   RLVR_REFERENCE_VENV  pinned reference venv with lm_eval (reference/setup.sh)
#   RLVR_BENCH_BATCH     rlvr questions per batch (default 64, as `evaluate`'s for loglik); LM_EVAL_BATCH lm-eval's (default 1)
#   RLVR_BENCH_SUBJECTS  how many subjects of the sample (default 20, 10 questions each)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GGUF="${1:-$HOME/.cache/rlvr/downloads/gemma-3-270m/gemma-3-270m-q4_k_m.gguf}"
cd "$ROOT"
RLVR_BIN="${RLVR_BIN:-${CARGO_TARGET_DIR:-target}/debug/rlvr}"
PY="${RLVR_REFERENCE_VENV:-$HOME/.cache/rlvr/reference-venv}/bin/python"
BATCH="${RLVR_BENCH_BATCH:-64}"
LM_BATCH="${LM_EVAL_BATCH:-1}"
DATA="$ROOT/data/samples/mmlu"
SUBJECTS="$(ls "$DATA/test" | sed "s/_test\\.csv$//" | head -"${RLVR_BENCH_SUBJECTS:-20}" | paste -sd, -)"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
/usr/bin/time -f "rlvr peak RSS %M KiB, wall %e s" "$RLVR_BIN" run benches/eval_loglik.rhai \
    --set "model=$GGUF" --set "data=$DATA" --set "subjects=$SUBJECTS" \
    --set "batch=$BATCH" --set "predictions=$OUT/rlvr.jsonl"
/usr/bin/time -f "lm-eval peak RSS %M KiB, wall %e s" "$PY" benches/eval_lm_eval.py \
    --model "$GGUF" --data "$DATA" --subjects "$SUBJECTS" --batch "$LM_BATCH" --out "$OUT/lm_eval.json"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
"$PY" - "$OUT/rlvr.jsonl" "$OUT/lm_eval.json" <<'PY'
import json, sys
ours = {r["id"]: r for r in map(json.loads, open(sys.argv[1]))}
theirs = json.load(open(sys.argv[2]))["preds"]
shared = sorted(set(ours) & set(theirs))
same = sum(ours[i]["pred"] == theirs[i]["pred"] for i in shared)
print(f"{len(shared)} questions; identical predictions: {same}/{len(shared)} = {same / len(shared):.1%}")
PY
