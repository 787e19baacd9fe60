#!/usr/bin/env bash
# README command 1: builds rlvr, fetches the default model (gemma-3-270m, a no-op once it is
# in $RLVR_HOME/models) and runs scripts/quickstart.rhai on the defaults.
# Extra arguments reach the script, e.g. `scripts/quickstart.sh --set data=../data`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --bin rlvr
rlvr="${CARGO_TARGET_DIR:-target}/debug/rlvr"
"$rlvr" models fetch gemma-3-270m
"$rlvr" run scripts/quickstart.rhai "$@"
