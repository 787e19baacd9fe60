#!/usr/bin/env bash
# README command 2: every check and every test — formatting, clippy with warnings as
# errors, the unit and integration tests (which run `rlvr run` on test scripts and the real
# default models, fetched first into $RLVR_HOME/models: a no-op when they are there already),
# then the Jupyter kernel with a real Jupyter: the conformance suite, the example notebooks and
# JupyterLab in headless Chromium (tests/kernel/run.sh; its own venv, cached in ~/.cache/rlvr).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --locked --workspace --all-targets -- -D warnings
cargo build --locked --bin rlvr
rlvr="${CARGO_TARGET_DIR:-target}/debug/rlvr"
"$rlvr" models fetch gemma-3-270m
"$rlvr" models fetch smollm2-135m-instruct
cargo test --locked --workspace
tests/kernel/run.sh
