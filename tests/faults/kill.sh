#!/usr/bin/env bash
# Fault campaign, part 1: kill at random points.
#
# For each engine (judge, grpo, eval) it runs tests/faults/<engine>.rhai once uninterrupted,
# then RUNS times (20 by default): a run killed with SIGKILL at a random time within the
# uninterrupted run's duration, then the same command rerun to the end. Every final output
# (Judged table; adapter, metrics and completions; Results table) must be byte-identical to
# the uninterrupted run's. At each kill it reads the run's files to measure the work lost:
#   recorded  units (responses, steps, items) finished and written when the kill came
#   kept      units the rerun starts from (cache lines; the checkpoint's step)
#   redone    recorded - kept: finished units the rerun computes again
#   lost_s    seconds between the last write and the kill: the in-flight batch or step
#             (or model loading, before the first write) thrown away
# and prints one line per kill and a summary table (the one in RELIABILITY.md).
#
# Usage: tests/faults/kill.sh [RUNS]   (RLVR=path/to/rlvr, default
# $CARGO_TARGET_DIR/debug/rlvr, else target/debug/rlvr). Run by hand, not in CI; the
# integration tests in tests/integration/faults.rs are its short variant (2 kills per engine).
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-20}
RLVR=${RLVR:-${CARGO_TARGET_DIR:-target}/debug/rlvr}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rlvr-kill.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
[ -x "$RLVR" ] || { echo "no rlvr binary at $RLVR (cargo build first, or set RLVR)" >&2; exit 2; }

now() { date +%s.%N; }

# The engine's files that record finished work, under RLVR_HOME $1.
progress_files() {
    case $2 in
        judge) ls "$1"/cache/judge/*.jsonl 2>/dev/null || true ;;
        eval) ls "$1"/cache/eval/*.jsonl 2>/dev/null || true ;;
        grpo) ls "$1"/cache/grpo/*/metrics.jsonl 2>/dev/null || true ;;
    esac
}

# "recorded kept last_write" of the run under RLVR_HOME $1 for engine $2.
measure() {
    python3 - "$1" "$2" <<'PY'
import glob, json, os, sys
home, engine = sys.argv[1], sys.argv[2]
def whole_lines(path):
    n = 0
    for line in open(path, encoding="utf-8", errors="replace"):
        try:
            json.loads(line)
            n += 1
        except ValueError:
            pass
    return n
pattern = {"judge": "cache/judge/*.jsonl", "eval": "cache/eval/*.jsonl",
           "grpo": "cache/grpo/*/metrics.jsonl"}[engine]
files = glob.glob(os.path.join(home, pattern))
recorded = sum(whole_lines(f) for f in files)
last = max([os.stat(f).st_mtime for f in files], default=0.0)
if engine == "grpo":
    kept = 0
    for run in glob.glob(os.path.join(home, "cache/grpo/*")):
        for ckpt in ("checkpoint", "checkpoint.old"):
            state = os.path.join(run, ckpt, "state.json")
            if os.path.exists(state):
                kept = json.load(open(state))["step"]
                last = max(last, os.stat(state).st_mtime)
                break
else:
    kept = recorded
print(recorded, kept, last)
PY
}

outputs() {
    case $1 in
        judge) echo judged.json ;;
        eval) echo results.json ;;
        grpo) echo adapter/adapter_model.safetensors metrics.json completions.json ;;
    esac
}

run_script() { # engine home
    RLVR_HOME="$2" "$RLVR" --quiet run "tests/faults/$1.rhai" --set "out=$2/out" >"$2/log" 2>&1
}

SUMMARY="$WORK/summary"
: >"$SUMMARY"
for engine in judge grpo eval; do
    whole="$WORK/$engine-whole"
    mkdir -p "$whole"
    start=$(now)
    run_script "$engine" "$whole" || { cat "$whole/log" >&2; exit 1; }
    duration=$(echo "$(now) - $start" | bc)
    echo "== $engine: uninterrupted run ${duration} s"
    identical=0 max_redone=0 max_lost=0 sum_lost=0 mid=0
    for i in $(seq 1 "$RUNS"); do
        home="$WORK/$engine-$i"
        mkdir -p "$home"
        # a random time within the uninterrupted run's duration
        delay=$(python3 -c "import random; print(round(random.uniform(0.05, $duration), 3))")
        started=$(now)
        RLVR_HOME="$home" "$RLVR" --quiet run "tests/faults/$engine.rhai" --set "out=$home/out" \
            >"$home/log" 2>&1 &
        pid=$!
        sleep "$delay"
        killed_at=$(now)
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        read -r recorded kept last <<<"$(measure "$home" "$engine")"
        redone=$((recorded - kept))
        if [ "$(echo "$last > 0" | bc)" = 1 ]; then
            lost=$(echo "$killed_at - $last" | bc)
        else
            lost=$(echo "$killed_at - $started" | bc)
        fi
        finished_before=no
        [ -e "$home/out/$(outputs "$engine" | cut -d' ' -f1)" ] && finished_before=yes
        [ "$finished_before" = no ] && [ "$recorded" -gt 0 ] && mid=$((mid + 1))
        run_script "$engine" "$home" || { cat "$home/log" >&2; exit 1; }
        same=yes
        for f in $(outputs "$engine"); do
            cmp -s "$whole/out/$f" "$home/out/$f" || same=no
        done
        [ "$same" = yes ] && identical=$((identical + 1))
        [ "$redone" -gt "$max_redone" ] && max_redone=$redone
        if [ "$finished_before" = no ]; then
            [ "$(echo "$lost > $max_lost" | bc)" = 1 ] && max_lost=$lost
            sum_lost=$(echo "$sum_lost + $lost" | bc)
        fi
        printf '%s kill %2d at %6.2f s: recorded %2d kept %2d redone %d lost %5.2f s finished-before-kill %s identical %s\n' \
            "$engine" "$i" "$delay" "$recorded" "$kept" "$redone" "$lost" "$finished_before" "$same"
    done
    printf '| %s | %s | %d | %d | %d | %.2f | %d / %d |\n' "$engine" "$duration" "$RUNS" "$mid" \
        "$max_redone" "$max_lost" "$identical" "$RUNS" >>"$SUMMARY"
    [ "$identical" = "$RUNS" ] || FAILED=1
done
echo
echo "| engine | uninterrupted (s) | kills | kills mid-work | finished units redone (max) | in-flight work lost (max s) | final outputs identical |"
echo "|---|---|---|---|---|---|---|"
cat "$SUMMARY"
[ -z "${FAILED:-}" ]
