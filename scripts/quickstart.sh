#!/usr/bin/env bash
# README command 1: builds rlvr and runs scripts/quickstart.rhai on the defaults.
# Extra arguments reach the script, e.g. `scripts/quickstart.sh --set data=../data`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --locked --bin rlvr
"${CARGO_TARGET_DIR:-target}/debug/rlvr" run scripts/quickstart.rhai "$@"
