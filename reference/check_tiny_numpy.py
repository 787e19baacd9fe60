#!/usr/bin/env python3
"""Independent NumPy re-implementation of the tiny fixture models (no torch, no transformers).

It re-derives tests/fixtures/tiny-*/expected.safetensors' `logits`, `lora_logits` and
`rslora_logits` from config.json + model.safetensors + adapter*/ alone, in float64, which
pins down the semantics the Rust port must follow (and that the fixtures really exercise
them):

  Gemma 3: embeddings * sqrt(hidden); RMSNorm x * (1 + w); q_norm/k_norm over head_dim
  before RoPE; per-layer-type RoPE (`rope_parameters[layer_type]`, linear scaling divides
  the inverse frequencies by `factor`); attention scale query_pre_attn_scalar ** -0.5;
  sliding layers see keys j with i - sliding_window < j <= i (exactly `sliding_window`
  keys incl. itself); four norms per layer (input, post_attention, pre_feedforward,
  post_feedforward); MLP down(gelu_tanh(gate) * up); tied LM head.
  Llama / Qwen2: RMSNorm x * w, scale head_dim ** -0.5, SiLU MLP, Qwen2 q/k/v biases.
  LoRA: y += (alpha / r) * B (A x)   (rsLoRA: alpha / sqrt(r)).

Needs only numpy and safetensors:  python reference/check_tiny_numpy.py [--mutants]
(--mutants: re-run tiny-gemma3 with one deliberate bug at a time; each must be caught.)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

FIX = Path(__file__).resolve().parent.parent / "tests" / "fixtures"


# Deliberate bugs (--mutants): each must move the Gemma 3 logits past 1e-3 (100x the f32 error),
# showing the fixture really exercises that feature.
MUTANT: str | None = None
MUTANTS = {
    "norm_without_plus_one": "RMSNorm x * w instead of x * (1 + w)",
    "scale_by_head_dim": "attention scale head_dim ** -0.5 instead of query_pre_attn_scalar ** -0.5",
    "no_rope_scaling": "ignore rope_parameters.full_attention linear factor",
    "one_rope_base": "use the full-attention rope_theta on sliding layers too",
    "window_plus_one": "sliding layers see sliding_window + 1 keys (candle's off-by-one)",
    "no_sliding_window": "sliding layers attend to all previous keys",
    "no_qk_norm": "skip q_norm / k_norm",
    "no_embed_scale": "skip the sqrt(hidden) embedding scale",
    "gelu_erf": "exact (erf) GELU instead of the tanh approximation",
    "interleaved_rope": "rotate adjacent pairs (GPT-J / rope_i layout) instead of halves",
}


def rms(x, w, eps, one_plus):
    y = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
    if one_plus and MUTANT == "norm_without_plus_one":
        return y * w
    return y * ((1.0 + w) if one_plus else w)


def gelu_tanh(x):
    if MUTANT == "gelu_erf":
        from math import erf

        return 0.5 * x * (1.0 + np.vectorize(erf)(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def silu(x):
    return x / (1.0 + np.exp(-x))


def rope(x, pos, theta, factor, dim):
    # x [T, heads, dim]; HF "rotate_half" layout (first half / second half).
    inv = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim) / factor
    ang = pos[:, None] * inv[None, :]  # [T, dim/2]
    cos = np.cos(np.concatenate([ang, ang], -1))[:, None, :]
    sin = np.sin(np.concatenate([ang, ang], -1))[:, None, :]
    half = dim // 2
    if MUTANT == "interleaved_rope":
        inv_i = np.repeat(inv, 2)
        ang_i = pos[:, None] * inv_i[None, :]
        cos_i, sin_i = np.cos(ang_i)[:, None, :], np.sin(ang_i)[:, None, :]
        rot_i = np.stack([-x[..., 1::2], x[..., 0::2]], -1).reshape(x.shape)
        return x * cos_i + rot_i * sin_i
    rot = np.concatenate([-x[..., half:], x[..., :half]], -1)
    return x * cos + rot * sin


class Model:
    def __init__(self, d: Path, adapter: Path | None = None):
        self.cfg = json.loads((d / "config.json").read_text())
        self.w = {k: v.astype(np.float64) for k, v in load_file(d / "model.safetensors").items()}
        self.gemma = self.cfg["model_type"].startswith("gemma3")
        self.lora = {}
        self.scale = 0.0
        if adapter is not None:
            acfg = json.loads((adapter / "adapter_config.json").read_text())
            r, alpha = acfg["r"], acfg["lora_alpha"]
            self.scale = alpha / math.sqrt(r) if acfg["use_rslora"] else alpha / r
            self.lora = {k: v.astype(np.float64) for k, v in load_file(adapter / "adapter_model.safetensors").items()}

    def linear(self, x, name):
        y = x @ self.w[name + ".weight"].T
        if name + ".bias" in self.w:
            y = y + self.w[name + ".bias"]
        a = self.lora.get(f"base_model.model.{name}.lora_A.weight")
        if a is not None:
            b = self.lora[f"base_model.model.{name}.lora_B.weight"]
            y = y + self.scale * ((x @ a.T) @ b.T)
        return y

    def norm(self, x, name):
        return rms(x, self.w[name + ".weight"], self.cfg["rms_norm_eps"], self.gemma)

    def forward(self, ids):
        c = self.cfg
        T = len(ids)
        H, nh, nkv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
        hd = c.get("head_dim") or H // nh
        layer_types = c.get("layer_types") or ["full_attention"] * c["num_hidden_layers"]
        x = self.w["model.embed_tokens.weight"][ids]
        if self.gemma and MUTANT != "no_embed_scale":
            x = x * np.float64(np.float32(math.sqrt(H)))
        pos = np.arange(T, dtype=np.float64)
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}"
            lt = layer_types[i]
            rp = c["rope_parameters"][lt] if self.gemma else c["rope_parameters"]
            factor = rp.get("factor", 1.0) if rp["rope_type"] == "linear" else 1.0
            assert rp["rope_type"] in ("default", "linear"), rp
            if MUTANT == "no_rope_scaling":
                factor = 1.0
            theta = rp["rope_theta"]
            if MUTANT == "one_rope_base" and self.gemma:
                theta = c["rope_parameters"]["full_attention"]["rope_theta"]
            h = self.norm(x, f"{p}.input_layernorm")
            q = self.linear(h, f"{p}.self_attn.q_proj").reshape(T, nh, hd)
            k = self.linear(h, f"{p}.self_attn.k_proj").reshape(T, nkv, hd)
            v = self.linear(h, f"{p}.self_attn.v_proj").reshape(T, nkv, hd)
            if self.gemma and MUTANT != "no_qk_norm":
                q = self.norm(q, f"{p}.self_attn.q_norm")
                k = self.norm(k, f"{p}.self_attn.k_norm")
            q = rope(q, pos, theta, factor, hd)
            k = rope(k, pos, theta, factor, hd)
            rep = nh // nkv
            k = np.repeat(k, rep, axis=1)
            v = np.repeat(v, rep, axis=1)
            scale = c["query_pre_attn_scalar"] ** -0.5 if self.gemma else hd**-0.5
            if MUTANT == "scale_by_head_dim":
                scale = hd**-0.5
            s = np.einsum("ihd,jhd->hij", q, k) * scale
            ii, jj = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
            allowed = jj <= ii
            if lt == "sliding_attention" and MUTANT != "no_sliding_window":
                window = c["sliding_window"] + (1 if MUTANT == "window_plus_one" else 0)
                allowed &= jj > ii - window
            s = np.where(allowed[None], s, -np.inf)
            s = np.exp(s - s.max(-1, keepdims=True))
            s = s / s.sum(-1, keepdims=True)
            o = np.einsum("hij,jhd->ihd", s, v).reshape(T, nh * hd)
            o = self.linear(o, f"{p}.self_attn.o_proj")
            if self.gemma:
                x = x + self.norm(o, f"{p}.post_attention_layernorm")
                h = self.norm(x, f"{p}.pre_feedforward_layernorm")
            else:
                x = x + o
                h = self.norm(x, f"{p}.post_attention_layernorm")
            act = gelu_tanh if self.gemma else silu
            m = self.linear(act(self.linear(h, f"{p}.mlp.gate_proj")) * self.linear(h, f"{p}.mlp.up_proj"), f"{p}.mlp.down_proj")
            x = x + (self.norm(m, f"{p}.post_feedforward_layernorm") if self.gemma else m)
        x = self.norm(x, "model.norm")
        head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        return x @ head.T


def mutants() -> int:
    global MUTANT
    d = FIX / "tiny-gemma3"
    exp = load_file(d / "expected.safetensors")
    bad = 0
    for name, what in MUTANTS.items():
        MUTANT = name
        m = Model(d)
        got = np.stack([m.forward(row) for row in exp["input_ids"]])
        diff = float(np.abs(got - exp["logits"]).max())
        caught = diff > 1e-3  # 100x the f32-vs-f64 error of the fixtures (~1e-5)
        bad += not caught
        print(f"mutant {name:22s} max|diff| = {diff:.3g} {'caught' if caught else 'NOT CAUGHT'}  ({what})")
    MUTANT = None
    return 1 if bad else 0


def main() -> int:
    if "--mutants" in sys.argv:
        return mutants()
    worst = 0.0
    for d in sorted(FIX.glob("tiny-*")):
        exp = load_file(d / "expected.safetensors")
        ids = exp["input_ids"]
        for key, adapter in (("logits", None), ("lora_logits", d / "adapter"), ("rslora_logits", d / "adapter-rslora")):
            m = Model(d, adapter)
            got = np.stack([m.forward(row) for row in ids])
            diff = float(np.abs(got - exp[key]).max())
            worst = max(worst, diff)
            print(f"{d.name:12s} {key:14s} max|numpy - torch| = {diff:.2e}")
    # Finite-difference check of a few stored LoRA gradients (float64, central differences).
    worst_rel = 0.0
    for d in sorted(FIX.glob("tiny-*")):
        exp = load_file(d / "expected.safetensors")
        m = Model(d, d / "adapter")
        prompt, comp = exp["prompt_ids"], exp["completion_ids"]
        ids = np.concatenate([prompt, comp])

        def loss() -> float:
            z = m.forward(ids)[len(prompt) - 1 : -1]
            z = z - z.max(-1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
            return -float(logp[np.arange(len(comp)), comp].sum())

        l0 = loss()
        diff = abs(l0 - float(exp["lora_loss"]))
        worst = max(worst, diff)
        print(f"{d.name:12s} lora_loss      |numpy - torch| = {diff:.2e}")
        rng = np.random.default_rng(0)
        keys = sorted(k for k in m.lora if ".layers.0." in k or ".layers.3." in k)
        model_rel = 0.0
        for key in keys[::3]:
            t = m.lora[key]
            idx = tuple(int(rng.integers(0, n)) for n in t.shape)
            eps = 1e-5
            old = t[idx]
            t[idx] = old + eps
            lp = loss()
            t[idx] = old - eps
            lm = loss()
            t[idx] = old
            fd = (lp - lm) / (2 * eps)
            g = float(exp["grad." + key][idx])
            rel = abs(fd - g) / max(abs(g), 1e-3)
            model_rel = max(model_rel, rel)
        worst_rel = max(worst_rel, model_rel)
        print(f"{d.name:12s} grad.* finite-difference spot checks: {len(keys[::3])}, worst rel err {model_rel:.2e}")
    ok = worst < 1e-4 and worst_rel < 1e-3
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
