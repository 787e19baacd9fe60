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

# ---- llama.cpp, if installed (not built here) ----
THREADS="$("$PY" -c 'import os; print(len(os.sched_getaffinity(0)))')"
if command -v llama-bench >/dev/null 2>&1; then
    echo "# llama-bench: pp256 / tg128, $THREADS threads, 3 repetitions (random token ids)" >&2
    if llama-bench -m "$GGUF" -p 256 -n 128 -t "$THREADS" -r 3 -o json >"$RESULTS/llama.out" 2>"$RESULTS/llama.err"; then
        "$PY" - "$RESULTS/llama.out" "$RESULTS" <<'EOF' || echo "# could not parse llama-bench output" >&2
import json
import sys

rows = json.load(open(sys.argv[1]))
for r in rows:
    name = "prefill" if r.get("n_prompt") and not r.get("n_gen") else "decode1"
    n = r["n_prompt"] if name == "prefill" else r["n_gen"]
    line = {"impl": f"llama.cpp {r.get('build_commit', '?')} (llama-bench, {r.get('model_type', '')})",
            "task": name, "tokens": n, "seconds": n / r["avg_ts"], "tokens_per_s": r["avg_ts"],
            "threads": r.get("n_threads")}
    print(json.dumps(line))
    open(f"{sys.argv[2]}/{name}.llama.json", "w").write(json.dumps(line) + "\n")
EOF
    else
        echo "# llama-bench failed:" >&2
        tail -n 5 "$RESULTS/llama.err" >&2
    fi
elif command -v llama-cli >/dev/null 2>&1; then
    echo "# llama-cli: prompt file + 128 new tokens, greedy, no EOS stop, $THREADS threads" >&2
    if llama-cli -m "$GGUF" -f "$RESULTS/prompt.txt" -n 128 --ignore-eos --temp 0 -no-cnv -t "$THREADS" \
        </dev/null >"$RESULTS/llama.out" 2>"$RESULTS/llama.err"; then
        "$PY" - "$RESULTS/llama.err" "$RESULTS" <<'EOF' || echo "# could not parse llama-cli timings" >&2
import json
import re
import sys

text = open(sys.argv[1], errors="replace").read()
found = 0
# llama_perf_context_print: prompt eval time = 812.3 ms / 256 tokens (...)
# llama_perf_context_print:        eval time = 4021.0 ms / 127 runs   (...)
for pat, name in ((r"prompt eval time\s*=\s*([\d.]+) ms\s*/\s*(\d+) tokens", "prefill"),
                  (r"(?<!prompt )eval time\s*=\s*([\d.]+) ms\s*/\s*(\d+) (?:runs|tokens)", "decode1")):
    m = re.findall(pat, text)
    if not m:
        continue
    ms, n = float(m[-1][0]), int(m[-1][1])
    line = {"impl": "llama.cpp (llama-cli)", "task": name, "tokens": n, "seconds": ms / 1000,
            "tokens_per_s": n / (ms / 1000)}
    print(json.dumps(line))
    open(f"{sys.argv[2]}/{name}.llama.json", "w").write(json.dumps(line) + "\n")
    found += 1
sys.exit(0 if found else 1)
EOF
    else
        echo "# llama-cli failed:" >&2
        tail -n 5 "$RESULTS/llama.err" >&2
    fi
else
    echo "# llama.cpp was not available (no llama-bench or llama-cli on PATH); skipped" >&2
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
for t in ("prefill", "decode1"):
    x = load(t, "llama")
    if x:
        print(f"llama.cpp {label[t]}: {x['tokens_per_s']:.1f} tokens/s ({x['tokens']} tokens, {x['impl']})")
for impl, threads in impls.items():
    print(f"- {impl}" + (f" ({threads} threads)" if threads else ""))
EOF
