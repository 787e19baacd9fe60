#!/usr/bin/env python3
"""GRPO benchmark, reference side: TRL GRPOTrainer + PEFT LoRA on gemma-3-270m, float32 on CPU.

The counterpart of `rlvr bench grpo`; benches/grpo.sh runs both side by side. Runs inside the
pinned reference venv (reference/setup.sh), never in CI:

    ~/.cache/rlvr/reference-venv/bin/python benches/grpo_trl.py \
        --model ~/.cache/rlvr/downloads/gemma-3-270m/gemma-3-270m-q4_k_m.gguf \
        --group 4 --prompts 2 --max-tokens 64 --rank 16 [--steps 1]

What it runs, matching `rlvr bench grpo`:
- the first --prompts questions of the MedQA test split under --data (the published jsonl), as
  the study writes them: its system prompt, then `question\\nAnswer Choices: (A) … (B) … `;
  TRL renders the conversation with the chat template of tokenizer_config.json (Gemma folds the
  system message into the user turn);
- the study's three rewards (accuracy 0/1/2, format soft + strict, xmlcount), the same rules
  as src/reward.rs;
- the model from the GGUF (transformers dequantizes every tensor to float32), the tokenizer
  from tokenizer.json + tokenizer_config.json beside it (or --tokenizer);
- PEFT LoRA rank r, alpha 2r, dropout 0, on q/k/v/o/gate/up/down of every layer;
- GRPOConfig: num_generations G, per_device_train_batch_size G, gradient_accumulation_steps P
  (one group per micro-batch, one generation batch of P × G completions per step),
  max_completion_length N, max_steps S, TRL's defaults otherwise (dapo loss, beta 0,
  temperature 1, top_k 0, top_p 1, group scaling, lr schedule linear) with lr 1e-5, bf16 off,
  use_cpu, and gradient checkpointing off (TRL's default is on; --gradient-checkpointing turns
  it on) so both sides compute the same forward and backward passes.

Timing: the step is the time from the trainer's on_step_begin to on_step_end callbacks (the
generation, the rewards, the forward and backward passes of every micro-batch, gradient
clipping and the optimizer step). Generation is the time inside GRPOTrainer's
`_generate_single_turn` (transformers' generate() with the live adapters), rewards the time
inside `_calculate_rewards`; training is the rest of the step. TRL's own `step_time` metric
(which leaves out the optimizer step) is reported as `trl_step_time`. peak_rss_mib is
ru_maxrss of the whole process (interpreter, imports, loading included).

On a GPU (scripts/gpu-check.sh): --model a Hugging Face directory, --device cuda --dtype bf16
(the weights loaded in bf16, TRL's bf16 mixed precision on); peak_gpu is torch's
max_memory_allocated / max_memory_reserved.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# src/prompt.rs STUDY_SYSTEM_PROMPT, verbatim (the study's spelling and missing spaces included).
SYSTEM_PROMPT = (
    "A conversation between user and assistant. The user asks a question, and the assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer.The reasoning process is to solve the problem step by "
    "step, so you will think about it sinceraly.The reasoning process and answer are enclosed "
    "within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think><answer> answer here </answer>"
)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def medqa_rows(data: Path, n: int) -> list[dict]:
    """The first n questions of the MedQA test split, as rlvr's `medqa` loader reads them."""
    candidates = [
        data / "US/4_options/phrases_no_exclude_test.jsonl",
        data / "4_options/phrases_no_exclude_test.jsonl",
        data / "phrases_no_exclude_test.jsonl",
        data / "test.jsonl",
    ]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise SystemExit(f"{data}: no MedQA test split ({', '.join(str(p) for p in candidates)})")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            letters = sorted(r["options"])
            choices = "".join(f"({k}) {r['options'][k]} " for k in letters)
            letter = r["answer_idx"].strip()
            rows.append(
                {
                    "prompt": [
                        {"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": f"{r['question']}\nAnswer Choices: {choices}"},
                    ],
                    "answer": letter,
                    "answer_text": r["options"][letter],
                }
            )
            if len(rows) == n:
                break
    if len(rows) < n:
        raise SystemExit(f"{path} has {len(rows)} questions, fewer than --prompts {n}")
    return rows


# ---- the study's rewards (Qsingle/open-medical-r1 src/open_r1/rewards.py; src/reward.rs) ----

