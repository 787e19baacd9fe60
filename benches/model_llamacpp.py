#!/usr/bin/env python3
"""The llama.cpp side of the model benchmark (benches/model.sh), through llama-cpp-python's
low-level API on the same GGUF and the same token ids as `rlvr bench model`.

    python benches/model_llamacpp.py --model GGUF --ids /tmp/rlvr-bench-ids.json \
        --task prefill|decode [--batch N] [--tokens N] [--threads N]

Unlike rlvr and transformers (which dequantize the GGUF to f32), llama.cpp multiplies with
its quantized Q4_K_M kernels, so this row is the speed of the quantized engine, not of the
same arithmetic. Tasks (each prints ONE JSON line; "seconds" covers the measured work only):

- prefill: one `llama_decode` of the 256 `prompt_256` ids, logits of the last position only.
- decode: `--batch` sequences of the 16 `prompt_16` ids (each its own sequence id in one
  batch), then `--tokens` greedy steps, one token per sequence per `llama_decode`, argmax
  taken over the logits in numpy; timed from the prompt's decode to the last token.
"""

import argparse
import json
import os
import resource
import time
from pathlib import Path

import llama_cpp as ll
import numpy as np


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Engine:
    def __init__(self, gguf: Path, n_ctx: int, n_seq: int, threads: int):
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        self.model = ll.llama_model_load_from_file(str(gguf).encode(), mparams)
        if not self.model:
            raise SystemExit(f"llama.cpp could not load {gguf}")
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = max(n_ctx, 512)
        cparams.n_ubatch = max(n_ctx, 512)
        cparams.n_seq_max = n_seq
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        vocab = ll.llama_model_get_vocab(self.model)
        self.n_vocab = ll.llama_vocab_n_tokens(vocab)

    def clear(self) -> None:
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)

    def decode(self, rows: list[tuple[int, int, int, bool]]) -> None:
        """rows: (token, position, sequence id, wants logits)."""
        batch = ll.llama_batch_init(len(rows), 0, 1)
        try:
            for i, (tok, pos, seq, logits) in enumerate(rows):
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = logits
            batch.n_tokens = len(rows)
            rc = ll.llama_decode(self.ctx, batch)
            if rc != 0:
                raise SystemExit(f"llama_decode returned {rc}")
        finally:
            ll.llama_batch_free(batch)

    def argmax(self, i: int) -> int:
        ptr = ll.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())


def bench_prefill(engine: Engine, ids: list[int]) -> float:
    def once() -> float:
        engine.clear()
        start = time.perf_counter()
        engine.decode([(t, p, 0, p == len(ids) - 1) for p, t in enumerate(ids)])
        engine.argmax(-1)
        return time.perf_counter() - start

    once()  # warm-up, as the other two sides
    return once()


def bench_decode(engine: Engine, prompt: list[int], batch: int, new_tokens: int) -> float:
    engine.clear()
    start = time.perf_counter()
    rows = []
    for s in range(batch):
        rows += [(t, p, s, p == len(prompt) - 1) for p, t in enumerate(prompt)]
    engine.decode(rows)
    # the logits of row i are at batch index (i + 1) * len(prompt) - 1
    last = [engine.argmax((s + 1) * len(prompt) - 1) for s in range(batch)]
    for step in range(1, new_tokens):
        pos = len(prompt) + step - 1
        engine.decode([(last[s], pos, s, True) for s in range(batch)])
        last = [engine.argmax(s) for s in range(batch)]
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--ids", type=Path, required=True)
    parser.add_argument("--task", choices=["prefill", "decode"], required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    ids = json.loads(args.ids.read_text())
    if args.task == "prefill":
        prompt = ids["prompt_256"]
        engine = Engine(args.model, 512, 1, args.threads)
        seconds, batch, tokens = bench_prefill(engine, prompt), 1, len(prompt)
    else:
        prompt = ids["prompt_16"]
        n_ctx = args.batch * (len(prompt) + args.tokens)
        engine = Engine(args.model, max(n_ctx, 512), args.batch, args.threads)
        seconds = bench_decode(engine, prompt, args.batch, args.tokens)
        batch, tokens = args.batch, args.tokens
    line = {
        "impl": f"llama.cpp (llama-cpp-python {ll.__version__}, Q4_K_M kernels)",
        "task": args.task,
        "batch": batch,
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": batch * tokens / seconds,
        "peak_rss_mib": peak_rss_mib(),
        "threads": args.threads,
    }
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
