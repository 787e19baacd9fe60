"""The lm-evaluation-harness side of benches/eval.sh: the same MMLU questions scored by
lm-eval's `hf` backend (HFLM over transformers, float32 on the CPU) with its own `mmlu_<subject>`
task YAML pointed at the local files; times `loglikelihood` alone and writes the predictions
(argmax of the options' log-likelihoods, as lm-eval's `acc`).

    python benches/eval_lm_eval.py --model GGUF --data DATA/mmlu --subjects a,b --out preds.json
"""

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
import torch  # noqa: E402
from lm_eval.api.task import ConfigurableTask  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

TASKS = Path(lm_eval.__file__).parent / "tasks"


def mmlu_task(data: Path, subject: str, tmp: Path) -> ConfigurableTask:
    files = {}
    for split in ("test", "dev"):
        rows = []
        with open(data / split / f"{subject}_{split}.csv", newline="", encoding="utf-8") as f:
            for q, a, b, c, d, ans in csv.reader(f):
                rows.append({"question": q, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(ans)})
        path = tmp / f"{subject}_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        files[split] = str(path)
    cfg = load_yaml(TASKS / "mmlu" / "default" / f"mmlu_{subject}.yaml", resolve_func=True)
    cfg.update({"dataset_path": "json", "dataset_name": None, "dataset_kwargs": {"data_files": files}})
    return ConfigurableTask(config=cfg)


def score_mmlu(lm, data: Path, subjects: str, out: Path) -> tuple[dict, float]:
    """Scores the 0-shot MMLU questions of `subjects` (comma-separated) with lm-eval model
    `lm`'s `loglikelihood`; writes each question's option log-likelihoods and prediction
    (the option with the highest, as lm-eval's `acc`) with the scoring time to `out`."""
    requests, owners = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for subject in subjects.split(","):
            t = mmlu_task(data, subject, Path(tmp))
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
    out.write_text(json.dumps({"seconds": seconds, "preds": preds}, indent=1))
    return preds, seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--data", required=True, type=Path)
    ap.add_argument("--subjects", required=True)
    ap.add_argument("--batch", default=1, type=int)
    ap.add_argument("--threads", default=2, type=int)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = HFLM(
        pretrained=str(args.model.parent),
        gguf_file=args.model.name,
        tokenizer=str(args.model.parent),
        dtype="float32",
        device="cpu",
        batch_size=args.batch,
    )
    preds, seconds = score_mmlu(lm, args.data, args.subjects, args.out)
    print(f"lm-eval hf (batch {args.batch}): {len(preds)} questions in {seconds:.2f} s")


if __name__ == "__main__":
    main()
