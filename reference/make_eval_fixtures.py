"""Benchmark-evaluation fixtures from lm-evaluation-harness itself (run by hand, never in CI).

Writes tests/fixtures/lm-eval/:
  prompts.jsonl     the prompts lm-eval builds (its own task YAML, few-shot samplers and
                    `build_all_requests`) for the committed data samples: MMLU and CMMLU 0- and
                    5-shot, MMLU-Pro 5-shot CoT, GSM8K 5-shot and 8-shot CoT, MedQA 4 options;
                    with the scored continuations (loglik) or the stop strings (generate).
  extraction.jsonl  about 400 varied responses (letters in many formats, Chinese answers,
                    numbers with commas, signs and units, no answer at all) with what lm-eval's
                    filters extract (its FilterEnsemble objects, take_first included) and its
                    exact_match verdict against a gold answer, plus the official MMLU-Pro
                    extraction cascade (TIGER-AI-Lab/MMLU-Pro evaluate_from_local.py) without
                    its random fallback.
  versions.json     the versions that made them.

The tasks are lm-eval's YAML files with the dataset pointed at local files (the Hugging Face
hub is out of reach): the samples under data/samples/ are converted to the field names of
each task's hub dataset in a temporary folder.

    $HOME/.cache/rlvr/reference-venv/bin/python reference/make_eval_fixtures.py
"""

import csv
import itertools
import json
import os
import re
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.task import ConfigurableTask  # noqa: E402
from lm_eval.tasks._yaml_loader import load_yaml  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "data" / "samples"
OUT = ROOT / "tests" / "fixtures" / "lm-eval"
TASKS = Path(lm_eval.__file__).parent / "tasks"

MMLU_SUBJECTS = ["anatomy", "college_medicine", "abstract_algebra", "high_school_us_history", "moral_scenarios"]
CMMLU_SUBJECTS = ["anatomy", "traditional_chinese_medicine", "chinese_history", "college_mathematics"]
DOCS_PER_SUBJECT = 3


def write_jsonl(path: Path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def task(yaml_rel: str, **overrides) -> ConfigurableTask:
    cfg = load_yaml(TASKS / yaml_rel, resolve_func=True)
    cfg.update(overrides)
    return ConfigurableTask(config=cfg)


def requests(t: ConfigurableTask, shots: int, limit: int):
    """lm-eval's own request building, as simple_evaluate sets a task up."""
    t.set_config(key="num_fewshot", value=shots)
    t.set_fewshot_seed(seed=1234)
    t.build_all_requests(limit=limit, rank=0, world_size=1)
    by_doc = {}
    for inst in t.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    return [(doc_id, by_doc[doc_id]) for doc_id in sorted(by_doc)]


def prompt_rows(preset, shots, t, limit, id_of):
    rows = []
    for doc_id, insts in requests(t, shots, limit):
        first = insts[0]
        ctx = first.arguments[0]
        row = {"preset": preset, "shots": shots, "id": id_of(doc_id, first.doc), "context": ctx}
        if first.request_type == "loglikelihood":
            assert all(i.arguments[0] == ctx for i in insts)
            row["continuations"] = [i.arguments[1] for i in insts]
        else:
            gen = first.arguments[1]
            row["until"] = list(gen["until"])
        rows.append(row)
    return rows


def mmlu_files(tmp: Path, subject: str):
    out = {}
    for split in ("test", "dev"):
        rows = []
        with open(SAMPLES / "mmlu" / split / f"{subject}_{split}.csv", newline="", encoding="utf-8") as f:
            for q, a, b, c, d, ans in csv.reader(f):
                rows.append({"question": q, "subject": subject, "choices": [a, b, c, d], "answer": "ABCD".index(ans)})
        path = tmp / f"mmlu_{subject}_{split}.jsonl"
        write_jsonl(path, rows)
        out[split] = str(path)
    return out


def cmmlu_files(tmp: Path, subject: str):
    out = {}
    for split in ("test", "dev"):
        with open(SAMPLES / "cmmlu" / split / f"{subject}.csv", newline="", encoding="utf-8") as f:
            rows = [{k: r[k] for k in ("Question", "A", "B", "C", "D", "Answer")} for r in csv.DictReader(f)]
        path = tmp / f"cmmlu_{subject}_{split}.jsonl"
        write_jsonl(path, rows)
        out[split] = str(path)
    return out


def local(kind, files):
    return {"dataset_path": kind, "dataset_name": None, "dataset_kwargs": {"data_files": files}}


def make_prompts(tmp: Path):
    rows = []
    for subject in MMLU_SUBJECTS:
        files = mmlu_files(tmp, subject)
        for shots in (0, 5):
            t = task(f"mmlu/default/mmlu_{subject}.yaml", **local("json", files))
            rows += prompt_rows("mmlu", shots, t, DOCS_PER_SUBJECT, lambda i, d, s=subject: f"mmlu/test/{s}/{i}")
    for subject in CMMLU_SUBJECTS:
        files = cmmlu_files(tmp, subject)
        for shots in (0, 5):
            t = task(f"cmmlu/cmmlu_{subject}.yaml", **local("json", files))
            rows += prompt_rows("cmmlu", shots, t, DOCS_PER_SUBJECT, lambda i, d, s=subject: f"cmmlu/test/{s}/{i}")
    pro = {
        "test": str(SAMPLES / "mmlu_pro" / "data" / "test-00000-of-00001.parquet"),
        "validation": str(SAMPLES / "mmlu_pro" / "data" / "validation-00000-of-00001.parquet"),
    }
    for category in ["biology", "computer_science", "health", "law", "math", "other"]:
        t = task(f"mmlu_pro/mmlu_pro_{category}.yaml", **local("parquet", pro))
        rows += prompt_rows("mmlu_pro", 5, t, 2, lambda i, d: f"mmlu_pro/test/{d['question_id']}")
    gsm = {"train": str(SAMPLES / "gsm8k" / "train.jsonl"), "test": str(SAMPLES / "gsm8k" / "test.jsonl")}
    t = task("gsm8k/gsm8k.yaml", **local("json", gsm))
    rows += prompt_rows("gsm8k", 5, t, 25, lambda i, d: f"gsm8k/test/{i}")
    t = task("gsm8k/gsm8k-cot.yaml", **local("json", gsm))
    rows += prompt_rows("gsm8k_cot", 8, t, 5, lambda i, d: f"gsm8k/test/{i}")
    medqa_rows = []
    with open(SAMPLES / "medqa" / "US" / "4_options" / "phrases_no_exclude_test.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            medqa_rows.append({
                "sent1": r["question"],
                **{f"ending{i}": r["options"][k] for i, k in enumerate("ABCD")},
                "label": "ABCD".index(r["answer_idx"]),
            })
    path = tmp / "medqa_test.jsonl"
    write_jsonl(path, medqa_rows)
    t = task("medqa/medqa.yaml", **local("json", {"test": str(path), "train": str(path), "validation": str(path)}))
    rows += prompt_rows("medqa", 0, t, 10, lambda i, d: f"medqa/test/{i}")
    return rows


