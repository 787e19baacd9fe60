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
            answer_index: Some(0),
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

/// A file named `name` holding `text` in a fresh folder of the system's temporary folder.
fn own_file(name: &str, text: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rlvr-own-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const TWO_LINES: &str = "{\"question\": \"2+2?\", \"choices\": [\"3\", \"4\"], \"answer\": \"B\"}\n\
                         {\"question\": \"1+1?\", \"choices\": [\"2\", \"5\"], \"answer\": \"A\"}\n";

#[test]
fn the_kind_given_wins_over_the_extension() {
    let lines_in_json = own_file("lines.json", TWO_LINES);
    let df = load("jsonl", &lines_in_json, &LoadOptions::default()).unwrap();
    assert_eq!(texts(&df, "answer"), ["B", "A"]);
    let lines_in_txt = own_file("lines.txt", TWO_LINES);
    let df = load("jsonl", &lines_in_txt, &LoadOptions::default()).unwrap();
    assert_eq!(df.height(), 2);
    let csv_in_json = own_file("table.json", "question,answer\n2+2?,4\n");
    let df = load("csv", &csv_in_json, &LoadOptions::default()).unwrap();
    assert_eq!(texts(&df, "answer"), ["4"]);
}

#[test]
fn kind_json_reads_json_lines_and_arrays() {
    let lines = own_file("published.json", TWO_LINES);
    let df = load("json", &lines, &LoadOptions::default()).unwrap();
    assert_eq!(texts(&df, "answer_text"), ["4", "2"]);
    let array = format!("[\n{}]\n", TWO_LINES.trim_end().replace('\n', ",\n"));
    let array = own_file("array.json", &array);
    let df = load("json", &array, &LoadOptions::default()).unwrap();
    assert_eq!(texts(&df, "answer_text"), ["4", "2"]);
    assert_eq!(
        table::read(&lines).unwrap().height(),
        2,
        "load(path) agrees"
    );
}

/// Loads `text` as jsonl with `answer_index`, returning the answers or the error.
fn answers(name: &str, text: &str, answer_index: Option<usize>) -> Result<Vec<String>, String> {
    let options = LoadOptions {
        mapping: ColumnMapping {
            answer_index,
            ..ColumnMapping::default()
        },
        ..LoadOptions::default()
    };
    let path = own_file(name, text);
    let kind = if name.ends_with(".csv") {
        "csv"
    } else {
        "jsonl"
    };
    load(kind, &path, &options)
        .map(|df| texts(&df, "answer"))
        .map_err(|e| e.to_string())
}

#[test]
fn numeric_answers_count_as_answer_index_says() {
    let file = "{\"question\": \"q1\", \"choices\": [\"w\", \"x\", \"y\", \"z\"], \"answer\": 1}\n\
                {\"question\": \"q2\", \"choices\": [\"w\", \"x\", \"y\", \"z\"], \"answer\": 4}\n";
    assert_eq!(answers("one.jsonl", file, Some(1)).unwrap(), ["A", "D"]);
    let err = answers("zero.jsonl", file, Some(0)).unwrap_err();
    for part in [
        "zero.jsonl",
        "line 2",
        "`answer`",
        "index 4 is out of range",
        "0–3",
    ] {
        assert!(err.contains(part), "`{part}` missing from: {err}");
    }
    let csv = "question,choices,answer\nq1,\"[\"\"w\"\", \"\"x\"\"]\",2\n";
    assert_eq!(answers("one.csv", csv, Some(1)).unwrap(), ["B"]);
    let err = answers("zero.csv", csv, Some(0)).unwrap_err();
    assert!(
        err.contains("line 2") && err.contains("index 2 is out of range"),
        "{err}"
    );
}

#[test]
fn numeric_answers_without_answer_index_are_refused() {
    let file = "{\"question\": \"q1\", \"choices\": [\"w\", \"x\", \"y\"], \"answer\": 1}\n";
    let err = answers("unsaid.jsonl", file, None).unwrap_err();
    for part in [
        "unsaid.jsonl",
        "line 1",
        "`answer`",
        "answer 1 could mean B (0-based) or A (1-based): set answer_index: 0 or 1",
    ] {
        assert!(err.contains(part), "`{part}` missing from: {err}");
    }
    let csv = "question,choices,answer\nq1,\"[\"\"w\"\", \"\"x\"\"]\",0\n";
    let err = answers("unsaid.csv", csv, None).unwrap_err();
    assert!(
        err.contains("line 2")
            && err.contains("answer 0 could mean A (0-based) or no option (1-based)"),
        "{err}"
    );
    let err = answers("base2.jsonl", file, Some(2)).unwrap_err();
    assert!(err.contains("answer_index must be 0 or 1"), "{err}");
}

#[test]
fn letter_and_text_answers_need_no_answer_index() {
    assert_eq!(
        answers("letters.jsonl", TWO_LINES, None).unwrap(),
        ["B", "A"]
    );
    assert_eq!(
        answers("letters1.jsonl", TWO_LINES, Some(1)).unwrap(),
        ["B", "A"]
    );
    let text = "{\"question\": \"q\", \"choices\": [\"Paris\", \"Rome\"], \"answer\": \"Rome\"}\n";
    assert_eq!(answers("text.jsonl", text, None).unwrap(), ["B"]);
}

#[test]
fn native_loaders_need_no_answer_index() {
    assert_eq!(texts(&sample("medqa", "medqa", None), "answer")[0], "B");
    assert_eq!(texts(&sample("gsm8k", "gsm8k", None), "answer")[0], "18");
    for (kind, rows) in [("medqa", 200), ("mmlu", 570), ("cmmlu", 670)] {
        let items = sample(kind, kind, None);
        assert_eq!(items.height(), rows, "{kind}");
        assert_eq!(
            count_where(&items, "answer NOT IN ('A', 'B', 'C', 'D')"),
            0,
            "{kind}"
        );
    }
    // MMLU-Pro publishes a 0-based `answer_index` beside the letter: they agree on every row.
    let pro = sample("mmlu_pro", "mmlu_pro", None);
    let raw = table::read(&repo(
        "data/samples/mmlu_pro/data/test-00000-of-00001.parquet",
    ))
    .unwrap();
    let index: Vec<i64> = raw
        .column("answer_index")
        .unwrap()
        .cast(&DataType::Int64)
        .unwrap()
        .i64()
        .unwrap()
        .iter()
        .map(Option::unwrap)
        .collect();
    let raw_ids: Vec<String> = raw
        .column("question_id")
        .unwrap()
        .cast(&DataType::String)
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .map(|v| format!("mmlu_pro/test/{}", v.unwrap()))
        .collect();
    let by_id: std::collections::HashMap<String, String> = texts(&pro, "id")
        .into_iter()
        .zip(texts(&pro, "answer"))
        .collect();
    for (id, i) in raw_ids.iter().zip(index) {
        let letter = char::from(b'A' + i as u8).to_string();
        assert_eq!(by_id[id], letter, "{id}");
    }
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
