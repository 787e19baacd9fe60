//! Judging on the tiny Gemma 3 fixture: the Judged table, selection by difficulty, and a
//! judging run killed with SIGKILL that, rerun, ends with the table of an uninterrupted run.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use candle_core::Device;
use polars::prelude::*;
use rlvr::judge::{self, JudgeConfig, Selection};
use rlvr::model::lm::LanguageModel;
use rlvr::progress::Job;

use super::repo;

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rlvr-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn tiny() -> LanguageModel {
    LanguageModel::load(
        &repo("tests/fixtures/tiny-gemma3"),
        Some(&repo("tests/fixtures/tiny-tokenizer/tokenizer.json")),
        &Device::Cpu,
    )
    .unwrap()
}

fn medqa(n: usize) -> DataFrame {
    rlvr::data::load("medqa", &repo("data/samples/medqa"), &Default::default())
        .unwrap()
        .head(Some(n))
}

#[test]
fn judged_table_has_per_sample_verdicts_and_pass_rates() {
    let model = tiny();
    let items = medqa(4);
    let config = JudgeConfig {
        samples: 3,
        batch: 5,
        cache_dir: scratch("judge-table"),
        ..JudgeConfig::default()
    };
    let mut config = config;
    config.sampling.max_tokens = 12;
    let judged = judge::judge(&model, &items, &config, &Job::silent()).unwrap();
    assert_eq!(judged.height(), 4);
    for c in [
        "judge",
        "samples",
        "responses",
        "correct",
        "format_ok",
        "n_correct",
        "pass_rate",
    ] {
        assert!(judged.column(c).is_ok(), "missing column {c}");
    }
    let responses = judged.column("responses").unwrap().list().unwrap().clone();
    for row in responses.amortized_iter() {
        assert_eq!(row.unwrap().as_ref().len(), 3);
    }
    // a random model answers in the study's format by chance essentially never
    let rates: Vec<f64> = judged
        .column("pass_rate")
        .unwrap()
        .f64()
        .unwrap()
        .into_no_null_iter()
        .collect();
    assert!(rates.iter().all(|r| *r == 0.0));

    // a rerun is answered from the cache and gives the same table
    let cache_lines = |dir: &Path| -> usize {
        std::fs::read_dir(dir.join("judge"))
            .unwrap()
            .map(|f| {
                std::fs::read_to_string(f.unwrap().path())
                    .unwrap()
                    .lines()
                    .filter(|l| !l.is_empty())
                    .count()
            })
            .sum()
    };
    assert_eq!(cache_lines(&config.cache_dir), 12);
    let again = judge::judge(&model, &items, &config, &Job::silent()).unwrap();
    assert!(again.equals_missing(&judged));
    assert_eq!(cache_lines(&config.cache_dir), 12);
}

#[test]
fn selection_takes_the_bands_and_fails_when_one_is_short() {
    let ids: Vec<String> = (0..10).map(|i| format!("q{i}")).collect();
    let rates = [0.0, 0.0, 0.5, 1.0, 1.0, 0.0, 0.25, 1.0, 0.0, 0.75];
    let judged = DataFrame::new(
        10,
        vec![
            Column::new("id".into(), ids),
            Column::new("pass_rate".into(), rates.to_vec()),
        ],
    )
    .unwrap();
    let s = Selection {
        hard: 5,
        easy: 2,
        ..Selection::default()
    };
    let picked = judge::select_by_difficulty(&judged, &s).unwrap();
    assert_eq!(picked.height(), 7);
    let sql = rlvr::data::table::sql(
        &picked,
        "SELECT difficulty, min(pass_rate) AS lo, max(pass_rate) AS hi, count(*) AS n FROM self GROUP BY difficulty ORDER BY difficulty",
    )
    .unwrap();
    let lo: Vec<f64> = sql
        .column("lo")
        .unwrap()
        .f64()
        .unwrap()
        .into_no_null_iter()
        .collect();
    let hi: Vec<f64> = sql
        .column("hi")
        .unwrap()
        .f64()
        .unwrap()
        .into_no_null_iter()
        .collect();
    assert_eq!((lo[0], hi[0]), (1.0, 1.0)); // easy
    assert!(hi[1] < 1.0); // hard
    let banded = Selection {
        hard: 4,
        easy: 1,
        hard_max: Some(0.0),
        ..Selection::default()
    };
    let err = judge::select_by_difficulty(
        &judged,
        &Selection {
            hard: 4,
            ..banded.clone()
        },
    );
    assert!(err.is_ok());
    let err = judge::select_by_difficulty(&judged, &Selection { hard: 5, ..banded }).unwrap_err();
    assert!(
        err.to_string()
            .contains("only 4 hard questions (pass_rate <= 0)"),
        "{err}"
    );
}

