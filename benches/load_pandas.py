#!/usr/bin/env python3
"""pandas reference for `rlvr bench load`.

Loads the full MMLU, CMMLU and MMLU-Pro test splits into one pandas DataFrame per
dataset, with the columns of rlvr's Items table, and prints one JSON line:

    {"impl": "pandas <version>", "mmlu_rows": N, "cmmlu_rows": N, "mmlu_pro_rows": N,
     "wall_s": X, "peak_rss_mib": Y}

wall_s covers the loading only (imports and the category tables below are excluded);
peak_rss_mib is the peak resident set size of the whole process (ru_maxrss).

Usage: python benches/load_pandas.py --data DIR
"""

import argparse
import json
import resource
import time
from pathlib import Path

import numpy as np
import pandas as pd

EXPECTED_ROWS = {"mmlu": 14_042, "cmmlu": 11_582, "mmlu_pro": 12_032}

LETTERS = "ABCDEFGHIJ"

# MMLU subject -> category, lm-evaluation-harness grouping (anatomy in stem);
# REFERENCE.md section 4.1.
MMLU_GROUPS = {
    "stem": [
        "abstract_algebra", "anatomy", "astronomy", "college_biology",
        "college_chemistry", "college_computer_science", "college_mathematics",
        "college_physics", "computer_security", "conceptual_physics",
        "electrical_engineering", "elementary_mathematics", "high_school_biology",
        "high_school_chemistry", "high_school_computer_science",
        "high_school_mathematics", "high_school_physics", "high_school_statistics",
        "machine_learning",
    ],
    "humanities": [
        "formal_logic", "high_school_european_history", "high_school_us_history",
        "high_school_world_history", "international_law", "jurisprudence",
        "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy",
        "prehistory", "professional_law", "world_religions",
    ],
    "social_sciences": [
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics",
        "high_school_psychology", "human_sexuality", "professional_psychology",
        "public_relations", "security_studies", "sociology", "us_foreign_policy",
    ],
    "other": [
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts",
        "human_aging", "management", "marketing", "medical_genetics", "miscellaneous",
        "nutrition", "professional_accounting", "professional_medicine", "virology",
    ],
}

# CMMLU subject -> primary category, haonan-li/CMMLU src/categories.py;
# REFERENCE.md section 4.2 (the overlapping "China specific" group is not used here).
CMMLU_GROUPS = {
    "stem": [
        "anatomy", "astronomy", "college_actuarial_science",
        "college_engineering_hydrology", "college_mathematics",
        "college_medical_statistics", "computer_science", "conceptual_physics",
        "electrical_engineering", "elementary_mathematics", "genetics",
        "high_school_biology", "high_school_chemistry", "high_school_mathematics",
        "high_school_physics", "machine_learning", "virology",
    ],
    "humanities": [
        "arts", "chinese_history", "chinese_literature", "college_law", "global_facts",
        "international_law", "jurisprudence", "logical", "marxist_theory", "philosophy",
        "professional_law", "world_history", "world_religions",
    ],
    "social_science": [
        "ancient_chinese", "business_ethics", "chinese_civil_service_exam",
        "chinese_food_culture", "chinese_foreign_policy",
        "chinese_teacher_qualification", "college_education", "economics", "education",
        "elementary_chinese", "ethnology", "high_school_geography",
        "high_school_politics", "journalism", "management", "marketing",
        "modern_chinese", "professional_accounting", "professional_psychology",
        "public_relations", "security_study", "sociology",
    ],
    "other": [
        "agronomy", "chinese_driving_rule", "clinical_knowledge", "college_medicine",
        "computer_security", "construction_project_management",
        "elementary_commonsense", "elementary_information_and_technology",
        "food_science", "human_sexuality", "legal_and_moral_basis", "nutrition",
        "professional_medicine", "sports_science", "traditional_chinese_medicine",
    ],
}


def invert(groups):
    """{category: [subject, ...]} -> {subject: category}."""
    return {subject: category for category, subjects in groups.items() for subject in subjects}


MMLU_CATEGORY = invert(MMLU_GROUPS)
CMMLU_CATEGORY = invert(CMMLU_GROUPS)

# Medical subsets, REFERENCE.md section 4.5.
MMLU_MEDICAL = {
    "anatomy", "clinical_knowledge", "college_medicine", "medical_genetics",
    "professional_medicine", "college_biology",
}
MMLU_MEDICAL_EXT = MMLU_MEDICAL | {"high_school_biology", "human_aging", "nutrition", "virology"}
CMMLU_MEDICAL = {
    "anatomy", "clinical_knowledge", "college_medical_statistics", "college_medicine",
    "genetics", "nutrition", "professional_medicine", "traditional_chinese_medicine",
    "virology",
}
CMMLU_MEDICAL_EXT = CMMLU_MEDICAL | {
    "high_school_biology", "food_science", "human_sexuality", "sports_science",
}
MMLU_PRO_MEDICAL = {"health"}
MMLU_PRO_MEDICAL_EXT = {"health", "biology"}

# Read every cell as a string, and keep cells such as "None" or "NA" as text.
CSV_OPTIONS = {"dtype": str, "keep_default_na": False, "encoding": "utf-8"}


