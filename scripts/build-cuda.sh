#!/usr/bin/env bash
# Builds the rlvr binary for NVIDIA GPUs (H100/H200, compute capability 9.0) on a machine
# without a GPU, and writes it with libcudart into gpu/bin/ (git-ignored), gzipped for
# carrying, and Gemma 3's tokenizer into gpu/tokenizer/ (carry gpu/bin/rlvr.gz,
# gpu/bin/libcudart.so.13 and gpu/tokenizer/: 59 MiB, under the 64 MiB a carry allows). CUDA 13.0's nvcc comes from PyPI; cudarc loads the driver, cuBLAS and cuRAND at
# run time (a patched copy of candle-core switches it from dynamic linking to dynamic
# loading, for this build only). Its own target dir keeps the default build untouched.
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_PREFIX="${CUDA_PREFIX:-$HOME/.cache/rlvr/cuda-13.0}"
export CARGO_TARGET_DIR="${CUDA_TARGET_DIR:-$HOME/.cache/rlvr-target-cuda-build}"
PATCH_DIR="$CARGO_TARGET_DIR/gpu-patch"

if [ ! -x "$CUDA_PREFIX/nvidia/cu13/bin/nvcc" ]; then
  python3 -m pip install --no-deps --target "$CUDA_PREFIX" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85
fi
CUDA_ROOT="$CUDA_PREFIX/nvidia/cu13"
ln -sf libcudart.so.13 "$CUDA_ROOT/lib/libcudart.so"

if [ ! -d "$PATCH_DIR/candle-core" ]; then
  mkdir -p "$PATCH_DIR"
  src="$(dirname "$(cargo metadata --format-version 1 | python3 -c \
    'import json,sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"]=="candle-core"))')")"
  cp -r "$src" "$PATCH_DIR/candle-core"
  sed -i 's/"dynamic-linking",/"dynamic-loading",/' "$PATCH_DIR/candle-core/Cargo.toml"
fi

export CUDA_HOME="$CUDA_ROOT" CUDA_PATH="$CUDA_ROOT" PATH="$CUDA_ROOT/bin:$PATH"
export CUDA_COMPUTE_CAP=90 LIBRARY_PATH="$CUDA_ROOT/lib" CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-2}"
cp Cargo.lock "$PATCH_DIR/Cargo.lock.keep"
restore() { cp "$PATCH_DIR/Cargo.lock.keep" Cargo.lock; }
trap restore EXIT
cargo build -p rlvr-cli --features cuda --bin rlvr \
  --config "patch.crates-io.candle-core.path=\"$PATCH_DIR/candle-core\""

mkdir -p gpu/bin
strip -o gpu/bin/rlvr "$CARGO_TARGET_DIR/debug/rlvr"
cp "$CUDA_ROOT/lib/libcudart.so.13" gpu/bin/
gzip -6 -c gpu/bin/rlvr > gpu/bin/rlvr.gz

# Gemma 3's tokenizer, for the random-weight models scripts/gpu-check.sh makes there
# (`rlvr models fetch gemma-3-270m` installs it here; gzipped, 5.6 MB instead of 34 MB)
TOKENIZER_DIR="${GEMMA_TOKENIZER_DIR:-${RLVR_HOME:-$HOME/.cache/rlvr}/models/gemma-3-270m}"
if [ -f "$TOKENIZER_DIR/tokenizer.json" ]; then
  mkdir -p gpu/tokenizer
  for f in tokenizer.json tokenizer_config.json; do
    gzip -6 -c "$TOKENIZER_DIR/$f" > "gpu/tokenizer/$f.gz"
  done
else
  echo "note: no Gemma tokenizer in $TOKENIZER_DIR (rlvr models fetch gemma-3-270m);" \
    "the GPU check's models will use the 512-token test tokenizer" >&2
fi
ls -l gpu/bin gpu/tokenizer
