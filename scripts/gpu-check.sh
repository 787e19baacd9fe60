#!/usr/bin/env bash
# Run on the GPU machine (H100/H200, Python with torch, transformers and PEFT, no Rust, no
# internet) from the repository root, after scripts/build-cuda.sh has written gpu/ here and it
# was carried over (gpu/bin/rlvr.gz, gpu/bin/libcudart.so.13, gpu/tokenizer/*.gz).
#
#   scripts/gpu-check.sh [STAGE...]        the stages named, in order (default: all)
#
# Each stage makes the random-weight models it needs when they are missing (Gemma 3's
# published 270m/1b/4b/12b text configs, transformers, seed 0, bf16, into $MODEL_DIR, with
# Gemma's tokenizer), so a stage can run alone, one per call, within a 10-minute limit.
# Results go to $OUT (default gpu/out):
#   env       env.txt        torch, CUDA, GPU name, ldd of the binary
#   parity    parity.jsonl   rlvr (cuda:0, bf16) vs transformers (bf16): log-prob, greedy tokens
#   decode    decode.jsonl   decode tokens/s at batch 1, 8, 64, rlvr and transformers
#   lora      lora.jsonl     one LoRA r16 forward+backward, batch 8 × 256, rlvr and PEFT
#   grpo      grpo.jsonl     GRPO steps (G 8, the first 2 MedQA questions: 281 and 241 prompt
#                            tokens, 512 new tokens, LoRA r16 on every linear layer), rlvr
#                            `bench grpo` vs the transformers + PEFT loop of gpu_check.py, and
#                            TRL's GRPOTrainer when importable; time and peak GPU memory
#   grpo12b   grpo12b.jsonl  peak GPU memory of one GRPO step of the 12b config at the study's
#                            preset (open-medical-r1: G 3, micro-batch 3, 4 prompts, 512 new
#                            tokens, β 0.04), and whether it fits a 24 GiB card
# Settings: MODELS (parity/decode/lora; default "270m 1b 4b"), GRPO_MODELS (default "1b 4b"),
# STEPS (GRPO steps per run, default 2: the first includes the kernels' warm-up), TRL (0: leave
# TRL out), MODEL_DIR (default gpu/models), QUICK=1 (a smoke run of every stage but grpo12b
# on the 270m config: 64 new tokens, 1 step, batch 1 decode, no TRL). DEVICE and DTYPE
# (default cuda:0, bf16) place the grpo and grpo12b runs and where models are made:
# DEVICE=cpu DTYPE=f32 GRPO_MODELS=tiny checks the grpo stage on a CPU.
# A command that fails leaves a {"failed": …} line in its file; the script goes on and exits 1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu/out}"
MODEL_DIR="${MODEL_DIR:-gpu/models}"
QUICK="${QUICK:-0}"
DEVICE="${DEVICE:-cuda:0}" DTYPE="${DTYPE:-bf16}"
if [ "$QUICK" = 1 ]; then
  MODELS="${MODELS:-270m}" GRPO_MODELS="${GRPO_MODELS:-270m}" STEPS="${STEPS:-1}" TRL="${TRL:-0}"
  NEW_TOKENS=64 BATCHES="1"
else
  MODELS="${MODELS:-270m 1b 4b}" GRPO_MODELS="${GRPO_MODELS:-1b 4b}" STEPS="${STEPS:-2}" TRL="${TRL:-1}"
  NEW_TOKENS=512 BATCHES="1 8 64"
fi
STAGES="${*:-env parity decode lora grpo grpo12b}"
mkdir -p "$OUT" "$MODEL_DIR"
status=0

# the binary, the tokenizer, and the CUDA libraries of torch's nvidia-* wheels
if [ ! -x gpu/bin/rlvr ]; then
  gunzip -c gpu/bin/rlvr.gz > gpu/bin/rlvr.part && mv gpu/bin/rlvr.part gpu/bin/rlvr
  chmod +x gpu/bin/rlvr