# --- extraction -------------------------------------------------------------------------


def responses():
    """About 400 varied responses with a gold answer each."""
    out = []
    letter_forms = [
        "The answer is ({x}).", "the answer is {x}", "So the answer is ({x})", "answer is ({x}) because",
        "Answer: {x}", "answer: {x}.", "ANSWER: {x}", "**Answer:** ({x})", "({x})", "{x}", "{x}.",
        "The correct option is {x}.", "I choose {x}", "Option {x} is right.", "The answer is: ({x})",
        "The answer is $\\boxed{{{x}}}$", "答案是 ({x})", "答案：{x}", "所以答案是{x}。", "正确答案是{x}项",
        "Let's think step by step. A is wrong, C is wrong, so the answer is ({x}).",
        "Answer:\n{x}", "the answer is ({x}) but on reflection the answer is (A)", "{x} and then A",
        "Therefore, the answer is {x}) clearly", "final: {x}\nAnswer: {x}",
    ]
    for form, x in itertools.product(letter_forms, ["A", "C", "J", "b"]):
        out.append({"response": form.format(x=x), "gold": x.upper() if x != "b" else "B"})
    no_answer = [
        "", "I don't know.", "None of the options fit.", "Let me think about this question carefully.",
        "这个问题很难回答。", "The answer is (K).", "answer is unclear", "a lowercase sentence with no letters",
        "The answer is ( C )", "Answer:", "Answer: none", "the answer is (",
    ]
    out += [{"response": r, "gold": "C"} for r in no_answer]
    number_forms = [
        "#### {n}", "The answer is {n}.", "The answer is {n}", "So the total is {n} dollars.", "{n}",
        "It costs ${n}.", "#### {n}\n\nQuestion: next", "She has {n} apples left. The answer is {n}.",
        "答案是 {n} 元", "所以一共是{n}个。", "First 12 + 7 = 19, then 19 * 2 = {n}", "#### ${n}",
        "The answer is {n}. #### {n}", "{n} clips", "Total: {n}.\n", "**{n}**",
    ]
    numbers = ["72", "1,234", "-5", "18.00", "0.5", "1000000", "3.14", "10,000.50", "$42", "7"]
    for form, n in itertools.product(number_forms, numbers):
        gold = n.replace(",", "").replace("$", "")
        if gold == "18.00":
            gold = "18"
        out.append({"response": form.format(n=n), "gold": gold})
    number_edge = [
        "no number here", "twelve", "1/2 of the cake", "12 apples and 7 oranges", ".5", "1e3", "10%",
        "-", "--5", "5.", "the year 2023, age 41", "#### 72.", "#### -3", "# 72", "####72", "$", "$.",
        "1,2,3,4", "一共 3 个，然后 4 个", "Answer: $1,000.", "The answer is 5 apples.", "The answer is -0.",
    ]
    out += [{"response": r, "gold": "72"} for r in number_edge]
    chinese = [
        ("答案是B", "B"), ("答案为：C", "C"), ("选择 D 选项", "D"), ("正确选项是A。", "A"),
        ("B 正确", "B"), ("我认为答案是 (C)，因为……", "C"), ("答案：A、B", "A"), ("答案应该是D", "D"),
        ("本题选C", "C"), ("故选：B", "B"), ("综上，答案是 (A)。", "A"), ("以上都不对", "A"),
        ("答案是 1,234。", "1234"), ("他一共走了 12,000 米", "12000"), ("共计¥56元", "56"),
        ("结果为-7", "-7"), ("#### 3,000", "3000"), ("答案：$1,500", "1500"), ("三个苹果", "3"),
        ("The answer is 2,500 meters.", "2500"), ("He paid $1,234.56 in total.", "1234.56"),
        ("It took 1.5 hours, so the answer is 90 minutes.", "90"), ("#### 5,000,000", "5000000"),
        ("The answer is (B).\n\nQuestion: what next?", "B"), ("answer is (D)\nanswer is (A)", "D"),
        ("the answer is (E) (F)", "E"), ("Answer: G\nAnswer: H", "H"), ("the answer isC", "C"),
        ("THE ANSWER IS (A)", "A"), ("the answer is (I).", "I"),
    ]
    out += [{"response": r, "gold": g} for r, g in chinese]
    return out


