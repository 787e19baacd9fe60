#!/usr/bin/env bash
# The endpoint client against llama.cpp's OpenAI-compatible server (PyPI llama-cpp-python
# [server], built for the CPU) and against `rlvr serve`, both serving the same GGUF, with the
# same client script (benches/endpoint_client.rhai): chat with n samples and a seed, the seed
# again, plain completions. Run by hand, never in CI.
#
# Usage: benches/llamacpp_server.sh [GGUF]
#   GGUF                default: $RLVR_HOME/models/gemma-3-270m/*.gguf when fetched, else
#                       $HOME/.cache/rlvr/downloads/gemma-3-270m/gemma-3-270m-q4_k_m.gguf
#                       (tokenizer.json beside it, for rlvr serve)
#   RLVR_BIN            rlvr binary (default: ${CARGO_TARGET_DIR:-target}/debug/rlvr)
#   RLVR_LLAMACPP_VENV  the venv (default: $HOME/.cache/rlvr/llamacpp-venv); made from
#                       benches/llamacpp-requirements.txt on first use, which compiles
#                       llama.cpp from the sdist (10-20 minutes on 2 cores)
#   LLAMACPP_CHAT_FORMAT  llama-cpp-python's chat format (default: gemma; the GGUF carries no
#                       chat template, and without one the server falls back to llama-2's)
#   RLVR_SKIP_RLVR=1    measure llama.cpp only
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
RLVR_HOME="${RLVR_HOME:-$HOME/.cache/rlvr}"
DEFAULT_GGUF="$(ls "$RLVR_HOME"/models/gemma-3-270m/*.gguf 2>/dev/null | head -n 1 || true)"
DEFAULT_GGUF="${DEFAULT_GGUF:-$HOME/.cache/rlvr/downloads/gemma-3-270m/gemma-3-270m-q4_k_m.gguf}"
GGUF="${1:-$DEFAULT_GGUF}"
RLVR_BIN="${RLVR_BIN:-${CARGO_TARGET_DIR:-target}/debug/rlvr}"
VENV="${RLVR_LLAMACPP_VENV:-$HOME/.cache/rlvr/llamacpp-venv}"
REQUIREMENTS="benches/llamacpp-requirements.txt"

[[ -f "$GGUF" ]] || { echo "error: $GGUF not found (rlvr models fetch gemma-3-270m)" >&2; exit 1; }
[[ -x "$RLVR_BIN" ]] || { echo "error: $RLVR_BIN not found; cargo build first or set RLVR_BIN" >&2; exit 1; }

# ---- the venv: rebuilt only when the requirements change ----
STAMP="$VENV/.requirements.sha256"
WANT="$(sha256sum "$REQUIREMENTS" | cut -d' ' -f1)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$WANT" ]]; then
    echo "building $VENV (compiles llama.cpp; 10-20 minutes)" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --upgrade pip
    # A portable CPU build: no GPU backends, no network fetches, no tests or examples.
    CMAKE_ARGS="-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
        CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
        "$VENV/bin/pip" install --no-cache-dir -r "$REQUIREMENTS"
    echo "$WANT" > "$STAMP"
fi
LLAMA_VERSION="$("$VENV/bin/python" -c 'import llama_cpp; print(llama_cpp.__version__)')"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() { # url pid
    for _ in $(seq 1 600); do
        if curl -sf "$1/models" >/dev/null 2>&1; then return 0; fi
        kill -0 "$2" 2>/dev/null || { echo "error: the server exited" >&2; return 1; }
        sleep 0.5
    done
    echo "error: no server at $1 after 300 s" >&2
    return 1
}

SERVER_PID=""
trap '[[ -n "$SERVER_PID" ]] && kill "$SERVER_PID" 2>/dev/null; true' EXIT
echo "# $(date -u +%FT%TZ) $(uname -m), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg); $GGUF"

# ---- llama.cpp ----
PORT="$(free_port)"
URL="http://127.0.0.1:$PORT/v1"
"$VENV/bin/python" -m llama_cpp.server --model "$GGUF" --model_alias gemma-3-270m \
    --chat_format "${LLAMACPP_CHAT_FORMAT:-gemma}" \
    --host 127.0.0.1 --port "$PORT" --n_ctx 2048 --n_threads "$(nproc)" \
    > /tmp/rlvr-llamacpp-server.log 2>&1 &
SERVER_PID=$!
wait_for "$URL" "$SERVER_PID"
"$RLVR_BIN" run benches/endpoint_client.rhai --set "url=$URL" --set model=gemma-3-270m \
    --set "label=llama-cpp-python $LLAMA_VERSION"
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=""

# ---- rlvr serve on the same file ----
if [[ "${RLVR_SKIP_RLVR:-0}" != 1 ]]; then
    PORT="$(free_port)"
    URL="http://127.0.0.1:$PORT/v1"
    "$RLVR_BIN" serve --model "$GGUF" --served-model-name gemma-3-270m --port "$PORT" \
        > /tmp/rlvr-serve.log 2>&1 &
    SERVER_PID=$!
    wait_for "$URL" "$SERVER_PID"
    "$RLVR_BIN" run benches/endpoint_client.rhai --set "url=$URL" --set model=gemma-3-270m \
        --set "label=rlvr serve $("$RLVR_BIN" --version | cut -d' ' -f2)"
fi
