#!/usr/bin/env python3
"""Model benchmark, reference side: gemma-3-270m with Hugging Face transformers (f32) + PEFT.

The counterpart of `rlvr bench model`; benches/model.sh runs both side by side. Runs inside the
pinned reference venv (reference/setup.sh), never in CI:

    ~/.cache/rlvr/reference-venv/bin/python benches/model_transformers.py \
        --model ~/.cache/rlvr/downloads/gemma-3-270m/gemma-3-270m-q4_k_m.gguf \
        --ids /tmp/rlvr-bench-ids.json --task prefill|decode|lora [--batch N] [--tokens N]

The GGUF is loaded the way reference/make_gguf_fixtures.py loads it: AutoModelForCausalLM with
gguf_file=..., every tensor dequantized to float32; attention is "sdpa" (the transformers
default). torch keeps its default thread count (reported as "threads").

Token ids come from the --ids file ({"prompt_256": [...], "prompt_16": [...]}, BOS first), which
benches/model.sh writes once so that both sides see the same ids.

Tasks (each prints ONE JSON line; "seconds" is time.perf_counter around the measured work only):
  prefill  one forward over prompt_256[:tokens] (batch 1, use_cache=False) computing the logits
           of the last position only (logits_to_keep=1, like rlvr), timed after one identical
           warm-up forward; seconds_all_logits times the same forward with all positions' logits.
  decode   greedy generate() of --tokens (128) new tokens for --batch copies of prompt_16, KV
           cache on, no EOS stop (min_new_tokens = max_new_tokens, eos_token_id=None); the time
           includes the prefill of the short prompt. One untimed warm-up generate() of 4 new
           tokens first (first-call allocator / oneDNN set-up, not model loading).
  lora     PEFT LoRA r=16, alpha=32, dropout 0 on q,k,v,o,gate,up,down of every layer; batch of
           --batch (4) copies of prompt_256[:tokens]; loss = -(sum over the batch of log p(t_i |
           t_<i) for i = 1..tokens-1) (cross-entropy, reduction="sum"); one forward+backward,
           timed after one identical warm-up step (grads cleared in between; no optimizer step).
peak_rss_mib is ru_maxrss of the whole process, so it includes the interpreter, the imports and
the float32 model (load_rss_mib is VmRSS right after loading, for reference).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTN = "sdpa"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def load_model(gguf: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, attn_implementation=ATTN
    )
    return model


def bench_prefill(model, ids: list[int]) -> dict:
    """Like `rlvr bench model --task prefill`: logits of the last position only
    (logits_to_keep=1, as generate() does for its prefill). The same forward with all 256
    positions' logits (the 262144-wide lm_head for every token) is timed too, for reference."""
    model.eval()
    x = torch.tensor([ids])

    def forward(keep: int) -> float:
        t0 = time.perf_counter()
        out = model(input_ids=x, use_cache=False, logits_to_keep=keep)
        seconds = time.perf_counter() - t0
        assert out.logits.shape == (1, keep or len(ids), model.config.vocab_size), out.logits.shape
        return seconds

    with torch.inference_mode():
        forward(1)  # warm-up
        seconds = forward(1)
        all_logits = forward(0)
    return {
        "task": "prefill",
        "batch": 1,
        "tokens": len(ids),
        "seconds": seconds,
        "tokens_per_s": len(ids) / seconds,
        "logits": "last position",
        "seconds_all_logits": all_logits,
    }


def bench_decode(model, prompt: list[int], batch: int, new_tokens: int) -> dict:
    model.eval()
    x = torch.tensor([prompt] * batch)
    mask = torch.ones_like(x)

    def generate(n: int):
        return model.generate(
            input_ids=x,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            eos_token_id=None,
            pad_token_id=0,
            use_cache=True,
        )

    with torch.inference_mode():
        generate(4)  # warm-up
        t0 = time.perf_counter()
        out = generate(new_tokens)
        seconds = time.perf_counter() - t0
    got = out.shape[1] - len(prompt)
    assert out.shape[0] == batch and got == new_tokens, (tuple(out.shape), got)
    return {
        "task": "decode",
        "batch": batch,
        "prompt_tokens": len(prompt),
        "new_tokens": new_tokens,
        "tokens": new_tokens,
        "seconds": seconds,
        "tokens_per_s": batch * new_tokens / seconds,
        "first_row_new_ids_head": out[0, len(prompt) : len(prompt) + 8].tolist(),
    }


def bench_lora(model, ids: list[int], batch: int) -> dict:
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, lora_dropout=0.0, bias="none")
    model = get_peft_model(model, cfg)
    model.train()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    x = torch.tensor([ids] * batch)

    def step() -> float:
        for p in model.parameters():
            p.grad = None
        logits = model(input_ids=x, use_cache=False).logits  # (B, T, V) float32
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
        )
        loss.backward()
        return loss.item()

    step()  # warm-up
    t0 = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - t0
    return {
        "task": "lora",
        "batch": batch,
        "tokens": len(ids),
        "rank": 16,
        "alpha": 32,
        "trainable_params": trainable,
        "loss": loss,
        "seconds": seconds,
        "tokens_per_s": batch * len(ids) / seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, type=Path, help="the .gguf file (tokenizer files beside it)")
    ap.add_argument("--ids", required=True, type=Path, help='JSON {"prompt_256": [...], "prompt_16": [...]}')
    ap.add_argument("--task", required=True, choices=["prefill", "decode", "lora"])
    ap.add_argument("--batch", type=int, help="decode: default 1; lora: default 4 (prefill: 1 only)")
    ap.add_argument("--tokens", type=int, help="prefill/lora: prompt length (default 256); decode: new tokens (128)")
    args = ap.parse_args()

    ids = json.loads(args.ids.read_text())
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = load_model(args.model.resolve())
    load_s = time.perf_counter() - t0
    load_rss = current_rss_mib()

    if args.task == "prefill":
        if args.batch not in (None, 1):
            sys.exit("prefill is batch 1 only")
        n = args.tokens or 256
        if n > len(ids["prompt_256"]):
            sys.exit(f"--tokens {n} > {len(ids['prompt_256'])} ids in prompt_256")
        res = bench_prefill(model, ids["prompt_256"][:n])
    elif args.task == "decode":
        res = bench_decode(model, ids["prompt_16"], args.batch or 1, args.tokens or 128)
    else:
        n = args.tokens or 256
        if n > len(ids["prompt_256"]):
            sys.exit(f"--tokens {n} > {len(ids['prompt_256'])} ids in prompt_256")
        res = bench_lora(model, ids["prompt_256"][:n], args.batch or 4)

    line = {
        "impl": f"transformers {version('transformers')} + torch {torch.__version__.split('+')[0]}",
        **res,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "load_rss_mib": round(load_rss, 1),
        "load_s": round(load_s, 3),
        "dtype": "float32",
        "attn_implementation": ATTN,
        "threads": torch.get_num_threads(),
    }
    if args.task == "lora":
        line["peft"] = version("peft")
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
