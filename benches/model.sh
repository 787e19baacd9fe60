#!/usr/bin/env bash
# Model benchmark: `rlvr bench model` against transformers (f32) + PEFT (benches/model_transformers.py)
# on gemma-3-270m (Q4_K_M GGUF), side by side, one process per measurement, never two at once.
#
# Usage: benches/model.sh [GGUF]
#   GGUF                 default: $HOME/.cache/rlvr/downloads/gemma-3-270m/gemma-3-270m-q4_k_m.gguf
#                        (tokenizer.json must sit beside it)
#   RLVR_BIN             rlvr binary (default: ${CARGO_TARGET_DIR:-target}/debug/rlvr)
#   RLVR_REFERENCE_VENV  pinned reference venv (default: $HOME/.cache/rlvr/reference-venv,
#                        made by reference/setup.sh)
#   RLVR_BENCH_IDS       token-id file written here (default: /tmp/rlvr-bench-ids.json)
#   RLVR_BENCH_TASKS     subset to run (default: "prefill decode1 decode8 lora")
#   RLVR_BENCH_SKIP_RLVR=1  run the transformers side only
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
GGUF="${1:-$HOME/.cache/rlvr/downloads/gemma-3-270m/gemma-3-270m-q4_k_m.gguf}"
GGUF="$(cd "$(dirname "$GGUF")" && pwd)/$(basename "$GGUF")"
cd "$ROOT"

RLVR_BIN="${RLVR_BIN:-${CARGO_TARGET_DIR:-target}/debug/rlvr}"
VENV="${RLVR_REFERENCE_VENV:-$HOME/.cache/rlvr/reference-venv}"
PY="$VENV/bin/python"
IDS="${RLVR_BENCH_IDS:-/tmp/rlvr-bench-ids.json}"
TASKS="${RLVR_BENCH_TASKS:-prefill decode1 decode8 lora}"
SKIP_RLVR="${RLVR_BENCH_SKIP_RLVR:-0}"

[[ -f "$GGUF" ]] || { echo "error: $GGUF not found (reference/make_gguf_fixtures.py downloads it)" >&2; exit 1; }
[[ -f "$(dirname "$GGUF")/tokenizer.json" ]] || { echo "error: no tokenizer.json beside $GGUF" >&2; exit 1; }
[[ -x "$PY" ]] || { echo "error: $PY not found; run reference/setup.sh or set RLVR_REFERENCE_VENV" >&2; exit 1; }
if [[ "$SKIP_RLVR" != 1 && ! -x "$RLVR_BIN" ]]; then
    echo "error: $RLVR_BIN not found; build it first (cargo build) or set RLVR_BIN" >&2
    exit 1
fi

RESULTS="$(mktemp -d)"
trap 'rm -rf "$RESULTS"' EXIT

# ---- the shared token ids: BOS + a fixed English medical paragraph, repeated, first N ids ----
"$PY" - "$(dirname "$GGUF")/tokenizer.json" "$IDS" "$RESULTS/prompt.txt" <<'EOF'
import json
import sys

from tokenizers import Tokenizer

PARAGRAPH = (
    "A 54-year-old man presents to the emergency department with crushing substernal chest pain "
    "that began two hours ago while he was shovelling snow. The pain radiates to his left arm and "
    "jaw and is accompanied by diaphoresis, nausea and shortness of breath. He has a history of "
    "hypertension, type 2 diabetes mellitus and hyperlipidaemia, and he has smoked one pack of "
    "cigarettes a day for thirty years. His blood pressure is 150/95 mm Hg, his pulse is 104 per "
    "minute and his oxygen saturation is 94% on room air. An electrocardiogram shows ST-segment "
    "elevation in leads II, III and aVF. Aspirin is given, and the cardiac catheterisation "
    "laboratory is activated for primary percutaneous coronary intervention. "
)
tok = Tokenizer.from_file(sys.argv[1])
enc = tok.encode(PARAGRAPH * 4, add_special_tokens=True)  # post-processor prepends <bos> (id 2)
ids = enc.ids
assert ids[0] == 2 and len(ids) >= 256, (ids[:3], len(ids))
with open(sys.argv[2], "w") as f:
    json.dump({"prompt_256": ids[:256], "prompt_16": ids[:16]}, f)
    f.write("\n")
with open(sys.argv[3], "w") as f:  # for llama-cli, which tokenizes text itself
    f.write(PARAGRAPH * 2)
print(f"# ids: {sys.argv[2]} (prompt_256: {len(ids[:256])} ids, prompt_16: {len(ids[:16])} ids)", file=sys.stderr)
EOF

# run NAME TASK-ARGS...: rlvr then transformers, each in its own process, sequentially.
run() {
    local name="$1"
    shift
    # Other CPU work (a cargo build) slows both sides badly; the load average is shown to spot it.
    echo "# $name: $* (load average before: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
    if [[ "$SKIP_RLVR" != 1 ]]; then
        if "$RLVR_BIN" bench model --model "$GGUF" --ids "$IDS" "$@" >"$RESULTS/out" 2>"$RESULTS/err"; then
            tail -n 1 "$RESULTS/out" | tee "$RESULTS/$name.rlvr.json"
        else
            echo "# rlvr bench model $* failed:" >&2
            tail -n 5 "$RESULTS/err" >&2
        fi
    fi
    if "$PY" benches/model_transformers.py --model "$GGUF" --ids "$IDS" "$@" >"$RESULTS/out" 2>"$RESULTS/err"; then
        tail -n 1 "$RESULTS/out" | tee "$RESULTS/$name.transformers.json"
    else
        echo "# model_transformers.py $* failed:" >&2
        tail -n 5 "$RESULTS/err" >&2
    fi
}

