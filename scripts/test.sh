#!/usr/bin/env bash
# README command 2: every check and every test — formatting, clippy with warnings as
# errors, then the unit and integration tests (which run `rlvr run` on test scripts).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked
