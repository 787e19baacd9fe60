#!/usr/bin/env bash
# The kernel's tests with a real Jupyter: installs the kernelspec with `rlvr kernel install
# --user` into a scratch Jupyter data folder and checks `jupyter kernelspec list` shows it, runs
# the conformance suite (jupyter_kernel_test + kernel_checks.py) against it, executes every
# examples/*.ipynb headless (nbclient) checking its tables and images, and opens a notebook in
# JupyterLab in headless Chromium (browser_check.py); the fault checks (test_faults.py: interrupts
# during long work, wrongly signed messages on every channel) run between the first two.
#
#   tests/kernel/run.sh [conformance|faults|notebooks|browser]...   (default: all four)
#
# Needs python3 with venv, and the rlvr binary built (`cargo build`; $CARGO_TARGET_DIR is
# honoured). The virtual environment (pinned requirements.txt) is kept in
# $HOME/.cache/rlvr/kernel-venv; Chromium comes from Debian's `chromium` package, installed
# with apt-get when missing. Artifacts (executed notebooks, images, the screenshot) go to
# tests/kernel/artifacts/ (ignored by git).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${KERNEL_TEST_VENV:-$HOME/.cache/rlvr/kernel-venv}"
RLVR="${RLVR_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/rlvr}"
REAL_RLVR_HOME="${RLVR_HOME:-$HOME/.cache/rlvr}"
ARTIFACTS="$HERE/artifacts"
STEPS=("$@")
[ ${#STEPS[@]} -gt 0 ] || STEPS=(conformance faults notebooks browser)

[ -x "$RLVR" ] || { echo "FAIL  no rlvr binary at $RLVR (run cargo build first)" >&2; exit 2; }

# shellcheck source=venv.sh
. "$HERE/venv.sh"
ensure_venv "$VENV" "$HERE/requirements.txt"

SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/rlvr-kernel-test.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$ARTIFACTS"

# The user's Jupyter folders, redirected into the scratch folder so nothing real is touched.
export XDG_DATA_HOME="$SCRATCH/data" JUPYTER_CONFIG_DIR="$SCRATCH/config" \
  JUPYTER_RUNTIME_DIR="$SCRATCH/runtime" IPYTHONDIR="$SCRATCH/ipython"
unset JUPYTER_DATA_DIR JUPYTER_PATH
export PATH="$VENV/bin:$PATH"
# A fresh $RLVR_HOME, so that the notebooks really evaluate and train (no cache of an earlier
# run) and the user's caches stay as they were; the fetched models are shared.
export RLVR_HOME="$SCRATCH/rlvr-home"
mkdir -p "$RLVR_HOME" && ln -s "$REAL_RLVR_HOME/models" "$RLVR_HOME/models"
"$RLVR" kernel install --user
"$VENV/bin/python" - <<'EOF'
import json, subprocess, sys
specs = json.loads(subprocess.run(["jupyter", "kernelspec", "list", "--json"], check=True,
                                  capture_output=True, text=True).stdout)["kernelspecs"]
rhai = specs.get("rhai")
if not rhai or rhai["spec"]["display_name"] != "Rhai (rlvr)":
    print(f"FAIL  `jupyter kernelspec list` does not show Rhai (rlvr): {sorted(specs)}")
    sys.exit(1)
print(f"PASS  jupyter kernelspec list: rhai \"Rhai (rlvr)\" in {rhai['resource_dir']}")
EOF
"$VENV/bin/python" "$HERE/preflight.py" rhai </dev/null

failed=0
for step in "${STEPS[@]}"; do
  case "$step" in
    conformance)
      echo "== conformance suite"
      (cd "$HERE" && KERNEL_NAME=rhai PYTHONPATH="$HERE" "$VENV/bin/python" -m pytest -v -rs \
        --tb=short -p no:cacheprovider --timeout="${KERNEL_TEST_PER_TEST_TIMEOUT:-120}" \
        test_rhai_kernel.py </dev/null) || failed=1 ;;
    faults)
      echo "== fault checks: interrupts during long work, wrongly signed messages"
      timings="$ARTIFACTS/interrupt_times.txt"
      rm -f "$timings"
      (cd "$HERE" && KERNEL_NAME=rhai KERNEL_TEST_TIMINGS="$timings" PYTHONPATH="$HERE" \
        "$VENV/bin/python" -m pytest -v -rs --tb=short -p no:cacheprovider \
        --timeout="${KERNEL_TEST_PER_TEST_TIMEOUT:-120}" test_faults.py </dev/null) || failed=1
      if [ -f "$timings" ]; then
        echo "seconds from the interrupt to the cell's reply:"
        sed 's/^/    /' "$timings"
      fi ;;
    notebooks)
      for nb in "$ROOT"/examples/*.ipynb; do
        name="$(basename "$nb" .ipynb)"
        echo "== notebook $name"
        "$VENV/bin/python" "$HERE/check_notebook.py" "$nb" --kernel rhai \
          --output "$ARTIFACTS/$name.ipynb" --save-images "$ARTIFACTS/$name" </dev/null || failed=1
      done
      # The check itself: it must fail the cells that do not show what they must.
      echo "== notebook check on unmet expectations (must fail cells 1, 2 and 3, pass cell 4)"
      out="$("$VENV/bin/python" "$HERE/check_notebook.py" "$HERE/data/unmet_expectations.ipynb" \
        --output "$SCRATCH/unmet_expectations.ipynb" \
        --kernel rhai </dev/null)" && status=0 || status=$?
      printf '%s\n' "$out" | sed 's/^/    /'
      if [ "$status" -eq 1 ] && [ "$(grep -c '^FAIL' <<<"$out")" -eq 3 ] \
        && grep -q '^FAIL  cell 1 shows html-table' <<<"$out" \
        && grep -q '^FAIL  cell 2 shows png' <<<"$out" \
        && grep -q '^FAIL  cell 3 shows stdout' <<<"$out" \
        && grep -q '^PASS  cell 4 shows html-table' <<<"$out"; then
        echo "PASS  check_notebook.py fails exactly the cells that miss their expectations"
      else
        echo "FAIL  check_notebook.py did not fail exactly cells 1, 2 and 3 (exit status $status)"
        failed=1
      fi ;;
    browser)
      echo "== JupyterLab in headless Chromium"
      if ! command -v chromium >/dev/null; then
        echo "installing Debian's chromium" >&2
        apt-get update -qq </dev/null && apt-get install -y -qq chromium </dev/null >/dev/null
      fi
      "$VENV/bin/python" "$HERE/browser_check.py" --root "$ROOT" \
        --notebook examples/explore_datasets.ipynb --screenshot "$ARTIFACTS/jupyterlab.png" \
        </dev/null || failed=1
      "$VENV/bin/python" "$HERE/browser_check.py" --root "$ROOT" \
        --notebook examples/per_category_accuracy.ipynb --images \
        --screenshot "$ARTIFACTS/jupyterlab-plots.png" </dev/null || failed=1 ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
exit "$failed"
