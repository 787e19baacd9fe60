#!/usr/bin/env python3
"""Write tests/fixtures/tiny-gemma3-gguf/: the tiny random Gemma 3 as llama.cpp would convert it.

Run by hand inside the pinned reference venv (reference/setup.sh), never in CI, after
make_model_fixtures.py has written tests/fixtures/tiny-gemma3/:

    ~/.cache/rlvr/reference-venv/bin/python reference/make_gguf_tiny_fixture.py

Nothing is downloaded. The GGUF files are written with gguf-py (the library llama.cpp's
convert_hf_to_gguf.py uses), following what the converter's `Gemma3Model` (on top of
`TextModel` / `ModelBase`) does for a Gemma3ForCausalLM checkpoint:

  * tensor names from gguf.get_tensor_name_map(MODEL_ARCH.GEMMA3, n_layers), in the order of
    model.safetensors; no lm_head (tied); **no Q/K permutation** (only LlamaModel permutes);
  * `+ 1` added to every `*norm.weight` (Gemma3RMSNorm computes x * (1 + w));
  * 1-D tensors and `*_norm.weight` always F32; with --outtype f32 everything F32, with
    --outtype q8_0 every other tensor Q8_0 via gguf.quants.quantize (token_embd included);
  * metadata: general.architecture/type/name/size_label, then TextModel.set_gguf_parameters
    (block_count, context_length, embedding_length, feed_forward_length, head_count,
    head_count_kv, rope.scaling.type/factor from rope_parameters.full_attention, rope.freq_base,
    rope.freq_base_swa from rope_parameters.sliding_attention, layer_norm_rms_epsilon,
    key_length, value_length, general.file_type), then Gemma3Model's own keys (the same ones
    again, plus attention.sliding_window), general.quantization_version, then the vocab.

The tiny model has no tokenizer files, so the vocab is a synthetic 512-entry SentencePiece-style
("llama") list: <pad> <eos> <bos> <unk>, the 256 byte tokens <0x00>..<0xFF>, then "▁w260".."▁w511".
transformers needs `tokenizer.ggml.tokens` (it takes vocab_size from its length).

Files written:
  model-f32.gguf        all tensors F32 (general.file_type 0)
  model-q8_0.gguf       2-D tensors Q8_0, norms F32 (general.file_type 7)
  expected.safetensors  input_ids, f32_logits, q8_0_logits, reference_logits, q8_0_true_config_logits
  expected.json         how transformers configured Gemma 3 from the GGUF metadata, metadata and
                        tensor-type listings of both files, and the max |Δlogit| checks

Deterministic: same pinned versions -> byte-identical GGUF files (checked by sha256 in
expected.json); the logits are float32 CPU eager with one thread.
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "fixtures" / "tiny-gemma3"
OUT = ROOT / "tests" / "fixtures" / "tiny-gemma3-gguf"
FILES = {
    "f32": ("model-f32.gguf", gguf.LlamaFileType.ALL_F32),
    "q8_0": ("model-q8_0.gguf", gguf.LlamaFileType.MOSTLY_Q8_0),
}

EXPECTED_DOC = {
    "input_ids": "i64 [2,12] the batch of tiny-gemma3/expected.json (attention mask all ones)",
    "f32_logits": "f32 [2,12,512] transformers AutoModelForCausalLM.from_pretrained(dir, gguf_file="
    "'model-f32.gguf'), i.e. with the config transformers derives from the GGUF metadata (see "
    "'transformers_config_from_gguf': NOT the tiny model's true config)",
    "q8_0_logits": "f32 [2,12,512] same for model-q8_0.gguf (Q8_0 weights dequantized to f32)",
    "reference_logits": "f32 [2,12,512] the safetensors model's own logits (true tiny config: layer_types "
    "S,S,F,S, query_pre_attn_scalar 24, linear RoPE x8 on the full layer); = tiny-gemma3 'logits'",
    "q8_0_true_config_logits": "f32 [2,12,512] the Q8_0 GGUF's dequantized weights (norms minus 1) "
    "run with the true tiny config",
}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---- the converter -------------------------------------------------------------------------------


def load_hparams() -> dict:
    # ModelBase.load_hparams: AutoConfig(...).to_dict()
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(TINY).to_dict()


def synthetic_vocab(n_vocab: int) -> tuple[list[str], list[float], list[int]]:
    T = gguf.TokenType
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"]
    types = [T.CONTROL, T.CONTROL, T.CONTROL, T.UNKNOWN]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [T.BYTE] * 256
    while len(tokens) < n_vocab:
        tokens.append(f"\u2581w{len(tokens)}")
        types.append(T.NORMAL)
    scores = [0.0 if t != T.NORMAL else -float(i - 260) for i, t in enumerate(types)]
    return tokens[:n_vocab], scores[:n_vocab], [int(t) for t in types[:n_vocab]]


def convert(path: Path, ftype: gguf.LlamaFileType) -> None:
    hparams = load_hparams()
    n_layer = hparams["num_hidden_layers"]
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, n_layer)
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA3])

    # ModelBase.prepare_tensors + Gemma3Model.modify_tensors
    with safe_open(TINY / "model.safetensors", "pt") as f:
        for name in f.keys():
            if name == "lm_head.weight":
                continue
            t = f.get_tensor(name).to(torch.float32)
            if name.endswith("norm.weight"):
                t = t + 1.0
            new_name = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
            if new_name is None:
                raise ValueError(f"Can not map tensor {name!r}")
            data = t.numpy()
            if data.ndim <= 1 or new_name.endswith("_norm.weight") or ftype == gguf.LlamaFileType.ALL_F32:
                qtype = gguf.GGMLQuantizationType.F32
            elif ftype == gguf.LlamaFileType.MOSTLY_Q8_0:
                qtype = gguf.GGMLQuantizationType.Q8_0
            else:
                raise ValueError(ftype)
            data = gguf.quants.quantize(data, qtype)
            writer.add_tensor(new_name, data, raw_dtype=qtype)

    # ModelBase.prepare_metadata
    total, shared, expert, n_expert = writer.get_total_parameter_count()
    meta = gguf.Metadata.load(None, TINY, None, total)
    if meta.name is None:
        meta.name = TINY.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, n_expert)
    writer.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(writer)

    # TextModel.set_gguf_parameters
    rope = hparams.get("rope_parameters", hparams.get("rope_scaling")) or {}
    rope_full = rope.get("full_attention", rope)
    writer.add_block_count(n_layer)
    writer.add_context_length(hparams["max_position_embeddings"])
    writer.add_embedding_length(hparams["hidden_size"])
    writer.add_feed_forward_length(hparams["intermediate_size"])
    writer.add_head_count(hparams["num_attention_heads"])
    writer.add_head_count_kv(hparams["num_key_value_heads"])
    if rope_full.get("rope_type") == "linear" and rope_full.get("factor") is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope_full["factor"])
    if (theta := rope_full.get("rope_theta")) is not None:
        writer.add_rope_freq_base(theta)
    if (theta_swa := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        writer.add_rope_freq_base_swa(theta_swa)
    writer.add_layer_norm_rms_eps(hparams["rms_norm_eps"])
    writer.add_key_length(hparams["head_dim"])
    writer.add_value_length(hparams["head_dim"])
    writer.add_file_type(ftype)

    # Gemma3Model.set_gguf_parameters (re-sets most keys with the same values; gguf-py keeps the
    # first position of a key and overwrites its value, logging a 'Duplicated key' warning)
    import logging

    logging.getLogger("gguf.gguf_writer").setLevel(logging.ERROR)
    writer.add_context_length(hparams.get("max_position_embeddings", 131072))
    writer.add_head_count(hparams.get("num_attention_heads", 8))
    writer.add_layer_norm_rms_eps(hparams.get("rms_norm_eps", 1e-6))
    writer.add_key_length(hparams.get("head_dim", 256))
    writer.add_value_length(hparams.get("head_dim", 256))
    writer.add_rope_freq_base(rope.get("full_attention", rope).get("rope_theta", 1_000_000.0))
    assert hparams.get("attn_logit_softcapping") is None
    if final_softcap := hparams.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(final_softcap)
    if hparams.get("sliding_window_pattern") != 1:
        writer.add_sliding_window(hparams["sliding_window"])
    writer.add_head_count_kv(hparams.get("num_key_value_heads", 4))

    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    # TextModel._set_vocab_sentencepiece (synthetic pieces) + Gemma3Model.set_vocab
    tokens, scores, toktypes = synthetic_vocab(hparams["vocab_size"])
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(toktypes)
    special = gguf.SpecialVocab(TINY, n_vocab=len(tokens))  # bos 2, eos 1, pad 0 from config.json
    special._set_special_token("unk", 3)  # Gemma's tokenizer files would add these three
    special.add_special_token["bos"] = True
    special.add_special_token["eos"] = False
    special.add_to_gguf(writer)
    writer.add_add_space_prefix(False)

    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


# ---- inspection ----------------------------------------------------------------------------------


def gguf_listing(path: Path) -> dict:
    reader = gguf.GGUFReader(str(path))
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if field.types and field.types[0] == gguf.GGUFValueType.ARRAY:
            meta[key] = f"<array of {len(field.data)}>"
            continue
        val = field.parts[field.data[0]]
        if field.types[0] == gguf.GGUFValueType.STRING:
            meta[key] = bytes(val).decode("utf-8")
        else:
            meta[key] = val.tolist()[0]
    tensors = {t.name: {"type": t.tensor_type.name, "shape": [int(x) for x in t.shape]} for t in reader.tensors}
    counts: dict[str, int] = {}
    for t in reader.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return {
        "file": path.name,
        "bytes": path.stat().st_size,
        "sha256": sha256(path),
        "metadata": meta,
        "tensor_count": len(reader.tensors),
        "tensor_types": counts,
        "tensors_layer0_and_global": {
            n: v for n, v in tensors.items() if n.startswith("blk.0.") or not n.startswith("blk.")
        },
        "tensor_order": [t.name for t in reader.tensors],
    }


def dequantized_state_dict(path: Path, n_layer: int) -> dict[str, torch.Tensor]:
    """HF-named float32 weights from a GGUF, norms minus the 1 the converter added (independent
    of transformers' GGUF loader)."""
    inv = {}
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, n_layer)
    with safe_open(TINY / "model.safetensors", "pt") as f:
        for name in f.keys():
            inv[tmap.get_name(name, try_suffixes=(".weight", ".bias"))] = name
    sd = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        w = torch.from_numpy(np.array(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32))
        hf = inv[t.name]
        if hf.endswith("norm.weight"):
            w = w - 1.0
        sd[hf] = w
    return sd


