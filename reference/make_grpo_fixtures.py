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
- loss_cases.safetensors / loss_cases.json: TRL 1.16's `_compute_loss` on a padded batch of six
  completions of unequal lengths for every loss_type (grpo, bnpo, dr_grpo, dapo, cispo, sapo,
  luspo, vespo), importance_sampling_level token and sequence, delta, top_entropy_quantile,
  entropy_coef, off_policy_mask_threshold and the vLLM importance-sampling correction in each
  of its four modes: the loss, its gradient with respect to the log-probs (and the entropies
  when entropy_coef is set) and TRL's logged metrics. The correction's ratios and mismatch
  metrics, and the advantages of both multi_objective_aggregation modes with reward_weights
  and the per-reward means and standard deviations, are TRL's code copied verbatim (TRL runs
  them inline in `_generate_and_score_completions`, which cannot be called alone).
- lora_cases.safetensors / lora_cases.json: the tiny Gemma 3 fixture with its adapter on a
  batch of prompts of unequal lengths (one repeated, as in a group) and ragged completions;
  per-token log-probs and entropies (TRL's `selective_log_softmax` and `entropy_from_logits`
  on logits / temperature, each row run unpadded) and, for several loss settings, TRL's loss
  and the gradient of every LoRA tensor from torch autograd.
