#!/usr/bin/env bash
# Run on the GPU machine (H100/H200, Python with torch and transformers, no Rust, no
# internet) from the repository root, after scripts/build-cuda.sh has written gpu/bin/ here
# and it was carried over. Writes everything to $OUT (default gpu/out):
#   models/<name>/   random-weight Gemma 3 models of the published configs (270m, 1b, 4b, 12b
#                    text configs), weights made by transformers with seed 0, bf16
#   parity.jsonl     rlvr (cuda:0, bf16) vs transformers (cuda, bf16): logits and greedy tokens
#   decode.jsonl     decode tokens/s at batch 1, 8, 64, rlvr and transformers
#   lora.jsonl       one LoRA r16 forward+backward step, rlvr and transformers+PEFT
#   env.txt          torch, CUDA, GPU name, ldd of the binary
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu/out}"
mkdir -p "$OUT/models"
[ -x gpu/bin/rlvr ] || gunzip -c gpu/bin/rlvr.gz > gpu/bin/rlvr && chmod +x gpu/bin/rlvr
LIBS="$(python3 -c 'import glob, os, nvidia; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "**", "lib*.so*"), recursive=True)})))')"
export LD_LIBRARY_PATH="$PWD/gpu/bin:$LIBS:${LD_LIBRARY_PATH:-}"
{
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, torch.cuda.get_device_name(0))'
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  ldd gpu/bin/rlvr
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
MODELS="${MODELS:-270m 1b 4b}"
python3 scripts/gpu_check.py models --out "$OUT/models" --names $MODELS
for name in $MODELS; do
  dir="$OUT/models/gemma-3-$name"
  python3 scripts/gpu_check.py parity --model "$dir" --rlvr gpu/bin/rlvr >> "$OUT/parity.jsonl"
  for b in 1 8 64; do
    gpu/bin/rlvr bench model --model "$dir" --ids "$dir/ids.json" --task decode \
      --batch "$b" --tokens 128 --device cuda:0 --dtype bf16 >> "$OUT/decode.jsonl"
    python3 scripts/gpu_check.py decode --model "$dir" --batch "$b" --tokens 128 >> "$OUT/decode.jsonl"
  done
  gpu/bin/rlvr bench model --model "$dir" --ids "$dir/ids.json" --task lora --batch 8 \
    --device cuda:0 --dtype bf16 >> "$OUT/lora.jsonl"
  python3 scripts/gpu_check.py lora --model "$dir" --batch 8 >> "$OUT/lora.jsonl"
done
