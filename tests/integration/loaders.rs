//! The loaders on the vendored samples (`data/samples/`): row counts equal the files' own,
//! ids are stable and unique, categories and medical flags follow the documented maps, and
//! tables survive a save / load round trip in every format.

use polars::prelude::*;
use rlvr::data::{items::ITEMS_COLUMNS, load, table, ColumnMapping, LoadOptions};

use crate::repo;

fn sample(kind: &str, dir: &str, split: Option<&str>) -> DataFrame {
    let options = LoadOptions {
        split: split.map(str::to_string),
        ..LoadOptions::default()
    };
    load(kind, &repo(&format!("data/samples/{dir}")), &options).unwrap()
}

fn count_where(df: &DataFrame, sql: &str) -> usize {
    let out = table::sql(df, &format!("SELECT count(*) AS n FROM self WHERE {sql}")).unwrap();
    out.column("n")
        .unwrap()
        .get(0)
        .unwrap()
        .extract::<usize>()
        .unwrap()
}

fn texts(df: &DataFrame, column: &str) -> Vec<String> {
    df.column(column)
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .map(|v| v.unwrap_or_default().to_string())
        .collect()
}

fn assert_items_schema(df: &DataFrame) {
    let names: Vec<String> = df
        .get_column_names()
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(&names[..ITEMS_COLUMNS.len()], ITEMS_COLUMNS);
    let ids = texts(df, "id");
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ids.len(), "ids must be unique");
}

#[test]
fn mmlu_test_sample_has_ten_rows_per_subject() {
    let df = sample("mmlu", "mmlu", None);
    assert_items_schema(&df);
    assert_eq!(df.height(), 570);
    let per_subject = table::sql(
        &df,
        "SELECT subject, count(*) AS n FROM self GROUP BY subject",
    )
    .unwrap();
    assert_eq!(per_subject.height(), 57);
    assert_eq!(count_where(&df, "category = 'stem'"), 190);
    assert_eq!(count_where(&df, "category = 'humanities'"), 130);
    assert_eq!(count_where(&df, "category = 'social_sciences'"), 120);
    assert_eq!(count_where(&df, "category = 'other'"), 130);
    assert_eq!(count_where(&df, "medical"), 60);
    assert_eq!(count_where(&df, "medical_ext"), 100);
    let first = table::sql(&df, "SELECT * FROM self WHERE id = 'mmlu/test/anatomy/0'").unwrap();
    assert_eq!(texts(&first, "answer"), ["A"]);
    assert_eq!(
        texts(&first, "answer_text"),
        ["paralysis of the facial muscles."]
    );
    assert!(texts(&first, "question")[0].starts_with("A lesion causing compression"));
}

#[test]
fn mmlu_dev_split_and_subject_filter() {
    let options = LoadOptions {
        split: Some("dev".into()),
        subjects: Some(vec!["anatomy".into(), "virology".into()]),
        ..LoadOptions::default()
    };
    let df = load("mmlu", &repo("data/samples/mmlu"), &options).unwrap();
    assert_eq!(df.height(), 10);
    assert_eq!(texts(&df, "id")[5], "mmlu/dev/virology/0");
}

#[test]
fn cmmlu_test_sample_keeps_groups_and_china_flag() {
    let df = sample("cmmlu", "cmmlu", None);
    assert_items_schema(&df);
    assert_eq!(df.height(), 670);
    assert_eq!(count_where(&df, "category = 'STEM'"), 170);
    assert_eq!(count_where(&df, "category = 'Social Science'"), 220);
    assert_eq!(count_where(&df, "china_specific"), 150);
    assert_eq!(count_where(&df, "medical"), 90);
    let first = table::sql(&df, "SELECT * FROM self WHERE id = 'cmmlu/test/anatomy/0'").unwrap();
    assert_eq!(texts(&first, "question"), ["女性生殖腺是"]);
    assert_eq!(texts(&first, "answer_text"), ["卵巢"]);
}

#[test]
fn mmlu_pro_sample_has_twenty_per_category() {
    let df = sample("mmlu_pro", "mmlu_pro", None);
    assert_items_schema(&df);
    assert_eq!(df.height(), 280);
    assert_eq!(count_where(&df, "category = 'health'"), 20);
    assert_eq!(count_where(&df, "medical"), 20);
    assert_eq!(count_where(&df, "medical_ext"), 40);
    let first = df.head(Some(1));
    assert_eq!(texts(&first, "id"), ["mmlu_pro/test/70"]);
    assert_eq!(texts(&first, "answer"), ["I"]);
    let validation = sample("mmlu_pro", "mmlu_pro", Some("validation"));
    assert_eq!(validation.height(), 70);
    assert_eq!(count_where(&validation, "rationale IS NULL"), 0);
}

