#!/usr/bin/env bash
# Kernel latency: the Rhai kernel beside ipykernel (benches/kernel.py), in one run.
#
# Usage: benches/kernel.sh [kernel.py arguments]
#   RLVR_BIN   rlvr binary (default: ${CARGO_TARGET_DIR:-target}/debug/rlvr)
# Uses the kernel tests' pinned venv ($HOME/.cache/rlvr/kernel-venv, from
# tests/kernel/requirements.txt, which has ipykernel); the Rhai kernelspec is installed into
# a scratch prefix for the run.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RLVR_BIN="${RLVR_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/rlvr}"
VENV="${KERNEL_TEST_VENV:-$HOME/.cache/rlvr/kernel-venv}"
[ -x "$RLVR_BIN" ] || { echo "error: $RLVR_BIN not found; run cargo build or set RLVR_BIN" >&2; exit 1; }

# shellcheck source=../tests/kernel/venv.sh
. "$ROOT/tests/kernel/venv.sh"
ensure_venv "$VENV" "$ROOT/tests/kernel/requirements.txt"

SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/rlvr-kernel-bench.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
"$RLVR_BIN" kernel install --prefix "$SCRATCH" >/dev/null
export JUPYTER_PATH="$SCRATCH/share/jupyter" JUPYTER_RUNTIME_DIR="$SCRATCH/runtime"
"$VENV/bin/python" "$ROOT/benches/kernel.py" "$@"
