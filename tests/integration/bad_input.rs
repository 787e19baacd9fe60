//! Every file of the bad-input corpus (`tests/data/bad/`) fails to load with an error that
//! names the file, the line or row, and the field — never a panic.

use rlvr::data::{load, ColumnMapping, LoadOptions};

use crate::repo;

/// Loads `file` of the corpus as `kind` and returns the error text.
fn error_of(kind: &str, file: &str, options: LoadOptions) -> String {
    let path = repo(&format!("tests/data/bad/{file}"));
    match load(kind, &path, &options) {
        Ok(df) => panic!("{file} loaded {} rows instead of failing", df.height()),
        Err(e) => e.to_string(),
    }
}

fn assert_names(err: &str, parts: &[&str]) {
    for part in parts {
        assert!(err.contains(part), "`{part}` missing from: {err}");
    }
}

#[test]
fn malformed_jsonl_line() {
    let err = error_of("medqa", "medqa_malformed.jsonl", LoadOptions::default());
    assert_names(&err, &["medqa_malformed.jsonl", "line 2", "malformed JSON"]);
}

#[test]
fn missing_required_field() {
    let err = error_of(
        "medqa",
        "medqa_missing_question.jsonl",
        LoadOptions::default(),
    );
    assert_names(
        &err,
        &[
            "medqa_missing_question.jsonl",
            "line 3",
            "`question`",
            "missing",
        ],
    );
}

#[test]
fn answer_letter_outside_the_options() {
    let err = error_of(
        "medqa",
        "medqa_answer_outside.jsonl",
        LoadOptions::default(),
    );
    assert_names(
        &err,
        &[
            "medqa_answer_outside.jsonl",
            "line 2",
            "`answer_idx`",
            "`E`",
            "A–D",
        ],
    );
    let err = error_of("mmlu", "mmlu_answer", LoadOptions::default());
    assert_names(&err, &["anatomy_test.csv", "line 2", "`answer`", "`F`"]);
    let err = error_of("mmlu_pro", "mmlu_pro_answer.json", LoadOptions::default());
    assert_names(
        &err,
        &["mmlu_pro_answer.json", "row 1", "`answer`", "`D`", "A–C"],
    );
}

#[test]
fn options_with_a_gap() {
    let err = error_of("medqa", "medqa_option_gap.jsonl", LoadOptions::default());
    assert_names(
        &err,
        &["medqa_option_gap.jsonl", "line 1", "`options`", "`C`"],
    );
}

#[test]
fn csv_row_with_the_wrong_column_count() {
    let err = error_of("mmlu", "mmlu_columns", LoadOptions::default());
    assert_names(
        &err,
        &["anatomy_test.csv", "line 3", "expected 6 columns, found 5"],
    );
}

#[test]
fn csv_header_missing_a_column() {
    let err = error_of("cmmlu", "cmmlu_header", LoadOptions::default());
    assert_names(
        &err,
        &["anatomy.csv", "line 1", "`Answer`", "missing column"],
    );
}

#[test]
fn unknown_subject_and_category() {
    let err = error_of("mmlu", "mmlu_subject", LoadOptions::default());
    assert_names(
        &err,
        &["astrology_test.csv", "unknown MMLU subject `astrology`"],
    );
    let err = error_of("mmlu_pro", "mmlu_pro_category.json", LoadOptions::default());
    assert_names(
        &err,
        &["mmlu_pro_category.json", "row 0", "`category`", "astrology"],
    );
}

#[test]
fn unknown_dataset_name() {
    let err = error_of("mmlx", "empty.jsonl", LoadOptions::default());
    assert_names(
        &err,
        &["unknown dataset `mmlx`", "medqa", "mmlu_pro", "gsm8k"],
    );
}

#[test]
fn empty_file() {
    let err = error_of("gsm8k", "empty.jsonl", LoadOptions::default());
    assert_names(&err, &["empty.jsonl", "empty"]);
}

#[test]
fn non_utf8_file() {
    let err = error_of("gsm8k", "gsm8k_latin1.jsonl", LoadOptions::default());
    assert_names(&err, &["gsm8k_latin1.jsonl", "line 2", "UTF-8"]);
}

#[test]
fn gsm8k_answer_without_a_final_number() {
    let err = error_of("gsm8k", "gsm8k_no_final.jsonl", LoadOptions::default());
    assert_names(
        &err,
        &["gsm8k_no_final.jsonl", "line 2", "`answer`", "####"],
    );
}

#[test]
fn jsonl_line_that_is_not_an_object() {
    let err = error_of("jsonl", "not_object.jsonl", LoadOptions::default());
    assert_names(
        &err,
        &["not_object.jsonl", "line 2", "expected a JSON object"],
    );
}

#[test]
fn own_csv_whose_answer_names_no_option() {
    let options = LoadOptions {
        mapping: ColumnMapping {
            question: Some("q".into()),
            choices: Some(vec!["o1".into(), "o2".into()]),
            answer: Some("label".into()),
            ..ColumnMapping::default()
        },
        ..LoadOptions::default()
    };
    let err = error_of("csv", "own_answer.csv", options);
    assert_names(&err, &["own_answer.csv", "line 3", "`label`", "`eight`"]);
}

#[test]
fn missing_path() {
    let err = error_of("mmlu", "no_such_dir", LoadOptions::default());
    assert_names(&err, &["no_such_dir", "no such file"]);
}
