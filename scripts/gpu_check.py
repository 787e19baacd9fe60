"""The transformers side of scripts/gpu-check.sh (run on the GPU machine): random-weight
Gemma 3 models of the published text configs, parity of rlvr's CUDA bf16 path against
transformers in bf16 on the same GPU, and the reference timings (decode; one LoRA r16
forward+backward step with PEFT). Prints one JSON object per line."""

import argparse
import json
import os
import subprocess
import tempfile
import time

import torch
import transformers

COMMON = dict(
    model_type="gemma3_text", vocab_size=262144, head_dim=256, rms_norm_eps=1e-6,
    rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=256,
    hidden_activation="gelu_pytorch_tanh", sliding_window_pattern=6,
    max_position_embeddings=32768, final_logit_softcapping=None,
    attn_logit_softcapping=None, tie_word_embeddings=True,
)
# the published google/gemma-3-*-it text configs
CONFIGS = {
    "270m": dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
                 num_attention_heads=4, num_key_value_heads=1, sliding_window=512),
    "1b": dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
               num_attention_heads=4, num_key_value_heads=1, sliding_window=512),
    "4b": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
               num_attention_heads=8, num_key_value_heads=4, sliding_window=1024,
               rope_scaling={"rope_type": "linear", "factor": 8.0}),
    "12b": dict(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                num_attention_heads=16, num_key_value_heads=8, sliding_window=1024,
                rope_scaling={"rope_type": "linear", "factor": 8.0}),
}
TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "tiny-tokenizer")


def make_models(out, names):
    for name in names:
        path = os.path.join(out, f"gemma-3-{name}")
        if os.path.exists(os.path.join(path, "config.json")):
            continue
        torch.manual_seed(0)
        config = transformers.Gemma3TextConfig(**COMMON, **CONFIGS[name])
        with torch.device("cuda"):
            model = transformers.Gemma3ForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(path)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            src = os.path.join(TOKENIZER, f)
            if os.path.exists(src):
                with open(src, "rb") as a, open(os.path.join(path, f), "wb") as b:
                    b.write(a.read())
        g = torch.Generator().manual_seed(1)
        ids = {k: torch.randint(2, 200_000, (n,), generator=g).tolist()
               for k, n in (("prompt_256", 256), ("prompt_16", 16))}
        with open(os.path.join(path, "ids.json"), "w") as f:
            json.dump(ids, f)
        print(json.dumps({"made": path}))


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, torch_dtype=torch.bfloat16, attn_implementation="eager").cuda().eval()


def parity(path, rlvr):
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = load(path)
    prompt, completion = "The capital of France is", " Paris, a city on the Seine."
    enc = tok(prompt, return_tensors="pt").input_ids.cuda()
    comp = tok(completion, add_special_tokens=False, return_tensors="pt").input_ids.cuda()
    with torch.no_grad():
        greedy = model.generate(enc, max_new_tokens=16, do_sample=False)[0, enc.shape[1]:]
        logits = model(torch.cat([enc, comp], 1)).logits.float()[0]
    lp = torch.log_softmax(logits[enc.shape[1] - 1:-1], -1)
    want_lp = lp.gather(1, comp[0].unsqueeze(1)).sum().item()
    script = f"""let m = model("{path}", #{{ device: "cuda:0", dtype: "bf16" }});
print(m.logprob("{prompt}", "{completion}"));
print(m.generate(["{prompt}"], #{{ max_tokens: 16 }})[0]);
"""
    with tempfile.NamedTemporaryFile("w", suffix=".rhai", delete=False) as f:
        f.write(script)
    out = subprocess.run([rlvr, "run", f.name], capture_output=True, text=True)
    lines = out.stdout.splitlines()
    print(json.dumps({
        "model": path, "rc": out.returncode, "stderr": out.stderr[-2000:],
        "transformers_logprob": want_lp, "rlvr_logprob": float(lines[0]) if lines else None,
        "transformers_greedy": tok.decode(greedy, skip_special_tokens=True),
        "rlvr_greedy": "\n".join(lines[1:]),
        "torch": torch.__version__, "transformers": transformers.__version__,
    }))


def decode(path, batch, tokens):
    model = load(path)
    ids = json.load(open(os.path.join(path, "ids.json")))["prompt_16"]
    x = torch.tensor([ids] * batch).cuda()
    with torch.no_grad():
        model.generate(x, max_new_tokens=4, min_new_tokens=4, do_sample=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.generate(x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        torch.cuda.synchronize()
    s = time.perf_counter() - start
    print(json.dumps({"implementation": f"transformers {transformers.__version__}", "task": "decode",
                      "model": path, "batch": batch, "tokens": tokens, "seconds": s,
                      "tokens_per_s": batch * tokens / s}))


def lora(path, batch):
    import peft
    model = load(path)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    ids = json.load(open(os.path.join(path, "ids.json")))["prompt_256"]
    x = torch.tensor([ids] * batch).cuda()

    def step():
        logits = model(x).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(2, x[:, 1:].unsqueeze(2))
        (-lp.sum()).backward()
        torch.cuda.synchronize()

    step()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    step()
    s = time.perf_counter() - start
    print(json.dumps({"implementation": f"transformers {transformers.__version__} + peft {peft.__version__}",
                      "task": "lora", "model": path, "batch": batch, "tokens": len(ids),
                      "seconds": s, "tokens_per_s": batch * len(ids) / s,
                      "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("models"); m.add_argument("--out"); m.add_argument("--names", nargs="+")
    q = sub.add_parser("parity"); q.add_argument("--model"); q.add_argument("--rlvr")
    d = sub.add_parser("decode"); d.add_argument("--model"); d.add_argument("--batch", type=int)
    d.add_argument("--tokens", type=int)
    l = sub.add_parser("lora"); l.add_argument("--model"); l.add_argument("--batch", type=int)
    a = p.parse_args()
    if a.cmd == "models":
        make_models(a.out, a.names)
    elif a.cmd == "parity":
        parity(os.path.abspath(a.model), a.rlvr)
    elif a.cmd == "decode":
        decode(a.model, a.batch, a.tokens)
    else:
        lora(a.model, a.batch)


if __name__ == "__main__":
    main()