fn run_judge_script(home: &Path, out: &Path, n: usize) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_rlvr"))
        .current_dir(repo(""))
        .env("RLVR_HOME", home)
        .args(["run", "tests/scripts/judge.rhai", "--set"])
        .arg(format!("table={}", out.display()))
        .args(["--out", &home.join("run").display().to_string()])
        .args(["--set", &format!("n={n}")])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn cached_responses(home: &Path) -> usize {
    let Ok(dir) = std::fs::read_dir(home.join("cache").join("judge")) else {
        return 0;
    };
    dir.map(|f| {
        std::fs::read_to_string(f.unwrap().path())
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
    })
    .sum()
}

#[test]
fn a_judging_run_killed_and_rerun_equals_an_uninterrupted_one() {
    let n = 24;
    let whole = scratch("judge-whole");
    let out_whole = whole.join("judged.json");
    let status = run_judge_script(&whole, &out_whole, n)
        .wait_with_output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );

    let killed = scratch("judge-killed");
    let out_killed = killed.join("judged.json");
    let mut child = run_judge_script(&killed, &out_killed, n);
    // kill it once some, but not all, responses are saved
    super::kill_when(&mut child, || cached_responses(&killed) >= 3);
    let saved = cached_responses(&killed);
    assert!(
        saved >= 3 && saved < 2 * n,
        "killed after {saved} of {} responses",
        2 * n
    );
    assert!(!out_killed.exists());

    let status = run_judge_script(&killed, &out_killed, n)
        .wait_with_output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    assert_eq!(cached_responses(&killed), 2 * n);
    assert_eq!(
        std::fs::read_to_string(&out_killed).unwrap(),
        std::fs::read_to_string(&out_whole).unwrap()
    );
}

/// Lines in every judge cache file under `dir`.
fn judge_cache_lines(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("judge"))
        .map(|files| {
            files
                .map(|f| {
                    std::fs::read_to_string(f.unwrap().path())
                        .unwrap()
                        .lines()
                        .filter(|l| !l.is_empty())
                        .count()
                })
                .sum()
        })
        .unwrap_or(0)
}

/// `items` with row `row` of the text column `column` changed.
fn edited_text(items: &DataFrame, column: &str, row: usize) -> DataFrame {
    let mut values: Vec<String> = items
        .column(column)
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .flatten()
        .map(str::to_string)
        .collect();
    values[row].push_str(" (edited)");
    let mut edited = items.clone();
    edited
        .with_column(Column::new(column.into(), values))
        .unwrap();
    edited
}

