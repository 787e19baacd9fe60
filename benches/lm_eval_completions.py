"""lm-eval's `local-completions` model (its log-likelihood requests: context + continuation
as token ids, BOS first, `echo: true, logprobs: 1, max_tokens: 1`, the sum of
`token_logprobs[ctxlen:-1]`)
on MMLU questions of the data sample, against an OpenAI-compatible server; for
benches/lm_eval_loglik_serve.sh. Writes each question's option log-likelihoods and prediction.

    python benches/lm_eval_completions.py --base-url http://127.0.0.1:8000/v1/completions \
        --model served --tokenizer DIR --data data/samples/mmlu --subjects a,b --out preds.json
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

from eval_lm_eval import score_mmlu  # noqa: E402
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
    preds, seconds = score_mmlu(lm, args.data, args.subjects, args.out)
    print(f"lm-eval local-completions: {len(preds)} questions in {seconds:.2f} s")


if __name__ == "__main__":
    main()
