#!/usr/bin/env python3
"""Write the GRPO loss fixtures under tests/fixtures/grpo/ with TRL's own loss code.

Run by hand inside the pinned reference venv (reference/setup.sh), never in CI:

    ~/.cache/rlvr/reference-venv/bin/python reference/make_grpo_fixtures.py

It calls `trl.GRPOTrainer._compute_loss` (TRL 1.16.0) on a stand-in trainer object that holds
only the attributes the method reads, so the loss is TRL's code, not a re-implementation:

- losses.safetensors / losses.json: for fixed per-token log-probs, old and reference
  log-probs, a completion mask and advantages, the loss and d loss / d logps for every
  loss_type (grpo, bnpo, dr_grpo, dapo) and beta (0, 0.04); advantages for every
  scale_rewards (group, batch, none) computed with TRL's formula and its `nanstd`.
- lora_grads.safetensors / lora_grads.json: the tiny Gemma 3 fixture with its PEFT adapter,
  a batch of equal-length prompts and ragged completions, per-token log-probs from the
  model (logits / temperature, TRL's `selective_log_softmax`), TRL's loss (dapo, beta 0.04,
  reference = adapters off) and the gradient of every LoRA tensor from torch autograd.
"""

from __future__ import annotations

import json
import os
import types
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import Gemma3ForCausalLM  # noqa: E402
from trl import GRPOTrainer  # noqa: E402
from trl.trainer.utils import nanstd, selective_log_softmax  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "grpo"
EPS_LOW, EPS_HIGH = 0.2, 0.28
GRAD_ACCUM = 2
MAX_COMPLETION = 6


def stand_in(loss_type: str, beta: float, logps_fn):
    """The attributes `_compute_loss` reads, nothing else."""
    args = types.SimpleNamespace(
        use_bias_correction_kl=True, delta=None, steps_per_generation=GRAD_ACCUM
    )
    metrics = {"train": __import__("collections").defaultdict(list)}
    accel = types.SimpleNamespace(num_processes=1, gather=lambda t: t, reduce=lambda t, reduction="sum": t)
    me = types.SimpleNamespace(
        args=args,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=EPS_LOW,
        epsilon_high=EPS_HIGH,
        importance_sampling_level="token",
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=GRAD_ACCUM,
        max_completion_length=MAX_COMPLETION,
        accelerator=accel,
        model=types.SimpleNamespace(training=True),
        _metrics=metrics,
    )
    me._get_per_token_logps_and_entropies = lambda *a, **k: logps_fn()
    return me


def trl_loss(loss_type, beta, logps, inputs):
    me = stand_in(loss_type, beta, lambda: (logps, torch.zeros_like(logps), None))
    return GRPOTrainer._compute_loss(me, None, inputs)


def advantages(rewards: torch.Tensor, g: int, scale: str) -> torch.Tensor:
    """grpo_trainer.py, "sum_then_normalize" (TRL 1.16.0)."""
    mean = torch.nanmean(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
    if scale in ("group", "none"):
        std = nanstd(rewards.view(-1, g), dim=1).repeat_interleave(g, dim=0)
    else:
        std = nanstd(rewards).expand_as(rewards)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return adv


def losses():
    torch.manual_seed(0)
    b, t = 4, MAX_COMPLETION
    logps0 = -torch.rand(b, t) * 3
    old = logps0 + torch.randn(b, t) * 0.3
    ref = logps0 + torch.randn(b, t) * 0.2
    mask = torch.ones(b, t)
    mask[1, 4:] = 0
    mask[3, 2:] = 0
    rewards = torch.tensor([1.0, 0.0, 2.5, 2.5, 0.5, 3.0, 1.0, 1.0])
    tensors = {
        "logps": logps0, "old": old, "ref": ref, "mask": mask, "rewards": rewards,
    }
    for scale in ("group", "batch", "none"):
        tensors[f"adv_{scale}"] = advantages(rewards, 4, scale)
    adv = tensors["adv_group"][:b].clone()
    tensors["adv"] = adv
    cases = []
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for beta in (0.0, 0.04):
            logps = logps0.clone().requires_grad_(True)
            inputs = {
                "prompt_ids": torch.zeros(b, 1, dtype=torch.long),
                "prompt_mask": torch.ones(b, 1),
                "completion_ids": torch.zeros(b, t, dtype=torch.long),
                "completion_mask": mask,
                "advantages": adv,
                "old_per_token_logps": old,
                "ref_per_token_logps": ref,
                # dapo: the active tokens of the whole generation batch (here twice this one)
                "num_items_in_batch": mask.sum() * 2,
            }
            loss = trl_loss(loss_type, beta, logps, inputs)
            loss.backward()
            key = f"{loss_type}_{beta}"
            tensors[f"grad_{key}"] = logps.grad.clone()
            cases.append({"loss_type": loss_type, "beta": beta, "loss": loss.item(), "key": key})
    OUT.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "losses.safetensors")
    meta = {
        "made_by": f"reference/make_grpo_fixtures.py with trl {version('trl')}, torch {version('torch')}",
        "epsilon_low": EPS_LOW, "epsilon_high": EPS_HIGH, "grad_accum": GRAD_ACCUM,
        "max_completion_length": MAX_COMPLETION, "batch_tokens": float(mask.sum() * 2),
        "group": 4, "cases": cases,
    }
    (OUT / "losses.json").write_text(json.dumps(meta, indent=2) + "\n")


