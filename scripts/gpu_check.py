"""The Python side of scripts/gpu-check.sh (run on the GPU machine): random-weight Gemma 3
models of the published text configs, parity of rlvr's CUDA bf16 path against transformers
in bf16 on the same GPU, the reference timings (decode; one LoRA r16 forward+backward step
with PEFT; GRPO steps with transformers + PEFT), and the peak GPU memory of a command.
Prints one JSON object per line. `models --device cpu --names tiny` and `grpo --device cpu`
run on a CPU, to check the script itself."""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import torch
import transformers

HERE = os.path.dirname(os.path.abspath(__file__))
# transformers 4.56 renamed from_pretrained's torch_dtype to dtype
_VERSION = tuple(int(x) for x in transformers.__version__.split(".")[:2])
DTYPE_KW = "dtype" if _VERSION >= (4, 56) else "torch_dtype"
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}

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
    # not a published config: the smallest model with Gemma's vocabulary, for checking these
    # scripts on a CPU
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                 sliding_window=512, sliding_window_pattern=2),
}
# the logits' standard deviation of the random-weight models (see make_models)
LOGIT_STD = 5.0
# Gemma 3's tokenizer (tokenizer.json, tokenizer_config.json), unpacked by gpu-check.sh from
# what build-cuda.sh packed; the 512-token test tokenizer where it is absent
GEMMA_TOKENIZER = os.path.join(HERE, "..", "gpu", "tokenizer")
TINY_TOKENIZER = os.path.join(HERE, "..", "tests", "fixtures", "tiny-tokenizer")


def make_models(out, names, device="cuda", tokenizer=None):
    """Random-weight models (seed 0) in bf16 under `out`, with a tokenizer and token ids."""
    if tokenizer is None:
        gemma = os.path.join(GEMMA_TOKENIZER, "tokenizer.json")
        tokenizer = GEMMA_TOKENIZER if os.path.exists(gemma) else TINY_TOKENIZER
    for name in names:
        path = os.path.join(out, f"gemma-3-{name}")
        if os.path.exists(os.path.join(path, "config.json")):
            continue
        torch.manual_seed(0)
        config = transformers.Gemma3TextConfig(**{**COMMON, **CONFIGS[name]})
        # made in bf16 directly: the 12b config in f32 would need 47 GB
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                model = transformers.Gemma3ForCausalLM(config)
        finally:
            torch.set_default_dtype(default)
        # transformers' init gives logits of std 0.02·√hidden (0.5 to 1.2 for these configs):
        # an almost uniform next-token distribution over 262,144 tokens (entropy ≈ 12 nats),
        # unlike any trained model's, and the worst case for rlvr's sampler (its walk from the
        # most likely token down would sort half the vocabulary per token). The final norm's
        # scale (Gemma applies 1 + weight) brings their std to LOGIT_STD: entropy ≈ 3 nats.
        with torch.no_grad():
            model.model.norm.weight.fill_(
                LOGIT_STD / (config.initializer_range * config.hidden_size ** 0.5) - 1)
        model.save_pretrained(path)
        del model
        for f in ("tokenizer.json", "tokenizer_config.json"):
            src = os.path.join(tokenizer, f)
            if os.path.exists(src):
                with open(src, "rb") as a, open(os.path.join(path, f), "wb") as b:
                    b.write(a.read())
        g = torch.Generator().manual_seed(1)
        ids = {k: torch.randint(2, 200_000, (n,), generator=g).tolist()
               for k, n in (("prompt_256", 256), ("prompt_16", 16))}
        with open(os.path.join(path, "ids.json"), "w") as f:
            json.dump(ids, f)
        print(json.dumps({"made": path, "tokenizer": os.path.abspath(tokenizer)}), flush=True)


def load(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, **{DTYPE_KW: torch.bfloat16}, attn_implementation="eager").cuda().eval()


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


class DeviceMemory:
    """The most GPU memory in use on the device while it runs, less what was in use when it
    started, from `nvidia-smi` every 100 ms: the footprint of what runs meanwhile on an
    otherwise idle GPU (CUDA context, libraries' workspaces and allocator caches included).
    `peak_mib` is None where nvidia-smi is absent."""

    def __init__(self):
        self.base = self.peak = None
        try:
            self.proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                 "--id=0", "-lms", "100"], stdout=subprocess.PIPE, text=True)
        except FileNotFoundError:
            self.proc = None
            return
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        while self.base is None and self.proc.poll() is None:
            time.sleep(0.01)

    def _read(self):
        for line in self.proc.stdout:
            try:
                used = float(line.strip())
            except ValueError:
                continue
            if self.base is None:
                self.base = used
            self.peak = max(self.peak or used, used)

    def stop(self):
        if self.proc is None:
            return None
        time.sleep(0.3)  # one more sample after the work
        self.proc.terminate()
        self.proc.wait()
        self.thread.join(timeout=5)
        return None if self.peak is None else self.peak - self.base


