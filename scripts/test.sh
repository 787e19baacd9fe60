#!/usr/bin/env bash
# README command 2: every check and every test — formatting, clippy with warnings as
# errors, the unit and integration tests (which run `rlvr run` on test scripts), then the
# Jupyter kernel with a real Jupyter: the conformance suite, the example notebooks and
# JupyterLab in headless Chromium (tests/kernel/run.sh; its own venv, cached in ~/.cache/rlvr).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked
cargo build --locked --bin rlvr
tests/kernel/run.sh