# ---- main ----------------------------------------------------------------------------------------


def main() -> None:
    torch.set_num_threads(int(os.environ.get("RLVR_THREADS", "1")))
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, Gemma3ForCausalLM

    OUT.mkdir(parents=True, exist_ok=True)
    for fname, ftype in FILES.values():
        convert(OUT / fname, ftype)

    tiny_expected = json.loads((TINY / "expected.json").read_text())
    input_ids = torch.tensor(tiny_expected["input_ids"], dtype=torch.int64)
    mask = torch.ones_like(input_ids)
    with safe_open(TINY / "expected.safetensors", "pt") as f:
        stored_tiny_logits = f.get_tensor("logits")

    def logits(model) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=mask).logits.float().contiguous()

    ref_model = Gemma3ForCausalLM.from_pretrained(TINY, dtype=torch.float32, attn_implementation="eager").eval()
    ref_cfg = ref_model.config
    reference = logits(ref_model)

    out: dict[str, torch.Tensor] = {"input_ids": input_ids, "reference_logits": reference}
    tf_cfgs = {}
    true_cfg_logits = {}
    for key, (fname, _) in FILES.items():
        m = AutoModelForCausalLM.from_pretrained(
            OUT, gguf_file=fname, dtype=torch.float32, attn_implementation="eager"
        ).eval()
        assert {p.dtype for p in m.parameters()} == {torch.float32}
        out[f"{key}_logits"] = logits(m)
        tf_cfgs[key] = m.config.to_dict()
        # same weights, true tiny config
        m2 = Gemma3ForCausalLM(ref_cfg).eval()
        missing, unexpected = m2.load_state_dict(dequantized_state_dict(OUT / fname, ref_cfg.num_hidden_layers), strict=False)
        assert unexpected == [] and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
        m2.tie_weights()
        true_cfg_logits[key] = logits(m2)
    out["q8_0_true_config_logits"] = true_cfg_logits["q8_0"]
    save_file({k: v.contiguous() for k, v in out.items()}, OUT / "expected.safetensors")

    def mad(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a - b).abs().max())

    cfg = tf_cfgs["f32"]
    assert cfg == tf_cfgs["q8_0"] or {k: v for k, v in cfg.items() if k != "quantization_config"} == {
        k: v for k, v in tf_cfgs["q8_0"].items() if k != "quantization_config"
    }
    keys = [
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "layer_types",
        "sliding_window", "_sliding_window_pattern", "query_pre_attn_scalar", "rope_parameters",
        "hidden_activation", "final_logit_softcapping", "attn_logit_softcapping", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id",
    ]
    true_cfg = ref_cfg.to_dict()
    tf_vals = {k: cfg.get(k) for k in keys}
    true_vals = {k: true_cfg.get(k) for k in keys}
    diffs = {k: {"from_gguf": tf_vals[k], "tiny_config": true_vals[k]} for k in keys if tf_vals[k] != true_vals[k]}

    listings = {key: gguf_listing(OUT / fname) for key, (fname, _) in FILES.items()}
    summary = {
        "model": "tiny-gemma3 converted to GGUF the way llama.cpp's convert_hf_to_gguf.py (Gemma3Model) does",
        "source": "tests/fixtures/tiny-gemma3/model.safetensors + config.json",
        "script": "reference/make_gguf_tiny_fixture.py",
        "versions": {n: version(n) for n in ("torch", "transformers", "gguf", "safetensors", "numpy")},
        "attn_implementation": "eager",
        "dtype": "float32",
        "tensors": EXPECTED_DOC,
        "input_ids": input_ids.tolist(),
        "conventions": {
            "tensor_names": "gguf.get_tensor_name_map(MODEL_ARCH.GEMMA3): embed_tokens->token_embd, "
            "input_layernorm->attn_norm, self_attn.{q,k,v,o}_proj->attn_{q,k,v,output}, "
            "self_attn.{q,k}_norm->attn_{q,k}_norm, post_attention_layernorm->post_attention_norm, "
            "pre_feedforward_layernorm->ffn_norm, post_feedforward_layernorm->post_ffw_norm, "
            "mlp.{gate,up,down}_proj->ffn_{gate,up,down}, model.norm->output_norm; no output.weight (tied)",
            "norms": "every *norm.weight is stored as 1 + w (HF weight w); a loader must subtract 1 or use "
            "x * w_gguf",
            "qk_permute": False,
            "shapes": "GGUF shapes are ggml order [ne0=in, ne1=out]; the bytes are the row-major HF "
            "[out, in] matrix (Q8_0: 34-byte blocks of 32 along the in dimension: f16 scale + 32 i8)",
            "q8_0_types": "2-D tensors (token_embd and all projections) Q8_0; 1-D norms F32",
            "vocab": "synthetic 512 SentencePiece-style pieces (the tiny model has no tokenizer); "
            "tokenizer.ggml.* is there only for llama.cpp-style readers and transformers' vocab_size",
        },
        "gguf_files": listings,
        "transformers_config_from_gguf": {
            "values": tf_vals,
            "differs_from_tiny_config": diffs,
            "note": "transformers 5.24's GGUF loader maps only context_length, block_count, "
            "feed_forward_length, embedding_length, rope.freq_base (-> rope_theta, i.e. the "
            "full_attention base), attention.key_length (-> head_dim), head_count, head_count_kv, "
            "layer_norm_rms_epsilon, sliding_window (and vocab_size from the token list). It ignores "
            "rope.freq_base_swa and rope.scaling.*, so the rest are Gemma3TextConfig defaults: "
            "sliding base 10000, no RoPE scaling, sliding_window_pattern 6 (layer i is full iff "
            "(i+1) % 6 == 0, so all 4 tiny layers are sliding), query_pre_attn_scalar 256",
            "full": cfg,
        },
        "tiny_config_values": true_vals,
        "checks": {
            "f32_gguf_transformers_vs_reference_max_abs_diff": mad(out["f32_logits"], reference),
            "f32_gguf_true_config_vs_reference_max_abs_diff": mad(true_cfg_logits["f32"], reference),
            "q8_0_gguf_transformers_vs_f32_gguf_transformers_max_abs_diff": mad(out["q8_0_logits"], out["f32_logits"]),
            "q8_0_true_config_vs_reference_max_abs_diff": mad(true_cfg_logits["q8_0"], reference),
            "reference_vs_stored_tiny_gemma3_logits_max_abs_diff": mad(reference, stored_tiny_logits),
        },
    }
    (OUT / "expected.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False) + "\n")

    for key, lst in listings.items():
        print(f"{lst['file']}: {lst['bytes']} bytes, tensor types {lst['tensor_types']}, sha256 {lst['sha256'][:16]}…")
    print("metadata keys:", list(listings["f32"]["metadata"]))
    print("transformers config differs from tiny config:", json.dumps(diffs))
    for k, v in summary["checks"].items():
        print(f"{k}: {v:.3g}")


if __name__ == "__main__":
    main()