def _text(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def accuracy(completions, answer, answer_text, **_) -> list[float]:
    out = []
    for c, letter, text in zip(completions, answer, answer_text, strict=True):
        m = re.search(r"<answer>(.*)</answer>", _text(c), re.DOTALL)
        if not m:
            out.append(0.0)
            continue
        got = m.group(1).strip()
        if got in (letter, f"({letter})"):
            out.append(2.0)
        elif got.lower().startswith(text.lower()):
            out.append(1.0)
        else:
            out.append(0.0)
    return out


def format_(completions, **_) -> list[float]:
    soft = r"<think>.*?</think>\s?<answer>.*?</answer>"
    strict = r"^<think>.*?</think>\s?<answer>.*?</answer>$"
    return [
        float(bool(re.match(soft, _text(c), re.DOTALL))) + float(bool(re.match(strict, _text(c), re.DOTALL)))
        for c in completions
    ]


def xmlcount(completions, **_) -> list[float]:
    tags = ("<think>", "</think>", "<answer>", "</answer>")
    return [0.25 * sum(_text(c).count(t) == 1 for t in tags) for c in completions]


format_.__name__ = "format"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="the .gguf file, or a Hugging Face directory")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: beside the model)")
    ap.add_argument("--data", type=Path, default=Path("data/samples/medqa"), help="a MedQA folder")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"], help="of the weights (a directory's)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default; off here by default")
    args = ap.parse_args()

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.manual_seed(0)
    gguf = args.model.resolve()
    model_dir = gguf if gguf.is_dir() else gguf.parent
    tok_dir = (args.tokenizer.resolve().parent if args.tokenizer else model_dir)
    rows = medqa_rows(args.data, args.prompts)
    cuda = args.device.startswith("cuda")

    t0 = time.perf_counter()
    if gguf.is_dir():
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        model = AutoModelForCausalLM.from_pretrained(str(gguf), dtype=dtype, attn_implementation="sdpa")
    else:
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation="sdpa"
        )
        # transformers marks a GGUF-loaded model as quantized (method "gguf") although every
        # weight is a dequantized float32 tensor, and the Trainer refuses to train such a
        # model: it is a plain float32 model, so drop the mark.
        assert all(p.dtype == torch.float32 for p in model.parameters())
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    load_s = time.perf_counter() - t0

    out_dir = Path(tempfile.mkdtemp(prefix="grpo-trl-"))
    config = GRPOConfig(
        output_dir=str(out_dir),
        num_generations=args.group,
        per_device_train_batch_size=args.group,
        gradient_accumulation_steps=args.prompts,
        max_completion_length=args.max_tokens,
        max_steps=args.steps,
        learning_rate=1e-5,
        bf16=args.dtype == "bf16",
        use_cpu=not cuda,
        gradient_checkpointing=args.gradient_checkpointing,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        seed=42,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[accuracy, format_, xmlcount],
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=peft_config,
    )

    steps: list[dict] = []
    current: dict = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                current[name] = current.get(name, 0.0) + time.perf_counter() - start

        return wrapper

    generate = trainer._generate_single_turn

    def generate_and_record(prompt_ids, *a, **k):
        completion_ids, logprobs = generate(prompt_ids, *a, **k)
        current["prompt_tokens"] = [len(p) for p in prompt_ids[:: args.group]]
        current["completion_len"] = sum(len(c) for c in completion_ids) / max(len(completion_ids), 1)
        return completion_ids, logprobs

    trainer._generate_single_turn = timed("gen_s", generate_and_record)
    trainer._calculate_rewards = timed("reward_s", trainer._calculate_rewards)

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            current.clear()
            current["start"] = time.perf_counter()

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            step_s = time.perf_counter() - current.pop("start")
            gen_s, reward_s = current.get("gen_s", 0.0), current.get("reward_s", 0.0)
            steps.append(
                {
                    "step_s": step_s,
                    "gen_s": gen_s,
                    "reward_s": reward_s,
                    "train_s": step_s - gen_s - reward_s,
                    "completion_len": current.get("completion_len", 0.0),
                    "prompt_tokens": current.get("prompt_tokens"),
                }
            )

    trl_step_time: list[float] = []

    class StepTimeLog(TrainerCallback):
        def on_log(self, *_, logs=None, **__):
            if logs and "step_time" in logs:
                trl_step_time.append(float(logs["step_time"]))

    trainer.add_callback(StepTimer())
    trainer.add_callback(StepTimeLog())
    trainer.train()
    shutil.rmtree(out_dir, ignore_errors=True)

    mean = lambda key: sum(s[key] for s in steps) / max(len(steps), 1)  # noqa: E731
    prompt_tokens = sorted({tuple(s["prompt_tokens"] or ()) for s in steps})
    line = {
        "impl": f"TRL {version('trl')} + transformers {version('transformers')} + peft {version('peft')} "
        f"+ torch {torch.__version__.split('+')[0]}",
        "group": args.group,
        "prompts": args.prompts,
        "max_tokens": args.max_tokens,
        "rank": args.rank,
        "steps": len(steps),
        # TRL draws the prompts in a seeded order: the lengths of one step, sorted
        "prompt_tokens": sorted(prompt_tokens[0]) if prompt_tokens else [],
        "load_s": load_s,
        "step_s": mean("step_s"),
        "gen_s": mean("gen_s"),
        "reward_s": mean("reward_s"),
        "train_s": mean("train_s"),
        "per_step": [{k: v for k, v in s.items() if k != "prompt_tokens"} for s in steps],
        "trl_step_time": trl_step_time,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "device": args.device,
        "dtype": args.dtype,
        "peak_gpu": {
            "used_mib": torch.cuda.max_memory_allocated() / 2**20,
            "reserved_mib": torch.cuda.max_memory_reserved() / 2**20,
        }
        if cuda
        else None,
        "threads": torch.get_num_threads(),
        "gradient_checkpointing": args.gradient_checkpointing,
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