#[test]
fn a_changed_question_choices_prompt_or_adapter_is_judged_again() {
    let model = tiny();
    let items = medqa(3);
    let mut config = JudgeConfig {
        samples: 1,
        batch: 4,
        cache_dir: scratch("judge-key"),
        ..JudgeConfig::default()
    };
    config.sampling.max_tokens = 4;
    let lines = |model: &LanguageModel, items: &DataFrame, config: &JudgeConfig| {
        judge::judge(model, items, config, &Job::silent()).unwrap();
        judge_cache_lines(&config.cache_dir)
    };
    assert_eq!(lines(&model, &items, &config), 3);
    assert_eq!(lines(&model, &items, &config), 3, "a rerun asks nothing");
    assert_eq!(
        lines(&model, &edited_text(&items, "question", 0), &config),
        4,
        "an edited question is asked again"
    );
    let choices = items.column("choices").unwrap().list().unwrap().clone();
    let rows: Vec<Series> = choices
        .amortized_iter()
        .enumerate()
        .map(|(i, s)| {
            let s = s.unwrap().as_ref().clone();
            if i == 1 {
                Series::new("".into(), vec!["another option"; s.len()])
            } else {
                s
            }
        })
        .collect();
    let mut new_choices = items.clone();
    new_choices
        .with_column(Column::new("choices".into(), rows))
        .unwrap();
    assert_eq!(
        lines(&model, &new_choices, &config),
        5,
        "edited choices are asked again"
    );
    let mut system = config.clone();
    system.template.system = Some("Answer briefly.".into());
    assert_eq!(lines(&model, &items, &system), 8, "a new system prompt");
    let mut user = config.clone();
    user.template.user = "Q: {question}\n{choices}".into();
    assert_eq!(lines(&model, &items, &user), 11, "a new user template");
    // two adapters of one model answer differently once trained: each has its own cache
    let one = model
        .with_lora(&rlvr::model::lora::LoraConfig {
            seed: 1,
            ..Default::default()
        })
        .unwrap();
    let two = model
        .with_lora(&rlvr::model::lora::LoraConfig {
            seed: 2,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(lines(&one, &items, &config), 14);
    assert_eq!(lines(&two, &items, &config), 17, "another adapter");
    assert_eq!(lines(&one, &items, &config), 17);
}

#[test]
fn servers_of_one_model_share_the_judge_cache_wherever_they_listen() {
    let items = medqa(3);
    let mut config = JudgeConfig {
        samples: 1,
        batch: 4,
        cache_dir: scratch("judge-fleet"),
        ..JudgeConfig::default()
    };
    config.sampling.max_tokens = 4;
    // the tiny fixture's context is 128 tokens; the study's prompts are longer
    let long = ["--max-model-len", "4096"];
    let first = super::serve::Served::start(&long, &[]);
    let judged = judge::judge(&first.client(), &items, &config, &Job::silent()).unwrap();
    assert_eq!(judge_cache_lines(&config.cache_dir), 3);
    drop(first);
    // another server of the same model, on another port: answered from the cache
    let second = super::serve::Served::start(&long, &[]);
    let again = judge::judge(&second.client(), &items, &config, &Job::silent()).unwrap();
    assert_eq!(judge_cache_lines(&config.cache_dir), 3);
    assert!(again
        .column("responses")
        .unwrap()
        .equals_missing(judged.column("responses").unwrap()));
    // one cache file for both servers
    assert_eq!(
        std::fs::read_dir(config.cache_dir.join("judge"))
            .unwrap()
            .count(),
        1
    );
}

/// A judge asked to stop from another thread (as Ctrl-C or a Jupyter interrupt sets the
/// job's flag) returns within a second: here a call that would decode 64 answers of up to
/// 100,000 tokens.
#[test]
fn a_cancelled_judge_returns_within_a_second() {
    use std::time::{Duration, Instant};
    let model = tiny();
    let mut config = JudgeConfig {
        samples: 4,
        batch: 16,
        cache_dir: scratch("judge-cancel"),
        ..JudgeConfig::default()
    };
    config.sampling.max_tokens = 100_000;
    let job = Job::silent();
    let cancel = job.cancel.clone();
    let cancelled_at = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        cancel.cancel();
        Instant::now()
    });
    let err = judge::judge(&model, &medqa(16), &config, &job).unwrap_err();
    let after = cancelled_at.join().unwrap().elapsed().as_secs_f64();
    assert!(
        matches!(err, judge::JudgeError::Interrupted { .. }),
        "{err}"
    );
    assert!(after < 1.0, "returned {after:.2} s after the cancel");
}