"""

from __future__ import annotations

import json
import math
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
from trl.trainer.utils import entropy_from_logits, nanstd, selective_log_softmax  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "grpo"
EPS_LOW, EPS_HIGH = 0.2, 0.28
GRAD_ACCUM = 2
MAX_COMPLETION = 6


def stand_in(loss_type: str, beta: float, logps_fn, **cfg):
    """The attributes `_compute_loss` reads, nothing else; `cfg` overrides GRPOConfig fields."""
    defaults = dict(
        use_bias_correction_kl=True, delta=None, steps_per_generation=GRAD_ACCUM,
        sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
        vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
        epsilon_low=EPS_LOW, epsilon_high=EPS_HIGH, importance_sampling_level="token",
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, entropy_coef=0.0,
        vllm_importance_sampling_correction=False,
    )
    defaults.update(cfg)
    args = types.SimpleNamespace(**defaults)
    metrics = {"train": __import__("collections").defaultdict(list)}
    accel = types.SimpleNamespace(
        num_processes=1, gather=lambda t: t, reduce=lambda t, reduction="sum": t,
        pad_across_processes=lambda t, dim=0, pad_index=0: t, sync_gradients=True,
    )
    me = types.SimpleNamespace(
        args=args,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=args.epsilon_low,
        epsilon_high=args.epsilon_high,
        importance_sampling_level=args.importance_sampling_level,
        top_entropy_quantile=args.top_entropy_quantile,
        off_policy_mask_threshold=args.off_policy_mask_threshold,
        use_vllm=args.vllm_importance_sampling_correction,
        vllm_importance_sampling_correction=args.vllm_importance_sampling_correction,
        aux_loss_enabled=False,
        entropy_coef=args.entropy_coef,
        use_adaptive_entropy=False,
        _entropy_bonus_enabled=args.entropy_coef != 0.0,
        current_gradient_accumulation_steps=GRAD_ACCUM,
        max_completion_length=MAX_COMPLETION,
        accelerator=accel,
        model=types.SimpleNamespace(training=True),
        _metrics=metrics,
    )
    me._get_per_token_logps_and_entropies = lambda *a, **k: logps_fn()
    me.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, me)
    me.get_off_policy_mask = GRPOTrainer.get_off_policy_mask
    me.get_gamma_weights = GRPOTrainer.get_gamma_weights
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


def is_correction(old_per_token_logps, sampling_per_token_logps, completion_mask, mode, clip_min, clip_max):
    """grpo_trainer.py `_generate_and_score_completions` (TRL 1.16.0), the vLLM importance sampling
    ratio and its metrics, copied verbatim (tool_mask is None, one process)."""
    mask = completion_mask
    per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    sequence_level_is = mode in ["sequence_mask", "sequence_truncate"]
    if sequence_level_is:
        logps_diff = per_token_logps_diff.sum(dim=-1, keepdim=True)
    else:
        logps_diff = per_token_logps_diff
    ratio = torch.exp(logps_diff)
    if mode in ["sequence_truncate", "token_truncate"]:
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        min_val = clip_min if clip_min is not None else -math.inf
        max_val = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < min_val) | (ratio > max_val), value=0.0)
    delta = torch.abs(old_per_token_logps - sampling_per_token_logps)
    bmask = completion_mask.bool()
    delta = delta[bmask & ~torch.isnan(delta)]
    flat = ratio.flatten() if sequence_level_is else ratio[bmask]
    metrics = {
        "logp_diff_mean": torch.mean(delta).item(), "logp_diff_max": torch.max(delta).item(),
        "ratio_min": torch.min(flat).item(), "ratio_mean": torch.mean(flat).item(),
        "ratio_max": torch.max(flat).item(),
    }
    return ratio, metrics


def multi_advantages(rewards_per_func, reward_weights, num_generations, scale_rewards, aggregation):
    """grpo_trainer.py `_generate_and_score_completions` (TRL 1.16.0), the advantages of several
    reward functions, copied verbatim (no unscorable rows, one process)."""
    if aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
        mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
        mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
        if scale_rewards in ["group", "none"]:
            std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
            std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
        else:
            std_rewards = nanstd(rewards).expand_as(rewards)
        advantages = rewards - mean_grouped_rewards
        if scale_rewards != "none":
            advantages = advantages / (std_rewards + 1e-4)
    else:
        grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True)
        reward_k = (grouped - mean_k) / (std_k + 1e-4)
        reward_k = reward_k.view(-1, rewards_per_func.shape[1])
        rewards = (reward_k * reward_weights.unsqueeze(0)).nansum(dim=1)
        std_rewards = nanstd(rewards).expand_as(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
    is_std_zero = torch.isclose(std_rewards, torch.zeros_like(std_rewards))
    return advantages, is_std_zero


# Every case: GRPOConfig fields (TRL's names) over loss_type dapo, beta 0, epsilon 0.2 / 0.28.
LOSS_CASES = (
    [{"loss_type": lt, "beta": beta} for lt in
     ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo") for beta in (0.0, 0.04)]
    + [{"loss_type": "cispo", "epsilon_high": 1.1, "beta": 0.04}]
    + [{"loss_type": lt, "importance_sampling_level": "sequence", "beta": beta}
       for lt in ("grpo", "dapo", "luspo", "sapo", "cispo", "bnpo") for beta in (0.0, 0.04)]
    + [{"loss_type": lt, "delta": 1.25, "beta": 0.04} for lt in ("grpo", "dapo")]
    + [{"loss_type": "grpo", "delta": 1.1, "importance_sampling_level": "sequence"}]
    + [{"loss_type": "sapo", "sapo_temperature_pos": 0.8, "sapo_temperature_neg": 1.5}]
    + [{"loss_type": "vespo", "vespo_k_pos": 1.5, "vespo_lambda_pos": 2.5, "vespo_k_neg": 2.0,
        "vespo_lambda_neg": 1.0}]
    + [{"loss_type": lt, "top_entropy_quantile": q} for lt in ("dapo", "grpo") for q in (0.3, 0.0)]
    + [{"loss_type": lt, "entropy_coef": 0.01} for lt in ("bnpo", "dapo")]
    + [{"loss_type": lt, "entropy_coef": 0.05, "top_entropy_quantile": 0.5, "beta": 0.04}
       for lt in ("grpo", "cispo")]
    + [{"loss_type": "dapo", "off_policy_mask_threshold": 0.02},
       {"loss_type": "grpo", "off_policy_mask_threshold": 0.02, "sampling": False},
       {"loss_type": "dapo", "off_policy_mask_threshold": 0.0, "beta": 0.04}]
    + [{"loss_type": lt, "vllm_importance_sampling_correction": True, "vllm_importance_sampling_mode": mode,
        "vllm_importance_sampling_clip_min": lo, "vllm_importance_sampling_clip_max": hi}
       for lt, mode, lo, hi in (
           ("dapo", "token_truncate", None, 1.1), ("dapo", "token_mask", 0.9, 1.1),
           ("grpo", "sequence_truncate", 0.8, 1.2), ("dapo", "sequence_mask", None, 3.0),
           ("vespo", "token_truncate", 0.95, 1.05), ("vespo", "token_mask", None, 1.1))]
)


KEPT_METRICS = ("kl", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
                "cispo_clip_ratio", "vespo/phi_seq_mean", "policy_loss")


def loss_cases():
    """Loss, gradient and metrics of every case on one padded batch of unequal lengths."""
    torch.manual_seed(1)
    lengths = [7, 3, 5, 1, 6, 4]
    b, t = len(lengths), max(lengths)
    mask = torch.tensor([[1.0] * n + [0.0] * (t - n) for n in lengths])
    logps0 = (-torch.rand(b, t) * 3) * mask
    old = (logps0 + torch.randn(b, t) * 0.3) * mask
    ref = (logps0 + torch.randn(b, t) * 0.2) * mask
    sampling = (old + torch.randn(b, t) * 0.1) * mask
    sampling[4, 2] = float("nan")  # a token the sampler could not score
    entropies0 = (torch.rand(b, t) * 4) * mask
    adv = torch.tensor([1.1, -0.7, 0.4, -1.3, 0.0, 0.9])
    tensors = {"logps": logps0, "old": old, "ref": ref, "sampling": sampling, "mask": mask,
               "entropies": entropies0, "adv": adv}
    batch_tokens = float(mask.sum() * 2)
    cases = []
    for i, cfg in enumerate(LOSS_CASES):
        cfg = dict(cfg)
        loss_type, beta = cfg.pop("loss_type"), cfg.pop("beta", 0.0)
        with_sampling = cfg.pop("sampling", True)
        mode = cfg.pop("vllm_importance_sampling_mode", None)
        lo = cfg.pop("vllm_importance_sampling_clip_min", None)
        hi = cfg.pop("vllm_importance_sampling_clip_max", None)
        logps = logps0.clone().requires_grad_(True)
        entropies = entropies0.clone().requires_grad_(True)
        me = stand_in(loss_type, beta, lambda: (logps, entropies, None), **cfg)
        inputs = {
            "prompt_ids": torch.zeros(b, 1, dtype=torch.long), "prompt_mask": torch.ones(b, 1),
            "completion_ids": torch.zeros(b, t, dtype=torch.long), "completion_mask": mask,
            "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref,
            # the active tokens of the whole generation batch (here twice this one)
            "num_items_in_batch": mask.sum() * 2,
        }
        if with_sampling and cfg.get("off_policy_mask_threshold") is not None:
            inputs["sampling_per_token_logps"] = sampling
        if mode is not None:
            ratio, _ = is_correction(old, sampling, mask, mode, lo, hi)
            inputs["importance_sampling_ratio"] = ratio
            inputs["sampling_per_token_logps"] = sampling
            tensors[f"ratio_{i}"] = ratio
        loss = GRPOTrainer._compute_loss(me, None, inputs)
        loss.backward()
        tensors[f"grad_{i}"] = logps.grad.clone()
        if entropies.grad is not None:
            tensors[f"grad_entropy_{i}"] = entropies.grad.clone()
        metrics = {k: v[-1] for k, v in me._metrics["train"].items() if k in KEPT_METRICS}
        case = {"index": i, "loss_type": loss_type, "beta": beta, "loss": loss.item(), "metrics": metrics,
                **cfg}
        if mode is not None:
            case.update({"vllm_importance_sampling_mode": mode, "vllm_importance_sampling_clip_min": lo,
                         "vllm_importance_sampling_clip_max": hi})
        case["sampling"] = with_sampling
        cases.append(case)
    # the correction alone, every mode
    corrections = []
    for mode, lo, hi in (("token_truncate", 0.9, 1.1), ("token_mask", 0.9, 1.1),
                         ("sequence_truncate", None, 1.2), ("sequence_mask", 0.8, 3.0)):
        ratio, metrics = is_correction(old, sampling, mask, mode, lo, hi)
        tensors[f"correction_{mode}"] = ratio
        corrections.append({"mode": mode, "clip_min": lo, "clip_max": hi, "metrics": metrics})
    # several rewards: both aggregations, every scaling
    rewards_per_func = torch.tensor([
        [1.0, 0.2, 0.0], [0.0, 0.5, 1.0], [2.0, 0.5, 1.0], [2.0, 0.1, 0.0],
        [0.0, 0.9, 1.0], [2.0, 0.9, 1.0], [0.0, 0.3, 0.0], [0.0, 0.3, 1.0],
    ])
    weights = torch.tensor([1.0, 0.5, 2.0])
    tensors["rewards_per_func"] = rewards_per_func
    tensors["reward_weights"] = weights
    aggregations = []
    for aggregation in ("sum_then_normalize", "normalize_then_sum"):
        for scale in ("group", "batch", "none"):
            a, zero = multi_advantages(rewards_per_func, weights, 4, scale, aggregation)
            key = f"adv_{aggregation}_{scale}"
            tensors[key] = a
            tensors[f"zero_{aggregation}_{scale}"] = zero.float()
            aggregations.append({"aggregation": aggregation, "scale_rewards": scale, "key": key})
    moments = [[torch.nanmean(rewards_per_func[:, i]).item(), nanstd(rewards_per_func[:, i]).item()]
               for i in range(rewards_per_func.shape[1])]
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "loss_cases.safetensors")
    meta = {
        "made_by": f"reference/make_grpo_fixtures.py with trl {version('trl')}, torch {version('torch')}",
        "epsilon_low": EPS_LOW, "epsilon_high": EPS_HIGH, "grad_accum": GRAD_ACCUM,
        "max_completion_length": MAX_COMPLETION, "batch_tokens": batch_tokens, "group": 4,
        "cases": cases, "corrections": corrections, "aggregations": aggregations,
        "reward_moments": moments,
    }
    (OUT / "loss_cases.json").write_text(json.dumps(meta, indent=2) + "\n")


LORA_CASES = [
    {"loss_type": "cispo", "epsilon_high": 1.1},
    {"loss_type": "sapo"},
    {"loss_type": "luspo", "importance_sampling_level": "sequence"},
    {"loss_type": "vespo"},
    {"loss_type": "grpo", "importance_sampling_level": "sequence", "delta": 1.15, "beta": 0.04},
    {"loss_type": "dapo", "top_entropy_quantile": 0.5, "entropy_coef": 0.05, "beta": 0.04},
]


def lora_cases():
    """LoRA gradients through the tiny model for the new losses, prompts of unequal lengths."""
    base = Gemma3ForCausalLM.from_pretrained(ROOT / "tests/fixtures/tiny-gemma3", torch_dtype=torch.float32,
                                             attn_implementation="eager")
    model = PeftModel.from_pretrained(base, ROOT / "tests/fixtures/tiny-gemma3/adapter", is_trainable=True)
    model.train()
    a, b_, c = [2, 10, 20, 30, 40, 41, 42], [2, 50, 60], [2, 11, 12, 13, 14]
    prompts = [a, a, b_, c]
    completions = [[100, 101, 102, 1], [200, 201], [300, 301, 302, 303, 304, 305], [7, 8, 9]]
    temperature = 0.7
    t = max(len(x) for x in completions)
    cmask = torch.tensor([[1.0] * len(x) + [0.0] * (t - len(x)) for x in completions])
    comp = torch.tensor([x + [0] * (t - len(x)) for x in completions])

    def per_token(adapters: bool):
        """Each row unpadded: log-probs and entropies of logits / temperature, padded after."""
        lps, ents = [], []
        for p, cpl in zip(prompts, completions):
            ids = torch.tensor([p + cpl])
            if adapters:
                logits = model(input_ids=ids).logits
            else:
                with model.disable_adapter():
                    logits = model(input_ids=ids).logits
            logits = logits[:, len(p) - 1 : -1, :] / temperature
            lp = selective_log_softmax(logits, torch.tensor([cpl]))[0]
            en = entropy_from_logits(logits)[0]
            pad = t - len(cpl)
            lps.append(torch.nn.functional.pad(lp, (0, pad)))
            ents.append(torch.nn.functional.pad(en, (0, pad)))
        return torch.stack(lps), torch.stack(ents)

    with torch.no_grad():
        ref, _ = per_token(False)
        logps0, entropies0 = per_token(True)
    gen = torch.Generator().manual_seed(3)
    old = (logps0 + torch.randn(logps0.shape, generator=gen) * 0.15) * cmask
    adv = torch.tensor([1.2, -0.4, -0.8, 0.6])
    tensors = {"logps": logps0 * cmask, "entropies": entropies0 * cmask, "old": old}
    cases = []
    for i, cfg in enumerate(LORA_CASES):
        cfg = dict(cfg)
        loss_type, beta = cfg.pop("loss_type"), cfg.pop("beta", 0.0)
        model.zero_grad()
        me = stand_in(loss_type, beta, lambda: per_token(True) + (None,), **cfg)
        me.current_gradient_accumulation_steps = 1
        me.args.steps_per_generation = 1
        inputs = {
            "prompt_ids": torch.zeros(len(prompts), 1, dtype=torch.long),
            "prompt_mask": torch.ones(len(prompts), 1), "completion_ids": comp,
            "completion_mask": cmask, "advantages": adv, "old_per_token_logps": old,
            "ref_per_token_logps": ref, "num_items_in_batch": cmask.sum(),
        }
        loss = GRPOTrainer._compute_loss(me, model, inputs)
        loss.backward()
        for name, p in model.named_parameters():
            if "lora_" in name:
                tensors[f"{i}/{name.replace('.default', '')}"] = p.grad.detach().clone()
        cases.append({"index": i, "loss_type": loss_type, "beta": beta, "loss": loss.item(), **cfg})
    save_file({k: v.contiguous() for k, v in tensors.items()}, OUT / "lora_cases.safetensors")
    meta = {
        "made_by": f"reference/make_grpo_fixtures.py with trl {version('trl')}, peft {version('peft')}, "
                   f"transformers {version('transformers')}, torch {version('torch')}",
        "prompts": prompts, "completions": completions, "temperature": temperature,
        "advantages": adv.tolist(), "epsilon_low": EPS_LOW, "epsilon_high": EPS_HIGH, "cases": cases,
    }
    (OUT / "lora_cases.json").write_text(json.dumps(meta, indent=2) + "\n")


if __name__ == "__main__":
    losses()
    lora_grads()
    loss_cases()
    lora_cases()
    print("wrote", OUT)
