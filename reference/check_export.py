#!/usr/bin/env python3
"""Check that folders written by rlvr's `merge_and_save` load in transformers and behave as
the references say. Run by hand inside the pinned reference venv, never in CI, after
writing the folders with rlvr (the aliases fetched with `rlvr models fetch`):

    cat > /tmp/export_all.rhai <<'RHAI'
    model("tests/fixtures/tiny-gemma3", #{ tokenizer: "tests/fixtures/tiny-tokenizer/tokenizer.json" })
        .load_adapter("tests/fixtures/tiny-gemma3/adapter").merge_and_save("/tmp/merged-tiny");
    model("gemma-3-270m").merge_and_save("/tmp/merged-gemma");
    model("smollm2-135m-instruct").merge_and_save("/tmp/merged-smol");
    RHAI
    rlvr run /tmp/export_all.rhai
    ~/.cache/rlvr/reference-venv/bin/python reference/check_export.py /tmp/merged-tiny /tmp/merged-gemma /tmp/merged-smol

Checks: tiny-gemma3 with its PEFT adapter merged gives PEFT's `lora_logits`; the exported
gemma-3-270m (dequantized from GGUF) gives the greedy tokens and log-probs of
tests/fixtures/gemma-3-270m/greedy.json; the exported SmolLM2 (tokenizer rebuilt from the
GGUF metadata) tokenizes, renders its chat template and decodes greedily as
tests/fixtures/smollm2-135m-instruct/expected.json says.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent


def load(folder: str):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def check_tiny(folder: str) -> None:
    exp = load_file(ROOT / "tests/fixtures/tiny-gemma3/expected.safetensors")
    with torch.no_grad():
        out = load(folder)(input_ids=exp["input_ids"], attention_mask=exp["attention_mask"]).logits
    diff = (out - exp["lora_logits"])[exp["attention_mask"].bool()].abs().max().item()
    print(f"tiny-gemma3 + adapter merged: max |Δlogit| vs PEFT = {diff:.2e}")
    assert diff < 1e-4


def greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(
        input_ids=torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None
    )
    return out[0, len(ids) :].tolist()


def check_gemma(folder: str) -> None:
    fixture = json.loads((ROOT / "tests/fixtures/gemma-3-270m/greedy.json").read_text())
    model, tok = load(folder), AutoTokenizer.from_pretrained(folder)
    worst = 0.0
    for p in fixture["prompts"]:
        ids = tok(p["prompt"])["input_ids"]
        assert ids == p["prompt_ids"], p["prompt"]
        assert greedy(model, ids, len(p["greedy_ids"])) == p["greedy_ids"], p["prompt"]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + p["greedy_ids"]])).logits[0, len(ids) - 1 : -1]
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(p["greedy_ids"]).unsqueeze(-1)).squeeze(-1)
        worst = max(worst, (lp - torch.tensor(p["logprobs"])).abs().max().item())
    print(f"gemma-3-270m exported: greedy tokens equal, max |Δlogprob| = {worst:.2e}")
    assert worst < 1e-3


def check_smollm2(folder: str) -> None:
    fixture = json.loads((ROOT / "tests/fixtures/smollm2-135m-instruct/expected.json").read_text())
    model, tok = load(folder), AutoTokenizer.from_pretrained(folder)
    for c in fixture["strings"]:
        assert tok(c["text"])["input_ids"] == c["ids"], c["text"]
        assert tok(c["text"], add_special_tokens=False)["input_ids"] == c["ids_plain"], c["text"]
    chat = fixture["chat"]
    assert tok.apply_chat_template(chat["messages"], tokenize=False, add_generation_prompt=True) == chat["rendered"]
    for p in fixture["greedy"]:
        assert greedy(model, p["prompt_ids"], len(p["greedy_ids"])) == p["greedy_ids"], p["prompt"]
    print("smollm2-135m-instruct exported: tokenizer, chat template and greedy tokens equal")


def main() -> None:
    torch.set_num_threads(2)
    tiny, gemma, smollm2 = sys.argv[1:4]
    check_tiny(tiny)
    check_gemma(gemma)
    check_smollm2(smollm2)


if __name__ == "__main__":
    main()
