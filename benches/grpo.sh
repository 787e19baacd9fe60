#!/usr/bin/env bash
# GRPO benchmark: `rlvr bench grpo` against TRL GRPOTrainer + PEFT (benches/grpo_trl.py) on
# gemma-3-270m (Q4_K_M GGUF, dequantized to f32 by both), the same MedQA questions, prompt,
# rewards, group, lengths and LoRA shape; one process at a time, alternating, REPS times each.
#
# Usage: benches/grpo.sh [GGUF]
#   GGUF                 default: $HOME/.cache/rlvr/downloads/gemma-3-270m/gemma-3-270m-q4_k_m.gguf
#                        (tokenizer.json and tokenizer_config.json must sit beside it)
#   RLVR_BIN             rlvr binary (default: ${CARGO_TARGET_DIR:-target}/debug/rlvr)
#   RLVR_REFERENCE_VENV  pinned reference venv (default: $HOME/.cache/rlvr/reference-venv,
#                        made by reference/setup.sh)
#   GROUP PROMPTS MAX_TOKENS RANK STEPS   the settings (default 4 2 64 16 1)
#   REPS                 repetitions of each side (default 2)
#   RLVR_BENCH_SKIP_RLVR=1 / RLVR_BENCH_SKIP_TRL=1   run one side only
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GGUF="${1:-$HOME/.cache/rlvr/downloads/gemma-3-270m/gemma-3-270m-q4_k_m.gguf}"
GGUF="$(cd "$(dirname "$GGUF")" && pwd)/$(basename "$GGUF")"
cd "$ROOT"

RLVR_BIN="${RLVR_BIN:-${CARGO_TARGET_DIR:-target}/debug/rlvr}"
VENV="${RLVR_REFERENCE_VENV:-$HOME/.cache/rlvr/reference-venv}"
PY="$VENV/bin/python"
GROUP="${GROUP:-4}" PROMPTS="${PROMPTS:-2}" MAX_TOKENS="${MAX_TOKENS:-64}" RANK="${RANK:-16}" STEPS="${STEPS:-1}"
REPS="${REPS:-2}"
SKIP_RLVR="${RLVR_BENCH_SKIP_RLVR:-0}" SKIP_TRL="${RLVR_BENCH_SKIP_TRL:-0}"

[[ -f "$GGUF" ]] || { echo "error: $GGUF not found (reference/make_gguf_fixtures.py downloads it)" >&2; exit 1; }
[[ -f "$(dirname "$GGUF")/tokenizer.json" ]] || { echo "error: no tokenizer.json beside $GGUF" >&2; exit 1; }
[[ -x "$PY" ]] || { echo "error: $PY not found; run reference/setup.sh or set RLVR_REFERENCE_VENV" >&2; exit 1; }
if [[ "$SKIP_RLVR" != 1 && ! -x "$RLVR_BIN" ]]; then
    echo "error: $RLVR_BIN not found; build it first (cargo build) or set RLVR_BIN" >&2
    exit 1
fi

RESULTS="$(mktemp -d)"
trap 'rm -rf "$RESULTS"' EXIT
ARGS=(--model "$GGUF" --group "$GROUP" --prompts "$PROMPTS" --max-tokens "$MAX_TOKENS" --rank "$RANK" --steps "$STEPS")
echo "# $(date -u +%FT%TZ) $(nproc) cores; settings: G $GROUP, $PROMPTS prompts, $MAX_TOKENS new tokens, rank $RANK, $STEPS step(s), $REPS repetitions" >&2

side() { # name command...
    local name="$1" rep="$2"
    shift 2
    echo "# $name, repetition $rep; load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    if "$@" >"$RESULTS/out" 2>"$RESULTS/err"; then
        tail -n 1 "$RESULTS/out" | tee "$RESULTS/$name.$rep.json"
    else
        echo "# $name failed:" >&2
        tail -n 5 "$RESULTS/err" >&2
    fi
    echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
}

for rep in $(seq 1 "$REPS"); do
    [[ "$SKIP_RLVR" == 1 ]] || side rlvr "$rep" "$RLVR_BIN" bench grpo "${ARGS[@]}"
    [[ "$SKIP_TRL" == 1 ]] || side trl "$rep" "$PY" benches/grpo_trl.py "${ARGS[@]}"
done

# ---- summary: the median of the repetitions of each side ----
"$PY" - "$RESULTS" <<'EOF'
import glob
import json
import os
import statistics
import sys

res = sys.argv[1]
sides = {}
for name in ("rlvr", "trl"):
    runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(res, f"{name}.*.json")))]
    if runs:
        sides[name] = runs
if not sides:
    sys.exit("no results")


def med(runs, key):
    return statistics.median(r[key] for r in runs)


print()
print("| implementation | step (s) | generation (s) | rewards (s) | training (s) | peak RSS (MiB) | runs |")
print("|---|---:|---:|---:|---:|---:|---:|")
for name, runs in sides.items():
    print(f"| {runs[0]['impl']} | {med(runs, 'step_s'):.1f} | {med(runs, 'gen_s'):.1f} | "
          f"{med(runs, 'reward_s'):.3f} | {med(runs, 'train_s'):.1f} | {max(r['peak_rss_mib'] for r in runs):.0f} | {len(runs)} |")
if len(sides) == 2:
    r, t = sides["rlvr"], sides["trl"]
    print()
    print(f"rlvr step / TRL step: {med(r, 'step_s') / med(t, 'step_s'):.2f} (target <= 0.5); "
          f"peak RSS rlvr / TRL: {max(x['peak_rss_mib'] for x in r) / max(x['peak_rss_mib'] for x in t):.2f} (target <= 1)")
    if sorted(r[0]["prompt_tokens"]) != sorted(t[0]["prompt_tokens"]):
        print(f"WARNING: the prompts differ in length: rlvr {r[0]['prompt_tokens']}, TRL {t[0]['prompt_tokens']}")
    else:
        print(f"prompt tokens (both): {r[0]['prompt_tokens']}")
    for name, runs in sides.items():
        lens = [s["completion_len"] for x in runs for s in x["per_step"]]
        print(f"{name} mean completion length: {sum(lens) / len(lens):.1f} tokens")
EOF
