#!/usr/bin/env bash
# README command 2: every check and every test — formatting, clippy with warnings as
# errors, then the unit and integration tests (which run `rlvr run` on test scripts).
# The integration tests also run the real default models: they are fetched first into
# $RLVR_HOME/models (a no-op when they are there already).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo build --locked --bin rlvr
rlvr="${CARGO_TARGET_DIR:-target}/debug/rlvr"
"$rlvr" models fetch gemma-3-270m
"$rlvr" models fetch smollm2-135m-instruct
cargo test --locked