for t in $TASKS; do
    case "$t" in
        prefill) run prefill --task prefill --tokens 256 ;;
        decode1) run decode1 --task decode --batch 1 --tokens 128 ;;
        decode8) run decode8 --task decode --batch 8 --tokens 128 ;;
        lora) run lora --task lora --batch 4 --tokens 256 ;;
        *) echo "error: unknown task $t (prefill decode1 decode8 lora)" >&2; exit 1 ;;
    esac
done

# ---- llama.cpp: llama-cpp-python's low-level API (benches/model_llamacpp.py) ----
# Installed by benches/llamacpp_server.sh (the PyPI sdist compiles llama.cpp, 10-20 minutes).
LLAMA_PY="${RLVR_LLAMACPP_VENV:-$HOME/.cache/rlvr/llamacpp-venv}/bin/python"
if [[ -x "$LLAMA_PY" ]] && "$LLAMA_PY" -c 'import llama_cpp, numpy' 2>/dev/null; then
    for t in $TASKS; do
        case "$t" in
            prefill) args=(--task prefill) ;;
            decode1) args=(--task decode --batch 1 --tokens 128) ;;
            decode8) args=(--task decode --batch 8 --tokens 128) ;;
            *) continue ;;
        esac
        echo "# llama.cpp $t (load average before: $(cut -d' ' -f1-3 /proc/loadavg))" >&2
        if "$LLAMA_PY" benches/model_llamacpp.py --model "$GGUF" --ids "$IDS" "${args[@]}" \
            >"$RESULTS/out" 2>"$RESULTS/err"; then
            tail -n 1 "$RESULTS/out" | tee "$RESULTS/$t.llama.json"
        else
            echo "# model_llamacpp.py $t failed:" >&2
            tail -n 5 "$RESULTS/err" >&2
        fi
    done
else
    echo "# llama.cpp: no llama-cpp-python at $LLAMA_PY (benches/llamacpp_server.sh installs it); skipped" >&2
fi

# ---- summary table ----
"$PY" - "$RESULTS" $TASKS <<'EOF'
import json
import os
import sys

res_dir, tasks = sys.argv[1], sys.argv[2:]


def load(name, impl):
    path = os.path.join(res_dir, f"{name}.{impl}.json")
    return json.load(open(path)) if os.path.exists(path) else None


label = {"prefill": "prefill 1x256", "decode1": "decode b1 x128", "decode8": "decode b8 x128", "lora": "lora 4x256 fwd+bwd"}
impls = {}
print()
print("| task | metric | rlvr | transformers | ratio | rlvr peak RSS MiB | transformers peak RSS MiB |")
print("|---|---|---:|---:|---:|---:|---:|")
for t in tasks:
    r, h = load(t, "rlvr"), load(t, "transformers")
    for x in (r, h):
        if x:
            impls[x["impl"]] = x.get("threads")
    if t == "lora":
        metric, key = "seconds (lower is better)", "seconds"
        ratio = h[key] / r[key] if r and h and r[key] > 0 else None
    else:
        metric, key = "tokens/s (higher is better)", "tokens_per_s"
        ratio = r[key] / h[key] if r and h and h[key] > 0 else None
    fmt = (lambda v: f"{v:.3f}") if key == "seconds" else (lambda v: f"{v:.1f}")
    cell = lambda x: fmt(x[key]) if x else "n/a"
    rss = lambda x: f"{x['peak_rss_mib']:.0f}" if x and "peak_rss_mib" in x else "n/a"
    print(f"| {label.get(t, t)} | {metric} | {cell(r)} | {cell(h)} | "
          f"{f'{ratio:.2f}x' if ratio else 'n/a'} | {rss(r)} | {rss(h)} |")
print()
print("ratio = how many times faster rlvr is (rlvr tokens/s / transformers tokens/s; lora: "
      "transformers seconds / rlvr seconds).")
for t in ("prefill", "decode1", "decode8"):
    x, r = load(t, "llama"), load(t, "rlvr")
    if x:
        vs = f", rlvr / llama.cpp {r['tokens_per_s'] / x['tokens_per_s']:.2f}x" if r else ""
        print(f"llama.cpp {label[t]}: {x['tokens_per_s']:.1f} tokens/s, peak RSS "
              f"{x['peak_rss_mib']:.0f} MiB ({x['impl']}){vs}")
for t in ("decode1", "decode8"):
    r, x = load(t, "rlvr"), load(t, "llama")
    roof = r.get("roofline") if r else None
    if roof:
        line = (f"roofline {label[t]}: {roof['weight_bytes'] / 1e6:.0f} MB of weights per step, "
                f"copy {roof['copy_gb_s']:.1f} GB/s (read {roof['read_gb_s']:.1f} GB/s), "
                f"bound {roof['bound_tokens_per_s']:.1f} tokens/s; rlvr at {100 * roof['fraction']:.0f} %")
        if x:
            line += f", llama.cpp at {100 * x['tokens_per_s'] / roof['bound_tokens_per_s']:.0f} %"
        print(line)
for impl, threads in impls.items():
    print(f"- {impl}" + (f" ({threads} threads)" if threads else ""))
EOF
