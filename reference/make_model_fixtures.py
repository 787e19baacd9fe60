#!/usr/bin/env python3
"""Write the tiny-model numeric fixtures under tests/fixtures/.

Run by hand inside the pinned reference venv (reference/setup.sh), never in CI:

    ~/.cache/rlvr/reference-venv/bin/python reference/make_model_fixtures.py

For each of tiny-gemma3, tiny-llama and tiny-qwen2 it writes

    tests/fixtures/tiny-<name>/config.json            HF config (as transformers saves it)
    tests/fixtures/tiny-<name>/model.safetensors      random f32 weights (HF names)
    tests/fixtures/tiny-<name>/generation_config.json (written by transformers; not needed)
    tests/fixtures/tiny-<name>/adapter/               PEFT LoRA adapter (r=4, alpha=8, 7 modules)
    tests/fixtures/tiny-<name>/adapter-rslora/        same A/B tensors, use_rslora=true
    tests/fixtures/tiny-<name>/expected.safetensors   reference tensors (see EXPECTED_DOC)
    tests/fixtures/tiny-<name>/expected.json          scalars, ids and a description

Everything is float32 on the CPU with eager attention and fixed seeds, so a rerun with the
same pinned versions reproduces the files bit for bit (up to BLAS summation order).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

# PEFT stores target_modules as a set: pin string hashing so adapter_config.json's list order
# is the same on every run.
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from transformers import (  # noqa: E402
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_R = 4
LORA_ALPHA = 8
SEQ_LEN = 12
GREEDY_PROMPT_LEN = 5
GREEDY_NEW = 16
P_LEN = 6
C_LEN = 5

EXPECTED_DOC = {
    "input_ids": "i64 [2,12] batch fed to the base model (positions 4..11 are past the sliding window of 4)",
    "attention_mask": "i64 [2,12] all ones",
    "logits": "f32 [2,12,vocab] base model logits for input_ids",
    "hidden_states": "f32 [n_layers+1,2,12,hidden] output_hidden_states of the base model: [0] = scaled "
    "input embeddings, [i] = output of decoder layer i-1 (before the final norm) for i < n_layers, "
    "[n_layers] = the final-norm output (what the LM head sees); see expected.json 'hidden_states_layout'",
    "greedy_prompt": "i64 [5] prompt for greedy decoding",
    "greedy": "i64 [16] greedy new tokens (argmax, no EOS stopping), batch 1, no padding",
    "greedy_top2_gap": "f32 [16] logit(top1) - logit(top2) at each greedy step (near-ties are fragile)",
    "prompt_ids": "i64 [6] prompt P for the log-prob / LoRA checks",
    "completion_ids": "i64 [5] completion C",
    "completion_logprobs": "f32 [5] base model log p(C_t | P, C_<t)",
    "lora_logits": "f32 [2,12,vocab] logits for input_ids with adapter/ attached",
    "lora_completion_logprobs": "f32 [5] log p(C_t | P, C_<t) with adapter/ attached",
    "lora_loss": "f32 [] -(sum of lora_completion_logprobs)",
    "grad.<peft key>": "f32 gradient of lora_loss w.r.t. each LoRA tensor, keyed by its name in "
    "adapter/adapter_model.safetensors (e.g. grad.base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight)",
    "rslora_logits": "f32 [2,12,vocab] logits for input_ids with adapter-rslora/ attached "
    "(same A/B tensors, scaling alpha/sqrt(r) = 4 instead of alpha/r = 2)",
}


def versions() -> dict:
    return {n: version(n) for n in ("torch", "transformers", "peft", "safetensors", "numpy")}


def gemma3_config() -> Gemma3TextConfig:
    return Gemma3TextConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        # != head_dim on purpose: HF scales attention by query_pre_attn_scalar ** -0.5
        query_pre_attn_scalar=24,
        sliding_window=4,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_theta=1_000_000.0,
        rope_local_base_freq=10_000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )


def llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_theta=10_000.0,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )


def qwen2_config() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=1_000_000.0,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        tie_word_embeddings=True,
        use_sliding_window=False,
        bos_token_id=None,
        eos_token_id=3,
        pad_token_id=None,
    )


MODELS = {
    # name: (config factory, model class, norm weights are (1 + w)?, embedding std)
    "gemma3": (gemma3_config, Gemma3ForCausalLM, True, 64**-0.5),
    "llama": (llama_config, LlamaForCausalLM, False, 1.0),
    "qwen2": (qwen2_config, Qwen2ForCausalLM, False, 64**-0.5 * 2.0),
}


@torch.no_grad()
def randomise(model: torch.nn.Module, one_plus_norm: bool, embed_std: float, gen: torch.Generator) -> None:
    """Deterministic random weights with O(1) activations and logits.

    Norm weights are never left at their neutral value (0 for Gemma's (1 + w), 1 for
    Llama/Qwen's w), so a Rust port that drops the "+1" or the weight entirely fails.
    """
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        if "norm" in name:
            noise = torch.randn(p.shape, generator=gen) * 0.2
            p.copy_(noise if one_plus_norm else 1.0 + noise)
        elif "embed_tokens" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * embed_std)
        elif name.endswith(".bias"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        elif p.dim() == 2:  # Linear [out, in]
            p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))
        else:
            raise RuntimeError(f"unexpected parameter {name} {tuple(p.shape)}")


def completion_logprobs(model, prompt: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    ids = torch.cat([prompt, completion]).unsqueeze(0)
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return logp.gather(-1, completion.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def greedy_manual(model, prompt: torch.Tensor, n: int) -> tuple[list[int], list[float]]:
    """Argmax decoding by full re-forward each step (no KV cache): the plainest definition."""
    ids = prompt.tolist()
    out, gaps = [], []
    for _ in range(n):
        t = torch.tensor([ids])
        logits = model(input_ids=t, attention_mask=torch.ones_like(t)).logits[0, -1]
        top = torch.topk(logits, 2)
        nxt = int(top.indices[0])
        out.append(nxt)
        gaps.append(float(top.values[0] - top.values[1]))
        ids.append(nxt)
    return out, gaps


def make(name: str) -> dict:
    cfg_fn, cls, one_plus_norm, embed_std = MODELS[name]
    seed = {"gemma3": 1000, "llama": 2000, "qwen2": 3000}[name]
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    config = cfg_fn()
    config._attn_implementation = "eager"
    model = cls(config).float().eval()
    model.config._attn_implementation = "eager"
    randomise(model, one_plus_norm, embed_std, gen)
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "head not tied"

    out_dir = OUT / f"tiny-{name}"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    model.save_pretrained(out_dir)

    vocab = config.vocab_size
    # Ids drawn from [3, vocab) so that no special id (pad/bos/eos) occurs.
    input_ids = torch.randint(3, vocab, (2, SEQ_LEN), generator=gen, dtype=torch.long)
    attention_mask = torch.ones_like(input_ids)
    greedy_prompt = torch.randint(3, vocab, (GREEDY_PROMPT_LEN,), generator=gen, dtype=torch.long)
    prompt_ids = torch.randint(3, vocab, (P_LEN,), generator=gen, dtype=torch.long)
    completion_ids = torch.randint(3, vocab, (C_LEN,), generator=gen, dtype=torch.long)

    t: dict[str, torch.Tensor] = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "greedy_prompt": greedy_prompt,
        "prompt_ids": prompt_ids,
        "completion_ids": completion_ids,
    }
    info: dict = {}

    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        t["logits"] = out.logits.float().contiguous()
        hs = torch.stack([h.float() for h in out.hidden_states])
        t["hidden_states"] = hs.contiguous()
        # Work out what the last hidden state is (normed or not) and record it.
        normed_last = torch.allclose(model.lm_head(hs[-1]), out.logits, atol=1e-5)
        info["hidden_states_layout"] = {
            "count": len(out.hidden_states),
            "last_is_final_norm_output": bool(normed_last),
            "first_is_scaled_embeddings": bool(
                torch.allclose(hs[0], model.model.embed_tokens(input_ids).float(), atol=1e-6)
            ),
        }
        # Batch independence: row 1 alone must give the same logits.
        solo = model(input_ids=input_ids[1:], attention_mask=attention_mask[1:]).logits
        info["batch_row_max_abs_diff"] = float((solo - out.logits[1:]).abs().max())

        greedy, gaps = greedy_manual(model, greedy_prompt, GREEDY_NEW)
        # Cross-check with HF generate (KV cache, sliding-window cache) with EOS stopping off.
        gp = greedy_prompt.unsqueeze(0)
        gen_out = model.generate(
            input_ids=gp,
            attention_mask=torch.ones_like(gp),
            max_new_tokens=GREEDY_NEW,
            min_new_tokens=GREEDY_NEW,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
        gen_tokens = gen_out[0, GREEDY_PROMPT_LEN:].tolist()
        info["generate_matches_manual_greedy"] = gen_tokens == greedy
        if gen_tokens != greedy:
            print(f"  WARNING {name}: generate() {gen_tokens} != manual {greedy}", file=sys.stderr)
        t["greedy"] = torch.tensor(greedy, dtype=torch.long)
        t["greedy_top2_gap"] = torch.tensor(gaps, dtype=torch.float32)

        t["completion_logprobs"] = completion_logprobs(model, prompt_ids, completion_ids).contiguous()

    # ---- LoRA -------------------------------------------------------------------------------
    torch.manual_seed(seed + 1)  # PEFT draws lora_A (Kaiming-uniform, a=sqrt(5)) from the global RNG
    lcfg = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        target_modules=list(TARGET_MODULES),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=False,
    )
    peft_model = get_peft_model(model, lcfg)
    peft_model.eval()
    bgen = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for pname, p in sorted(peft_model.named_parameters(), key=lambda kv: kv[0]):
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=bgen) * 0.02)
    peft_model.peft_config["default"].base_model_name_or_path = f"tiny-{name}"
    adapter_dir = out_dir / "adapter"
    peft_model.save_pretrained(adapter_dir)
    (adapter_dir / "README.md").unlink(missing_ok=True)  # PEFT's model-card stub

    with torch.no_grad():
        t["lora_logits"] = peft_model(input_ids=input_ids, attention_mask=attention_mask).logits.float().contiguous()
    info["lora_logits_max_abs_change"] = float((t["lora_logits"] - t["logits"]).abs().max())

    # Gradients of -(sum log p(C | P)) w.r.t. every LoRA tensor, keyed by the saved PEFT name.
    peft_model.zero_grad(set_to_none=True)
    lp = completion_logprobs(peft_model, prompt_ids, completion_ids)
    loss = -lp.sum()
    loss.backward()
    t["lora_completion_logprobs"] = lp.detach().contiguous()
    t["lora_loss"] = loss.detach().reshape(())
    n_grads = 0
    for pname, p in peft_model.named_parameters():
        if "lora_" not in pname:
            assert p.grad is None or not p.requires_grad, pname
            continue
        key = pname.replace(".default.", ".")
        assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient for {pname}"
        t[f"grad.{key}"] = p.grad.detach().float().contiguous()
        n_grads += 1

    # Check the gradient keys are exactly the tensors in adapter_model.safetensors.
    from safetensors.torch import load_file

    saved = load_file(adapter_dir / "adapter_model.safetensors")
    grad_keys = {k[len("grad.") :] for k in t if k.startswith("grad.")}
    assert grad_keys == set(saved), (sorted(grad_keys)[:3], sorted(saved)[:3])
    info["lora_tensor_count"] = n_grads

    # ---- rsLoRA: same A/B tensors, scaling alpha/sqrt(r) -----------------------------------------
    base = peft_model.unload()  # removes the LoRA layers, returns the untouched base model
    with torch.no_grad():
        check = base(input_ids=input_ids, attention_mask=attention_mask).logits
    info["base_after_unload_max_abs_diff"] = float((check - t["logits"]).abs().max())
    rs_cfg = LoraConfig(
        r=LORA_R,
        lora_alpha=LORA_ALPHA,
        target_modules=list(TARGET_MODULES),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        use_rslora=True,
    )
    rs_model = get_peft_model(base, rs_cfg)
    rs_model.eval()
    with torch.no_grad():
        for pname, p in rs_model.named_parameters():
            if "lora_" in pname:
                p.copy_(saved[pname.replace(".default.", ".")])
    rs_model.peft_config["default"].base_model_name_or_path = f"tiny-{name}"
    rs_dir = out_dir / "adapter-rslora"
    rs_model.save_pretrained(rs_dir)
    (rs_dir / "README.md").unlink(missing_ok=True)
    with torch.no_grad():
        t["rslora_logits"] = rs_model(input_ids=input_ids, attention_mask=attention_mask).logits.float().contiguous()

    # Round trip: reload the saved files (base + each adapter) and compare with what we store.
    from peft import PeftModel

    for key, sub in (("logits", None), ("lora_logits", "adapter"), ("rslora_logits", "adapter-rslora")):
        re = cls.from_pretrained(out_dir, dtype=torch.float32, attn_implementation="eager").eval()
        if sub is not None:
            re = PeftModel.from_pretrained(re, out_dir / sub).eval()
        with torch.no_grad():
            got = re(input_ids=input_ids, attention_mask=attention_mask).logits
        diff = float((got - t[key]).abs().max())
        info[f"reload_{key}_max_abs_diff"] = diff
        assert diff < 1e-5, (key, diff)

    save_file({k: v.contiguous() for k, v in t.items()}, out_dir / "expected.safetensors")

    logits = t["logits"]
    summary = {
        "model": f"tiny-{name}",
        "architecture": cls.__name__,
        "seed": seed,
        "versions": versions(),
        "attn_implementation": "eager",
        "dtype": "float32",
        "tensors": EXPECTED_DOC,
        "input_ids": input_ids.tolist(),
        "greedy_prompt": greedy_prompt.tolist(),
        "greedy": greedy,
        "greedy_top2_gap_min": min(gaps),
        "prompt_ids": prompt_ids.tolist(),
        "completion_ids": completion_ids.tolist(),
        "completion_logprobs": t["completion_logprobs"].tolist(),
        "completion_logprob_sum": float(t["completion_logprobs"].sum()),
        "lora": {
            "r": LORA_R,
            "lora_alpha": LORA_ALPHA,
            "scaling": LORA_ALPHA / LORA_R,
            "rslora_scaling": LORA_ALPHA / math.sqrt(LORA_R),
            "target_modules": TARGET_MODULES,
            "lora_A_init": "PEFT default (Kaiming-uniform a=sqrt(5)), torch.manual_seed(seed+1)",
            "lora_B_init": "normal std 0.02, generator seed+2",
        },
        "lora_completion_logprobs": t["lora_completion_logprobs"].tolist(),
        "lora_loss": float(t["lora_loss"]),
        "logits_stats": {
            "mean": float(logits.mean()),
            "std": float(logits.std()),
            "abs_max": float(logits.abs().max()),
            "argmax_row0": logits[0].argmax(-1).tolist(),
        },
        "checks": info,
    }
    (out_dir / "expected.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def main() -> None:
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float32)
    names = sys.argv[1:] or list(MODELS)
    for name in names:
        s = make(name)
        print(
            f"tiny-{name}: greedy={s['greedy']} min_gap={s['greedy_top2_gap_min']:.3g} "
            f"logits std={s['logits_stats']['std']:.3f} absmax={s['logits_stats']['abs_max']:.3f} "
            f"lora_loss={s['lora_loss']:.5f} checks={s['checks']}"
        )


if __name__ == "__main__":
    main()