def sampled(cmd, fits_gib):
    """Runs `cmd`, passes on the JSON object of its last stdout line with the device's
    memory peak (`DeviceMemory`) added, and whether that peak fits a `fits_gib` GiB card.
    A failure is one JSON object too, with the command's exit status and stderr."""
    memory = DeviceMemory()
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    peak = memory.stop()
    lines = [line for line in run.stdout.splitlines() if line.strip().startswith("{")]
    record = json.loads(lines[-1]) if run.returncode == 0 and lines else {
        "command": cmd, "rc": run.returncode, "stderr": run.stderr[-3000:]}
    record.setdefault("command", cmd)
    record["wall_s"] = wall
    record["gpu_used_peak_mib"] = peak
    if fits_gib:
        fits = [v for v in (peak, (record.get("peak_gpu") or {}).get("reserved_mib")) if v]
        record[f"fits_{fits_gib:g}gib"] = max(fits) <= fits_gib * 1024 if fits else None
    print(json.dumps(record), flush=True)
    return run.returncode


def grpo(a):
    """GRPO steps with transformers + PEFT, written out (TRL may be absent), as
    `rlvr bench grpo` runs them with the `default` preset: the first `prompts` MedQA test
    questions in the study's prompt (benches/grpo_trl.py: its system prompt, chat template,
    rewards), `group` completions each sampled at temperature 1 with the live adapters,
    group-scaled advantages, the dapo loss (token sum over the whole batch), one micro-batch
    per group, gradient clip 1, AdamW lr 1e-5. LoRA r, alpha 2r, f32, on every linear layer
    of every block; frozen weights in `dtype`. Time and peak memory per step."""
    import peft
    sys.path.insert(0, os.path.join(HERE, "..", "benches"))
    from grpo_trl import LORA_TARGETS, accuracy, format_, medqa_rows, xmlcount

    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    cuda = device.type == "cuda"
    memory = DeviceMemory() if cuda else None
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    started = time.perf_counter()
    tok = transformers.AutoTokenizer.from_pretrained(a.model)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        a.model, **{DTYPE_KW: dtype}, attn_implementation="sdpa").to(device)
    model = peft.get_peft_model(model, peft.LoraConfig(
        r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
        bias="none", task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sync()
    load_s = time.perf_counter() - started

    rows = medqa_rows(a.data, a.prompts)
    prompts = [tok.apply_chat_template(r["prompt"], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for r in rows]
    g = a.group
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    stops = sorted({t for t in (tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>"))
                    if isinstance(t, int) and t != tok.unk_token_id})
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts for _ in range(g)],
                       device=device)
    prompt_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p)
                                for p in prompts for _ in range(g)], device=device)
    steps = []
    for _ in range(a.steps):
        sync()
        t0 = time.perf_counter()
        # 1. sample with the live adapters
        model.eval()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=prompt_mask, do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=a.max_tokens,
                                 pad_token_id=pad, eos_token_id=stops)
        completion = out[:, width:]
        done = torch.isin(completion, torch.tensor(stops, device=device))
        # a completion ends with its first stop token, which it keeps
        after = (done.cumsum(1) - done.long()) > 0
        comp_mask = (~after).long()
        lengths = comp_mask.sum(1).tolist()
        sync()
        t1 = time.perf_counter()
        # 2. rewards, advantages
        texts = [tok.decode(c[:n], skip_special_tokens=True) for c, n in zip(completion, lengths)]
        answers = [r["answer"] for r in rows for _ in range(g)]
        answer_texts = [r["answer_text"] for r in rows for _ in range(g)]
        totals = torch.tensor([sum(v) for v in zip(
            accuracy(texts, answers, answer_texts), format_(texts), xmlcount(texts))])
        groups = totals.view(-1, g)
        adv = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4))
        adv = adv.view(-1).to(device)
        t2 = time.perf_counter()
        # 3. loss, backward per group, clip, AdamW
        model.train()
        total_tokens = max(sum(lengths), 1)
        t = completion.shape[1]
        for k in range(a.prompts):
            part = slice(k * g, (k + 1) * g)
            mask = torch.cat([prompt_mask[part], comp_mask[part]], 1)
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            logits = model(input_ids=out[part], attention_mask=mask, position_ids=positions,
                           logits_to_keep=t + 1).logits[:, :-1]
            targets = completion[part]
            # row by row, as TRL's selective_log_softmax does for bf16 logits
            logps = torch.stack([torch.log_softmax(row.float(), -1)
                                 .gather(-1, tg.unsqueeze(-1)).squeeze(-1)
                                 for row, tg in zip(logits, targets)])
            ratio = torch.exp(logps - logps.detach())
            adv_k = adv[part].unsqueeze(1)
            per_token = -torch.min(ratio * adv_k, torch.clamp(ratio, 0.8, 1.2) * adv_k)
            loss = (per_token * comp_mask[part]).sum() / total_tokens
            loss.backward()
            del logits, logps, ratio, per_token, loss
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        steps.append({"step_s": t3 - t0, "gen_s": t1 - t0, "reward_s": t2 - t1,
                      "train_s": t3 - t2, "completion_len": sum(lengths) / len(lengths)})
    mean = lambda key: sum(s[key] for s in steps) / len(steps)  # noqa: E731
    record = {
        "impl": f"transformers {transformers.__version__} + peft {peft.__version__} "
                f"+ torch {torch.__version__} (GRPO loop in scripts/gpu_check.py)",
        "model": a.model, "device": a.device, "dtype": a.dtype, "group": g,
        "prompts": a.prompts, "max_tokens": a.max_tokens, "rank": a.rank, "steps": a.steps,
        "prompt_tokens": [len(p) for p in prompts], "load_s": load_s,
        "step_s": mean("step_s"), "gen_s": mean("gen_s"), "reward_s": mean("reward_s"),
        "train_s": mean("train_s"), "per_step": steps,
        "peak_gpu": {"used_mib": torch.cuda.max_memory_allocated() / 2**20,
                     "reserved_mib": torch.cuda.max_memory_reserved() / 2**20} if cuda else None,
    }
    record["gpu_used_peak_mib"] = memory.stop() if memory else None
    print(json.dumps(record), flush=True)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("models"); m.add_argument("--out"); m.add_argument("--names", nargs="+")
    m.add_argument("--device", default="cuda")
    m.add_argument("--tokenizer", help="folder with tokenizer.json (default: gpu/tokenizer, "
                   "else the 512-token test tokenizer)")
    q = sub.add_parser("parity"); q.add_argument("--model"); q.add_argument("--rlvr")
    d = sub.add_parser("decode"); d.add_argument("--model"); d.add_argument("--batch", type=int)
    d.add_argument("--tokens", type=int)
    l = sub.add_parser("lora"); l.add_argument("--model"); l.add_argument("--batch", type=int)
    r = sub.add_parser("grpo")
    r.add_argument("--model", required=True)
    r.add_argument("--data", default=os.path.join(HERE, "..", "data", "samples", "medqa"))
    r.add_argument("--group", type=int, default=8)
    r.add_argument("--prompts", type=int, default=2)
    r.add_argument("--max-tokens", type=int, default=512)
    r.add_argument("--rank", type=int, default=16)
    r.add_argument("--steps", type=int, default=2)
    r.add_argument("--device", default="cuda")
    r.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    s_ = sub.add_parser("sampled", help="run a command, add the GPU's memory peak to its JSON")
    s_.add_argument("--fits-gib", type=float, help="also say whether the peak fits this many GiB")
    s_.add_argument("command", nargs=argparse.REMAINDER)
    a = p.parse_args()
    if a.cmd == "models":
        make_models(a.out, a.names, a.device, a.tokenizer)
    elif a.cmd == "parity":
        parity(os.path.abspath(a.model), a.rlvr)
    elif a.cmd == "decode":
        decode(a.model, a.batch, a.tokens)
    elif a.cmd == "lora":
        lora(a.model, a.batch)
    elif a.cmd == "grpo":
        from pathlib import Path
        a.data = Path(a.data)
        grpo(a)
    else:
        cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
        sys.exit(sampled(cmd, a.fits_gib))


if __name__ == "__main__":
    main()