fi
for f in gpu/tokenizer/*.gz; do
  [ -e "$f" ] && [ ! -e "${f%.gz}" ] && gunzip -k "$f"
done
LIBS="$(python3 -c 'import glob, os, nvidia; print(":".join(sorted({os.path.dirname(p) for d in nvidia.__path__ for p in glob.glob(os.path.join(d, "**", "lib*.so*"), recursive=True)})))')"
export LD_LIBRARY_PATH="$PWD/gpu/bin:$LIBS:${LD_LIBRARY_PATH:-}"
RLVR="$PWD/gpu/bin/rlvr"
CHECK=(python3 scripts/gpu_check.py)

# run "$@" with stdout appended to file $1; on failure, a {"failed": …} line instead
record() {
  local file="$1"
  shift
  echo "# $(date -u +%T) $*" >&2
  if ! "$@" >> "$file"; then
    python3 -c 'import json, sys; print(json.dumps({"failed": sys.argv[1:]}))' "$@" >> "$file"
    status=1
  fi
}
models() { "${CHECK[@]}" models --out "$MODEL_DIR" --device "$DEVICE" --names "$@" || status=1; }

for stage in $STAGES; do
  case "$stage" in
  env)
    {
      python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__, torch.cuda.get_device_name(0))'
      python3 -c 'import peft; print("peft", peft.__version__)'
      python3 -c 'import trl; print("trl", trl.__version__)' || echo "no trl"
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      ldd gpu/bin/rlvr
    } > "$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
    ;;
  parity)
    models $MODELS
    for name in $MODELS; do
      record "$OUT/parity.jsonl" "${CHECK[@]}" parity --model "$MODEL_DIR/gemma-3-$name" --rlvr "$RLVR"
    done
    ;;
  decode)
    models $MODELS
    for name in $MODELS; do
      dir="$MODEL_DIR/gemma-3-$name"
      for b in $BATCHES; do
        record "$OUT/decode.jsonl" "$RLVR" bench model --model "$dir" --ids "$dir/ids.json" \
          --task decode --batch "$b" --tokens 128 --device cuda:0 --dtype bf16
        record "$OUT/decode.jsonl" "${CHECK[@]}" decode --model "$dir" --batch "$b" --tokens 128
      done
    done
    ;;
  lora)
    models $MODELS
    for name in $MODELS; do
      dir="$MODEL_DIR/gemma-3-$name"
      record "$OUT/lora.jsonl" "$RLVR" bench model --model "$dir" --ids "$dir/ids.json" \
        --task lora --batch 8 --device cuda:0 --dtype bf16
      record "$OUT/lora.jsonl" "${CHECK[@]}" lora --model "$dir" --batch 8
    done
    ;;
  grpo)
    models $GRPO_MODELS
    sizes=(--group 8 --prompts 2 --max-tokens "$NEW_TOKENS" --rank 16 --steps "$STEPS")
    for name in $GRPO_MODELS; do
      dir="$MODEL_DIR/gemma-3-$name"
      record "$OUT/grpo.jsonl" "${CHECK[@]}" sampled -- "$RLVR" bench grpo --model "$dir" \
        "${sizes[@]}" --device "$DEVICE" --dtype "$DTYPE"
      record "$OUT/grpo.jsonl" "${CHECK[@]}" grpo --model "$dir" "${sizes[@]}" \
        --device "$DEVICE" --dtype "$DTYPE"
      if [ "$TRL" != 0 ] && python3 -c 'import trl' 2>/dev/null; then
        record "$OUT/grpo.jsonl" "${CHECK[@]}" sampled -- python3 benches/grpo_trl.py --model "$dir" \
          "${sizes[@]}" --device "$DEVICE" --dtype "$DTYPE"
      fi
    done
    ;;
  grpo12b)
    models 12b
    record "$OUT/grpo12b.jsonl" "${CHECK[@]}" sampled --fits-gib 24 -- "$RLVR" bench grpo \
      --model "$MODEL_DIR/gemma-3-12b" --preset open-medical-r1 --group 3 --prompts 4 \
      --max-tokens 512 --rank 16 --steps 1 --device "$DEVICE" --dtype "$DTYPE"
    ;;
  *)
    echo "unknown stage \`$stage\`; stages: env parity decode lora grpo grpo12b" >&2
    exit 2
    ;;
  esac
done
exit "$status"
