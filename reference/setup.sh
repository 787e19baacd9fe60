#!/usr/bin/env bash
# Create (or update) the pinned reference venv.  Idempotent; run by hand, never in CI.
#   bash reference/setup.sh            # venv at $HOME/.cache/rlvr/reference-venv
#   RLVR_REFERENCE_VENV=/some/dir bash reference/setup.sh
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="${RLVR_REFERENCE_VENV:-$HOME/.cache/rlvr/reference-venv}"
req="$here/requirements.txt"
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$req" | cut -d' ' -f1)"

if [ ! -x "$venv/bin/python" ]; then
    mkdir -p "$(dirname "$venv")"
    python3 -m venv "$venv"
fi
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "reference venv up to date: $venv"
else
    "$venv/bin/python" -m pip install --disable-pip-version-check -r "$req"
    echo "$want" > "$stamp"
fi
"$venv/bin/python" - <<'PY'
from importlib.metadata import version
for name in ("torch", "transformers", "peft", "trl", "accelerate", "safetensors", "numpy", "gguf", "tokenizers", "lm_eval"):
    print(f"{name}=={version(name)}")
PY
echo "activate with: source $venv/bin/activate"