def lora_grads():
    base = Gemma3ForCausalLM.from_pretrained(ROOT / "tests/fixtures/tiny-gemma3", torch_dtype=torch.float32,
                                             attn_implementation="eager")
    model = PeftModel.from_pretrained(base, ROOT / "tests/fixtures/tiny-gemma3/adapter", is_trainable=True)
    model.train()
    prompts = [[2, 10, 20, 30, 40], [2, 50, 60, 70, 80], [2, 11, 12, 13, 14]]
    completions = [[100, 101, 102, 1], [200, 201], [300, 301, 302, 303, 304, 305]]
    t = max(len(c) for c in completions)
    comp = torch.tensor([c + [0] * (t - len(c)) for c in completions])
    cmask = torch.tensor([[1.0] * len(c) + [0.0] * (t - len(c)) for c in completions])
    pids = torch.tensor(prompts)
    input_ids = torch.cat([pids, comp], dim=1)
    attention = torch.cat([torch.ones_like(pids, dtype=torch.float), cmask], dim=1).long()
    temperature = 0.7

    def per_token_logps(adapters: bool):
        if adapters:
            logits = model(input_ids=input_ids, attention_mask=attention).logits
        else:
            with model.disable_adapter():
                logits = model(input_ids=input_ids, attention_mask=attention).logits
        logits = logits[:, pids.shape[1] - 1 : -1, :] / temperature
        return selective_log_softmax(logits, comp)

    with torch.no_grad():
        ref = per_token_logps(False)
    adv = torch.tensor([1.2, -0.4, -0.8])
    inputs = {
        "prompt_ids": pids, "prompt_mask": torch.ones_like(pids), "completion_ids": comp,
        "completion_mask": cmask, "advantages": adv, "ref_per_token_logps": ref,
        "num_items_in_batch": cmask.sum(),
    }
    me = stand_in("dapo", 0.04, lambda: (lp := per_token_logps(True), torch.zeros_like(lp), None))
    me.current_gradient_accumulation_steps = 1
    me.args.steps_per_generation = 1
    loss = GRPOTrainer._compute_loss(me, model, inputs)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if "lora_" in name:
            grads[name.replace(".default", "")] = p.grad.detach().clone()
    with torch.no_grad():
        logps = per_token_logps(True)
    grads["logps"] = logps * cmask
    save_file({k: v.contiguous() for k, v in grads.items()}, OUT / "lora_grads.safetensors")
    meta = {
        "made_by": f"reference/make_grpo_fixtures.py with trl {version('trl')}, peft {version('peft')}, "
                   f"transformers {version('transformers')}, torch {version('torch')}",
        "prompts": prompts, "completions": completions, "temperature": temperature,
        "advantages": adv.tolist(), "loss_type": "dapo", "beta": 0.04,
        "epsilon_low": EPS_LOW, "epsilon_high": EPS_HIGH, "loss": loss.item(),
    }
    (OUT / "lora_grads.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    losses()
    lora_grads()
    print("wrote", OUT)
