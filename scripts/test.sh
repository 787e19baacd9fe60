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
# the library alone compiles no HTTP server and no ZeroMQ, and without its default `http`
# feature no hub client either; that build is lint-clean too
cargo clippy --locked -p rlvr --no-default-features --lib -- -D warnings
library_tree() { cargo tree --locked -p rlvr -e normal --prefix none "$@"; }
if library_tree | grep -E '^(tiny_http|zeromq|jupyter-zmq-client) ' ||
    library_tree --no-default-features | grep -E '^(hf-hub|tar) '; then
    echo "the library depends on the crates above" >&2
    exit 1
fi
cargo build --locked --bin rlvr
rlvr="${CARGO_TARGET_DIR:-target}/debug/rlvr"
"$rlvr" models fetch gemma-3-270m
"$rlvr" models fetch smollm2-135m-instruct
cargo test --locked --workspace
tests/kernel/run.sh
