"""lm-eval's `local-completions` model (its log-likelihood requests: context + continuation
as token ids, BOS first, `echo: true, logprobs: 1, max_tokens: 1`, the sum of
`token_logprobs[ctxlen:-1]`)
on MMLU questions of the data sample, against an OpenAI-compatible server; for
benches/lm_eval_loglik_serve.sh. Writes each question's option log-likelihoods and prediction.

    python benches/lm_eval_completions.py --base-url http://127.0.0.1:8000/v1/completions \
        --model served --tokenizer DIR --data data/samples/mmlu --subjects a,b --out preds.json
"""

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from eval_lm_eval import mmlu_task  # noqa: E402
from lm_eval.models.openai_completions import LocalCompletionsAPI  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--subjects", required=True)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    lm = LocalCompletionsAPI(
        base_url=args.base_url,
        model=args.model,
        tokenizer=args.tokenizer,
        tokenizer_backend="huggingface",
        # lm-eval's API models add no BOS unless asked; Gemma needs it (the hf backend and
        # rlvr add it, as the tokenizer does)
        add_bos_token=True,
        num_concurrent=1,
        max_retries=1,
    )
    requests, owners = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for subject in args.subjects.split(","):
            t = mmlu_task(args.data, subject, Path(tmp))
            t.set_config(key="num_fewshot", value=0)
            t.set_fewshot_seed(seed=1234)
            t.build_all_requests(rank=0, world_size=1)
            for inst in t.instances:
                requests.append(inst)
                owners.append(f"mmlu/test/{subject}/{inst.doc_id}")
    start = time.perf_counter()
    scores = lm.loglikelihood(requests)
    seconds = time.perf_counter() - start
    by_doc = {}
    for owner, inst, (ll, _) in zip(owners, requests, scores):
        by_doc.setdefault(owner, []).append((inst.idx, ll))
    preds = {}
    for owner, options in by_doc.items():
        options.sort()
        best = max(range(len(options)), key=lambda i: (options[i][1], -i))
        preds[owner] = {"pred": "ABCD"[best], "logprobs": [ll for _, ll in options]}
    args.out.write_text(json.dumps({"seconds": seconds, "preds": preds}, indent=1))
    print(f"lm-eval local-completions: {len(preds)} questions in {seconds:.2f} s")


if __name__ == "__main__":
    main()
