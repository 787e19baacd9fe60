#!/usr/bin/env python3
"""Check that an adapter rlvr saved after GRPO training loads in PEFT and gives rlvr's logits.

Run by hand inside the pinned reference venv (reference/setup.sh), never in CI:

    RLVR_PEFT_CHECK_DIR=/tmp/rlvr-peft-check \\
        cargo test --test integration an_adapter_saved_after_grpo_reloads_with_equal_logits
    ~/.cache/rlvr/reference-venv/bin/python reference/check_grpo_adapter.py /tmp/rlvr-peft-check

The test (tests/integration/grpo.rs) trains the tiny Gemma 3 fixture's LoRA adapters (rank 8,
alpha 16, every linear layer) for three GRPO steps, saves them with `save_adapter` to
DIR/adapter, and writes DIR/logits.safetensors: `input_ids` [2, n], and the logits rlvr
computes for them with the adapter on (`logits`) and off (`base_logits`).

This script loads tests/fixtures/tiny-gemma3 with transformers (float32, eager attention),
attaches DIR/adapter with `PeftModel.from_pretrained`, and compares its logits with rlvr's,
with the adapter on and off (`disable_adapter()`). It exits non-zero when either differs by
more than 1e-4.
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 1e-4


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    folder = Path(sys.argv[1])
    adapter = folder / "adapter"
    rlvr = load_file(str(folder / "logits.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(
        str(ROOT / "tests/fixtures/tiny-gemma3"), dtype=torch.float32, attn_implementation="eager"
    )
    model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()
    ids = rlvr["input_ids"].long()
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            plain = model(input_ids=ids).logits

    diff_tuned = (tuned - rlvr["logits"]).abs().max().item()
    diff_base = (plain - rlvr["base_logits"]).abs().max().item()
    moved = (rlvr["logits"] - rlvr["base_logits"]).abs().max().item()
    result = {
        "adapter": str(adapter),
        "r": config["r"],
        "lora_alpha": config["lora_alpha"],
        "target_modules": config["target_modules"],
        "input_ids_shape": list(ids.shape),
        "max_abs_diff_with_adapter": diff_tuned,
        "max_abs_diff_without_adapter": diff_base,
        "adapter_effect_max_abs": moved,
        "tolerance": TOLERANCE,
        "versions": {p: version(p) for p in ("torch", "transformers", "peft")},
    }
    print(json.dumps(result, indent=2))
    if not (diff_tuned <= TOLERANCE and diff_base <= TOLERANCE):
        sys.exit("FAIL: PEFT's logits differ from rlvr's")
    print("OK: the adapter rlvr saved after GRPO gives rlvr's logits in PEFT")


if __name__ == "__main__":
    main()