def four_choice_items(raw, dataset, category_of, medical, medical_ext):
    """Items rows for MMLU/CMMLU from a frame with columns
    subject, row, question, A, B, C, D, answer."""
    n = len(raw)
    choices = raw[["A", "B", "C", "D"]].to_numpy(dtype=object)
    answer_index = raw["answer"].map({"A": 0, "B": 1, "C": 2, "D": 3})
    assert answer_index.notna().all(), f"{dataset}: answer outside A-D"
    answer_text = choices[np.arange(n), answer_index.to_numpy(dtype=np.int64)]

    category = raw["subject"].map(category_of)
    assert category.notna().all(), f"{dataset}: subject without a category"

    return pd.DataFrame({
        "id": dataset + "/test/" + raw["subject"] + "/" + raw["row"].astype(str),
        "dataset": dataset,
        "split": "test",
        "subject": raw["subject"],
        "category": category,
        "medical": raw["subject"].isin(medical),
        "medical_ext": raw["subject"].isin(medical_ext),
        "question": raw["question"],
        "choices": choices.tolist(),
        "answer": raw["answer"],
        "answer_text": answer_text,
        "rationale": None,
    })


def load_mmlu(data_dir):
    frames = []
    for path in sorted((data_dir / "mmlu" / "test").glob("*_test.csv")):
        df = pd.read_csv(path, header=None,
                         names=["question", "A", "B", "C", "D", "answer"], **CSV_OPTIONS)
        df["subject"] = path.name.removesuffix("_test.csv")
        df["row"] = np.arange(len(df))
        frames.append(df)
    assert len(frames) == 57, f"expected 57 MMLU test files, found {len(frames)}"
    raw = pd.concat(frames, ignore_index=True)
    return four_choice_items(raw, "mmlu", MMLU_CATEGORY, MMLU_MEDICAL, MMLU_MEDICAL_EXT)


def load_cmmlu(data_dir):
    frames = []
    for path in sorted((data_dir / "cmmlu" / "test").glob("*.csv")):
        # Header ",Question,A,B,C,D,Answer": the unnamed first column is a row index.
        df = pd.read_csv(path, header=0, usecols=["Question", "A", "B", "C", "D", "Answer"],
                         **CSV_OPTIONS)
        df = df.rename(columns={"Question": "question", "Answer": "answer"})
        df["subject"] = path.stem
        df["row"] = np.arange(len(df))
        frames.append(df)
    assert len(frames) == 67, f"expected 67 CMMLU test files, found {len(frames)}"
    raw = pd.concat(frames, ignore_index=True)
    return four_choice_items(raw, "cmmlu", CMMLU_CATEGORY, CMMLU_MEDICAL, CMMLU_MEDICAL_EXT)


def load_mmlu_pro(data_dir):
    raw = pd.read_parquet(data_dir / "mmlu_pro" / "data" / "test-00000-of-00001.parquet")
    choices = [list(options) for options in raw["options"]]
    # The letter is authoritative (it is what the official and lm-eval scorers compare
    # against); answer_index disagrees with it on one test row (question_id 3983).
    answer_index = [LETTERS.index(letter) for letter in raw["answer"]]
    assert all(i < len(opts) for opts, i in zip(choices, answer_index)), \
        "mmlu_pro: answer letter beyond the options"
    answer_text = [opts[i] for opts, i in zip(choices, answer_index)]

    cot = raw["cot_content"]
    rationale = cot.astype(object).where(cot.fillna("") != "", None)

    return pd.DataFrame({
        "id": "mmlu_pro/test/" + raw["question_id"].astype(str),
        "dataset": "mmlu_pro",
        "split": "test",
        "subject": raw["category"],
        "category": raw["category"],
        "medical": raw["category"].isin(MMLU_PRO_MEDICAL),
        "medical_ext": raw["category"].isin(MMLU_PRO_MEDICAL_EXT),
        "question": raw["question"],
        "choices": choices,
        "answer": raw["answer"],
        "answer_text": answer_text,
        "rationale": rationale,
    })


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True,
                        help="folder holding the full mmlu/, cmmlu/ and mmlu_pro/")
    args = parser.parse_args()

    start = time.perf_counter()
    mmlu = load_mmlu(args.data)
    cmmlu = load_cmmlu(args.data)
    mmlu_pro = load_mmlu_pro(args.data)
    wall_s = time.perf_counter() - start

    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    rows = {"mmlu": len(mmlu), "cmmlu": len(cmmlu), "mmlu_pro": len(mmlu_pro)}
    assert rows == EXPECTED_ROWS, f"row counts {rows} != {EXPECTED_ROWS}"

    print(json.dumps({
        "impl": f"pandas {pd.__version__}",
        "mmlu_rows": rows["mmlu"],
        "cmmlu_rows": rows["cmmlu"],
        "mmlu_pro_rows": rows["mmlu_pro"],
        "wall_s": round(wall_s, 4),
        "peak_rss_mib": round(peak_rss_mib, 1),
    }))


if __name__ == "__main__":
    main()