#[test]
fn gsm8k_answer_is_the_final_number() {
    let df = sample("gsm8k", "gsm8k", None);
    assert_items_schema(&df);
    assert_eq!(df.height(), 200);
    assert_eq!(texts(&df, "answer")[0], "18");
    assert!(texts(&df, "rationale")[0].ends_with("farmer’s market."));
    assert_eq!(sample("gsm8k", "gsm8k", Some("train")).height(), 100);
}

#[test]
fn medqa_sample_keeps_steps_as_subjects() {
    let df = sample("medqa", "medqa", None);
    assert_items_schema(&df);
    assert_eq!(df.height(), 200);
    assert_eq!(count_where(&df, "subject = 'step1'"), 105);
    assert_eq!(count_where(&df, "subject = 'step2&3'"), 95);
    assert_eq!(count_where(&df, "medical"), 200);
    assert_eq!(texts(&df, "answer")[0], "B");
    assert_eq!(texts(&df, "id")[0], "medqa/test/0");
    let file = repo("data/samples/medqa/US/4_options/phrases_no_exclude_test.jsonl");
    let direct = load("medqa", &file, &LoadOptions::default()).unwrap();
    assert!(
        direct.equals_missing(&df),
        "a file path loads like the root"
    );
}

#[test]
fn ids_are_stable_across_loads() {
    let a = sample("cmmlu", "cmmlu", None);
    let b = sample("cmmlu", "cmmlu", None);
    assert_eq!(texts(&a, "id"), texts(&b, "id"));
}

#[test]
fn own_jsonl_loads_through_a_column_mapping() {
    let dir = std::env::temp_dir().join(format!("rlvr-own-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("quiz_train.jsonl");
    std::fs::write(
        &path,
        "{\"q\": \"2+2?\", \"opts\": [\"3\", \"4\"], \"label\": 1, \"topic\": \"math\"}\n\
         {\"q\": \"Capital of France?\", \"opts\": [\"Paris\", \"Rome\"], \"label\": \"Paris\", \"topic\": \"geo\"}\n\
         {\"q\": \"Largest?\", \"opts\": [\"ant\", \"whale\"], \"label\": \"B\", \"topic\": \"bio\"}\n",
    )
    .unwrap();
    let options = LoadOptions {
        mapping: ColumnMapping {
            question: Some("q".into()),
            choices: Some(vec!["opts".into()]),
            answer: Some("label".into()),
            subject: Some("topic".into()),
            ..ColumnMapping::default()
        },
        ..LoadOptions::default()
    };
    let df = load("jsonl", &path, &options).unwrap();
    assert_items_schema(&df);
    assert_eq!(texts(&df, "answer"), ["B", "A", "B"]);
    assert_eq!(texts(&df, "answer_text"), ["4", "Paris", "whale"]);
    assert_eq!(texts(&df, "id")[2], "quiz_train/train/2");
}

#[test]
fn tables_round_trip_through_every_format() {
    let items = sample("mmlu_pro", "mmlu_pro", None).head(Some(25));
    let dir = std::env::temp_dir().join(format!("rlvr-save-{}", std::process::id()));
    for ext in ["parquet", "jsonl", "json"] {
        let path = dir.join(format!("items.{ext}"));
        table::save(&items, &path).unwrap();
        let back = table::read(&path).unwrap();
        assert_eq!(back.shape(), items.shape(), "{ext}");
        assert_eq!(texts(&back, "id"), texts(&items, "id"), "{ext}");
        let choices = back
            .column("choices")
            .unwrap()
            .list()
            .unwrap()
            .get_as_series(0)
            .unwrap();
        assert_eq!(choices.len(), 9, "{ext}: the first row has nine options");
    }
    let parquet = table::read(&dir.join("items.parquet")).unwrap();
    assert!(parquet.equals_missing(&items));
    let csv = dir.join("items.csv");
    table::save(&items, &csv).unwrap();
    let back = table::read(&csv).unwrap();
    assert_eq!(back.height(), 25);
    let cell = back
        .column("choices")
        .unwrap()
        .str()
        .unwrap()
        .get(0)
        .unwrap()
        .to_string();
    let parsed: Vec<String> = serde_json::from_str(&cell).unwrap();
    assert_eq!(parsed.len(), 9);
}