def official_mmlu_pro(text):
    """TIGER-AI-Lab/MMLU-Pro evaluate_from_local.py, extract_answer, without the random draw."""
    match = re.search(r"answer is \(?([A-J])\)?", text)
    if match:
        return match.group(1)
    match = re.search(r".*[aA]nswer:\s*([A-J])", text)
    if match:
        return match.group(1)
    match = re.search(r"\b[A-J]\b(?!.*\b[A-J]\b)", text, re.DOTALL)
    if match:
        return match.group(0)
    return None


def filtered(t: ConfigurableTask, response: str, doc: dict):
    """Runs the task's own filter ensembles and its process_results on one response."""
    out = {}
    for ensemble in t._filters:
        inst = Instance(request_type="generate_until", doc=doc, arguments=("", {}), idx=0)
        inst.resps = [response]
        ensemble.apply([inst])
        value = inst.filtered_resps[ensemble.name]
        score = t.process_results(doc, [value])
        out[ensemble.name] = {"pred": value, "exact_match": score["exact_match"]}
    return out


def make_extraction(tmp: Path):
    gsm = {"train": str(SAMPLES / "gsm8k" / "train.jsonl"), "test": str(SAMPLES / "gsm8k" / "test.jsonl")}
    pro = {
        "test": str(SAMPLES / "mmlu_pro" / "data" / "test-00000-of-00001.parquet"),
        "validation": str(SAMPLES / "mmlu_pro" / "data" / "validation-00000-of-00001.parquet"),
    }
    gsm8k = task("gsm8k/gsm8k.yaml", **local("json", gsm))
    gsm8k_cot = task("gsm8k/gsm8k-cot.yaml", **local("json", gsm))
    mmlu_pro = task("mmlu_pro/mmlu_pro_health.yaml", **local("parquet", pro))
    rows = []
    for r in responses():
        resp, gold = r["response"], r["gold"]
        row = {"response": resp, "gold": gold}
        gsm_doc = {"question": "", "answer": f"work\n#### {gold}"}
        for name, t in (("gsm8k", gsm8k), ("gsm8k_cot", gsm8k_cot)):
            for filt, v in filtered(t, resp, gsm_doc).items():
                row[f"{name}/{filt}"] = v
        pro_doc = {"question": "", "options": [str(i) for i in range(10)], "answer": gold, "cot_content": "", "category": "health"}
        for filt, v in filtered(mmlu_pro, resp, pro_doc).items():
            row[f"mmlu_pro/{filt}"] = v
        row["mmlu_pro/official"] = official_mmlu_pro(resp)
        rows.append(row)
    return rows


def main():
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        prompts = make_prompts(tmp)
        extraction = make_extraction(tmp)
    write_jsonl(OUT / "prompts.jsonl", prompts)
    write_jsonl(OUT / "extraction.jsonl", extraction)
    versions = {
        "python": sys.version.split()[0],
        **{p: version(p) for p in ("lm_eval", "datasets", "transformers", "numpy")},
    }
    (OUT / "versions.json").write_text(json.dumps(versions, indent=2) + "\n")
    print(f"{len(prompts)} prompts, {len(extraction)} responses -> {OUT}")


if __name__ == "__main__":
    main()
