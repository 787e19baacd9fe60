#!/usr/bin/env bash
# Loading benchmark: `rlvr bench load` against the pandas reference (benches/load_pandas.py).
#
# Usage: benches/load.sh [DIR]
#   DIR            folder holding the full mmlu/, cmmlu/ and mmlu_pro/ in their published
#                  layouts (see data/README.md); required
#   RLVR_BIN       rlvr binary (default: ${CARGO_TARGET_DIR:-target}/debug/rlvr, the
#                  profile the tests use)
#   RLVR_BENCH_VENV  venv for pandas (default: $HOME/.cache/rlvr/bench-venv),
#                  created from benches/requirements.txt on first use
#   PYTHON         interpreter used to create the venv (default: python3, needs >= 3.11)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ $# -lt 1 ]]; then
    echo "usage: benches/load.sh DIR  (DIR holds the full mmlu/, cmmlu/, mmlu_pro/; see data/README.md)" >&2
    exit 2
fi
DIR="$(cd "$1" && pwd)"
cd "$ROOT"

RLVR_BIN="${RLVR_BIN:-${CARGO_TARGET_DIR:-target}/debug/rlvr}"
VENV="${RLVR_BENCH_VENV:-$HOME/.cache/rlvr/bench-venv}"
REQUIREMENTS="benches/requirements.txt"
RUNS=3

if [[ ! -x "$RLVR_BIN" ]]; then
    echo "error: $RLVR_BIN not found; build it first (cargo build) or set RLVR_BIN" >&2
    exit 1
fi

# Create the venv, or refresh it when requirements.txt changed since the last install.
if [[ ! -x "$VENV/bin/python3" ]]; then
    echo "creating venv $VENV" >&2
    "${PYTHON:-python3}" -m venv "$VENV"
fi
if ! cmp -s "$REQUIREMENTS" "$VENV/requirements.installed"; then
    echo "installing $REQUIREMENTS into $VENV" >&2
    "$VENV/bin/python3" -m pip install --quiet --disable-pip-version-check -r "$REQUIREMENTS"
    cp "$REQUIREMENTS" "$VENV/requirements.installed"
fi
PY="$VENV/bin/python3"

RESULTS="$(mktemp -d)"
trap 'rm -rf "$RESULTS"' EXIT

for i in $(seq 1 "$RUNS"); do
    echo "# run $i/$RUNS" >&2
    "$RLVR_BIN" bench load --data "$DIR" | tail -n 1 | tee -a "$RESULTS/rlvr.jsonl"
    "$PY" benches/load_pandas.py --data "$DIR" | tail -n 1 | tee -a "$RESULTS/pandas.jsonl"
done

"$PY" - "$RESULTS/rlvr.jsonl" "$RESULTS/pandas.jsonl" <<'EOF'
import json
import statistics
import sys


def summarise(path):
    runs = [json.loads(line) for line in open(path) if line.strip()]
    return {
        "impl": runs[0].get("impl", "?"),
        "median_wall_s": statistics.median(run["wall_s"] for run in runs),
        "max_peak_rss_mib": max(run["peak_rss_mib"] for run in runs),
    }


rlvr = summarise(sys.argv[1])
pandas = summarise(sys.argv[2])
print()
print(f"{'impl':<24} {'median wall_s':>14} {'max peak_rss_mib':>17}")
for row in (rlvr, pandas):
    print(f"{row['impl']:<24} {row['median_wall_s']:>14.4f} {row['max_peak_rss_mib']:>17.1f}")
if rlvr["median_wall_s"] > 0:
    ratio = pandas["median_wall_s"] / rlvr["median_wall_s"]
    print(f"speed ratio pandas/rlvr (median wall_s): {ratio:.2f}x")
else:
    print("speed ratio pandas/rlvr: n/a (rlvr wall_s is 0)")
EOF
