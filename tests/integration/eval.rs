//! Benchmark evaluation: prompts byte-identical to lm-evaluation-harness's and answer
//! extraction agreeing with its filters (fixtures made by `reference/make_eval_fixtures.py`
//! with lm_eval 0.4.13), and `evaluate` on the tiny Gemma 3: shared-prefix scoring equals
//! one-by-one scoring, the cache resumes, cancellation keeps finished batches.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::Device;
use polars::prelude::*;
use rlvr::data::{self, LoadOptions};
use rlvr::eval::extract::{apply, is_correct};
use rlvr::eval::preset::Preset;
use rlvr::eval::render::{Doc, Prompt, Renderer};
use rlvr::eval::{
    self, Backend, Choices, Completed, EvalError, EvalOptions, GenerateOptions, LocalModel, Scored,
};
use rlvr::model::lm::LanguageModel;
use rlvr::progress::{Cancel, Job, Silent};
use serde_json::Value;

use crate::repo;

fn fixture(name: &str) -> Vec<Value> {
    let text = std::fs::read_to_string(repo(&format!("tests/fixtures/lm-eval/{name}"))).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn load(kind: &str, split: &str) -> DataFrame {
    let options = LoadOptions {
        split: Some(split.into()),
        ..LoadOptions::default()
    };
    data::load(kind, &repo(&format!("data/samples/{kind}")), &options).unwrap()
}

/// The test documents and few-shot pool of a preset's dataset.
fn dataset(preset: &str) -> (Vec<Doc>, Vec<Doc>) {
    let (kind, pool_split) = match preset {
        "mmlu" => ("mmlu", Some("dev")),
        "cmmlu" => ("cmmlu", Some("dev")),
        "mmlu_pro" => ("mmlu_pro", Some("validation")),
        "gsm8k" | "gsm8k_cot" => ("gsm8k", Some("train")),
        "medqa" => ("medqa", None),
        other => panic!("no dataset for {other}"),
    };
    let docs = eval::docs(&load(kind, "test")).unwrap();
    let pool = pool_split.map_or(vec![], |s| eval::docs(&load(kind, s)).unwrap());
    (docs, pool)
}

#[test]
fn prompts_are_byte_identical_to_lm_eval() {
    let rows = fixture("prompts.jsonl");
    assert!(rows.len() >= 100);
    let mut cache: HashMap<String, (Vec<Doc>, Vec<Doc>)> = HashMap::new();
    let mut checked: HashMap<String, usize> = HashMap::new();
    for row in &rows {
        let name = row["preset"].as_str().unwrap();
        let shots = row["shots"].as_u64().unwrap() as usize;
        let id = row["id"].as_str().unwrap();
        let (docs, pool) = cache
            .entry(name.to_string())
            .or_insert_with(|| dataset(name));
        let preset = Preset::get(name).unwrap();
        let (row_number, doc) = docs
            .iter()
            .enumerate()
            .find(|(_, d)| d.question.id == id)
            .unwrap_or_else(|| panic!("{id} not in the sample"));
        let renderer = Renderer::new(&preset, shots, pool, 200).unwrap();
        let row_number = rlvr::eval::render::row_of(id, row_number);
        let Prompt::Text(prompt) = renderer.prompt(doc, row_number).unwrap() else {
            panic!("lm-eval presets are plain text")
        };
        let want = row["context"].as_str().unwrap();
        assert_eq!(prompt, want, "{name} {shots}-shot {id}");
        if let Some(conts) = row.get("continuations") {
            let ours: Vec<String> = (0..doc.question.choices.len())
                .map(|i| format!("{}{}", preset.target_delimiter, (b'A' + i as u8) as char))
                .collect();
            let theirs: Vec<String> = serde_json::from_value(conts.clone()).unwrap();
            assert_eq!(ours, theirs, "{id}");
        }
        if let Some(until) = row.get("until") {
            let theirs: Vec<String> = serde_json::from_value(until.clone()).unwrap();
            assert_eq!(preset.generation.until, theirs, "{name}");
        }
        *checked.entry(format!("{name}/{shots}")).or_default() += 1;
    }
    for key in [
        "mmlu/0",
        "mmlu/5",
        "cmmlu/0",
        "cmmlu/5",
        "mmlu_pro/5",
        "gsm8k/5",
        "gsm8k_cot/8",
        "medqa/0",
    ] {
        assert!(
            checked.get(key).copied().unwrap_or(0) > 0,
            "no {key} prompts checked"
        );
    }
}

#[test]
fn extraction_agrees_with_lm_eval_filters() {
    let rows = fixture("extraction.jsonl");
    assert!(rows.len() >= 300, "{} responses", rows.len());
    let presets: Vec<(&str, Preset)> = ["gsm8k", "gsm8k_cot", "mmlu_pro"]
        .into_iter()
        .map(|n| (n, Preset::get(n).unwrap()))
        .collect();
    let mut compared = 0;
    for row in &rows {
        let response = row["response"].as_str().unwrap();
        let gold = row["gold"].as_str().unwrap();
        for (name, preset) in &presets {
            let q = rlvr::data::question::Question {
                id: "x".into(),
                answer: gold.into(),
                choices: if *name == "mmlu_pro" {
                    vec!["o".into(); 10]
                } else {
                    vec![]
                },
                ..Default::default()
            };
            for filter in &preset.filters {
                let lm_name = match (*name, filter.name.as_str()) {
                    (_, "strict") => "strict-match",
                    (_, "flexible") => "flexible-extract",
                    (_, other) => other,
                };
                let key = format!("{name}/{lm_name}");
                let expected = &row[&key];
                let ours = apply(filter, response, &q, 0);
                if lm_name == "official" {
                    match expected.as_str() {
                        Some(letter) => {
                            assert_eq!(ours.pred.as_deref(), Some(letter), "{key}: {response:?}")
                        }
                        None => {
                            assert_eq!(ours.rule.as_deref(), Some("random"), "{key}: {response:?}")
                        }
                    }
                    continue;
                }
                let want = expected["pred"].as_str().unwrap();
                let got = ours.pred.clone().unwrap_or_else(|| "[invalid]".into());
                assert_eq!(got, want, "{key}: {response:?}");
                let verdict = is_correct(&preset.metric, ours.pred.as_deref(), response, &q);
                let theirs = expected["exact_match"].as_f64().unwrap() == 1.0;
                assert_eq!(
                    verdict, theirs,
                    "{key} exact_match: {response:?} gold {gold}"
                );
                compared += 1;
            }
        }
    }
    assert!(compared >= 1500, "{compared}");
}

fn tiny() -> LanguageModel {
    LanguageModel::load(
        &repo("tests/fixtures/tiny-gemma3"),
        Some(&repo("tests/fixtures/tiny-tokenizer/tokenizer.json")),
        &Device::Cpu,
    )
    .unwrap()
}

/// The local model, counting the questions it is asked.
struct Counting {
    lm: LocalModel,
    asked: AtomicUsize,
}

impl Backend for Counting {
    fn model_name(&self) -> String {
        self.lm.model_name()
    }
    fn adapter(&self) -> Option<String> {
        self.lm.adapter()
    }
    fn complete(
        &self,
        p: &[Prompt],
        o: &GenerateOptions,
        j: &Job,
    ) -> Result<Vec<Completed>, EvalError> {
        self.asked.fetch_add(p.len(), Ordering::SeqCst);
        self.lm.complete(p, o, j)
    }
    fn loglik(&self, r: &[Choices], j: &Job) -> Result<Vec<Scored>, EvalError> {
        self.asked.fetch_add(r.len(), Ordering::SeqCst);
        self.lm.loglik(r, j)
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rlvr-eval-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn mmlu_items(n: usize) -> DataFrame {
    let options = LoadOptions {
        split: Some("test".into()),
        subjects: Some(vec!["anatomy".into(), "virology".into()]),
        ..LoadOptions::default()
    };
    data::load("mmlu", Path::new(&repo("data/samples/mmlu")), &options)
        .unwrap()
        .head(Some(n))
}

#[test]
fn batched_shared_prefix_scores_equal_one_by_one_scores() {
    let lm = tiny();
    let requests = vec![
        Choices {
            context: "Question: which one?\nAnswer:".into(),
            continuations: vec![" A".into(), " B".into(), " the patient".into()],
        },
        Choices {
            context: "The patient has a fever and".into(),
            continuations: vec![" a cough".into(), " C".into()],
        },
        Choices {
            context: "Short ".into(), // a trailing space moves to the continuation
            continuations: vec!["answer".into(), "reply here".into()],
        },
    ];
    // contexts sharing a few-shot prefix longer than the sliding window take the
    // prefix-once path
    let shots = "Question: 2 + 2?\nAnswer: 4\n\nQuestion: the patient has a fever.\nAnswer: B\n\n";
    let letters = || vec![" A".to_string(), " B".to_string(), " C".to_string()];
    let shared: Vec<Choices> = [
        "Which?",
        "Which drug for a fever and a cough?",
        "Why?\nAnswer:",
    ]
    .iter()
    .map(|q| Choices {
        context: format!("{shots}Question: {q}\nAnswer:"),
        continuations: letters(),
    })
    .collect();
    let requests: Vec<Choices> = requests.into_iter().chain(shared.clone()).collect();
    let backend = LocalModel::new(&lm).unwrap();
    let mut scored = backend.loglik(&requests, &Job::silent()).unwrap();
    scored.extend(backend.loglik(&shared, &Job::silent()).unwrap());
    let requests: Vec<Choices> = requests.into_iter().chain(shared).collect();
    for (r, s) in requests.iter().zip(&scored) {
        for (c, &lp) in r.continuations.iter().zip(&s.logprobs) {
            // lm-eval's split: the context without its trailing spaces, then the rest
            let context = r.context.trim_end();
            let whole = format!("{}{c}", r.context);
            let ctx_ids = lm.tokenizer.encode(context).unwrap();
            let all = lm.tokenizer.encode(&whole).unwrap();
            let cont = &all[ctx_ids.len()..];
            let one = lm
                .model
                .completion_logprobs(&ctx_ids, cont, false)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap() as f64;
            assert!((lp - one).abs() < 1e-4, "{c:?}: {lp} vs {one}");
        }
    }
}

#[test]
fn evaluate_loglik_caches_and_resumes() {
    let items = mmlu_items(12);
    let dir = temp_dir("loglik");
    let backend = Counting {
        lm: LocalModel::new(&tiny()).unwrap(),
        asked: AtomicUsize::new(0),
    };
    let options = EvalOptions {
        batch: Some(5),
        cache_dir: Some(dir.clone()),
        ..EvalOptions::default()
    };
    let res = eval::evaluate(&backend, &items, &options, &Job::silent()).unwrap();
    assert_eq!(backend.asked.load(Ordering::SeqCst), 12);
    for col in [
        "id",
        "dataset",
        "subject",
        "category",
        "medical",
        "model",
        "adapter",
        "preset",
        "pred",
        "correct",
        "response",
        "prompt_tokens",
        "tokens",
        "logprobs",
    ] {
        assert!(res.column(col).is_ok(), "no column {col}");
    }
    let ids: Vec<&str> = res
        .column("id")
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .flatten()
        .collect();
    let want: Vec<&str> = items
        .column("id")
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .flatten()
        .collect();
    assert_eq!(ids, want, "results keep the items' order");
    let preds: Vec<&str> = res
        .column("pred")
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .flatten()
        .collect();
    assert_eq!(preds.len(), 12);
    assert!(preds.iter().all(|p| ["A", "B", "C", "D"].contains(p)));

    // a rerun asks nothing; a larger set asks only the new items
    let again = eval::evaluate(&backend, &items, &options, &Job::silent()).unwrap();
    assert_eq!(backend.asked.load(Ordering::SeqCst), 12);
    // the same table, log-probs up to their JSON round trip
    let without = |df: &DataFrame| df.drop("logprobs").unwrap();
    assert!(without(&again).equals_missing(&without(&res)));
    let lp = |df: &DataFrame| -> Vec<f64> {
        let list = df.column("logprobs").unwrap().list().unwrap().clone();
        list.amortized_iter()
            .flatten()
            .flat_map(|s| {
                s.as_ref()
                    .f64()
                    .unwrap()
                    .iter()
                    .flatten()
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    for (a, b) in lp(&again).iter().zip(lp(&res)) {
        assert!((a - b).abs() < 1e-9);
    }
    let more = mmlu_items(15);
    eval::evaluate(&backend, &more, &options, &Job::silent()).unwrap();
    assert_eq!(backend.asked.load(Ordering::SeqCst), 15);

    // a different shot count is a different setting
    let dev = load("mmlu", "dev");
    let five = EvalOptions {
        shots: Some(2),
        fewshot: Some(dev),
        ..options.clone()
    };
    let res5 = eval::evaluate(&backend, &items, &five, &Job::silent()).unwrap();
    assert_eq!(backend.asked.load(Ordering::SeqCst), 27);
    let tokens0: u64 = res
        .column("prompt_tokens")
        .unwrap()
        .u64()
        .unwrap()
        .sum()
        .unwrap();
    let tokens5: u64 = res5
        .column("prompt_tokens")
        .unwrap()
        .u64()
        .unwrap()
        .sum()
        .unwrap();
    assert!(tokens5 > tokens0);

    let table = eval::summary(&res, "category", eval::Average::Micro, "correct").unwrap();
    assert!(table.column("ci_low").is_ok() && table.column("accuracy").is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn cancelling_keeps_finished_batches_and_a_rerun_resumes() {
    let items = mmlu_items(9);
    let dir = temp_dir("cancel");
    let lm = LocalModel::new(&tiny()).unwrap();
    let options = EvalOptions {
        batch: Some(3),
        cache_dir: Some(dir.clone()),
        ..EvalOptions::default()
    };
    /// Cancels the job once `after` questions are done.
    struct StopAfter {
        cancel: Cancel,
        after: u64,
    }
    impl rlvr::progress::Progress for StopAfter {
        fn start(&self, _: &str, _: u64) {}
        fn update(&self, done: u64, _: &str) {
            if done >= self.after {
                self.cancel.cancel();
            }
        }
        fn finish(&self, _: &str) {}
    }
    let cancel = Cancel::new();
    let job = Job {
        progress: std::sync::Arc::new(StopAfter {
            cancel: cancel.clone(),
            after: 3,
        }),
        cancel,
    };
    let err = eval::evaluate(&lm, &items, &options, &job).unwrap_err();
    assert!(matches!(err, EvalError::Cancelled(_)), "{err}");
    let counting = Counting {
        lm,
        asked: AtomicUsize::new(0),
    };
    let job = Job {
        progress: std::sync::Arc::new(Silent),
        cancel: Cancel::new(),
    };
    let res = eval::evaluate(&counting, &items, &options, &job).unwrap();
    assert_eq!(res.height(), 9);
    assert_eq!(
        counting.asked.load(Ordering::SeqCst),
        6,
        "the first batch came from the cache"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn generate_mode_extracts_and_scores() {
    let gsm = load("gsm8k", "test").head(Some(3));
    let train = load("gsm8k", "train");
    let lm = LocalModel::new(&tiny()).unwrap();
    let options = EvalOptions {
        max_tokens: Some(6),
        fewshot: Some(train),
        shots: Some(2),
        cache_dir: None,
        ..EvalOptions::default()
    };
    let res = eval::evaluate(&lm, &gsm, &options, &Job::silent()).unwrap();
    assert_eq!(res.height(), 3);
    for col in [
        "response",
        "pred",
        "pred_flexible",
        "correct_flexible",
        "rule",
    ] {
        assert!(res.column(col).is_ok(), "no column {col}");
    }
    let tokens: Vec<u64> = res
        .column("tokens")
        .unwrap()
        .u64()
        .unwrap()
        .iter()
        .flatten()
        .collect();
    assert!(tokens.iter().all(|&t| (1..=6).contains(&t)), "{tokens:?}");
    // the study format on multiple choice, through the chat template
    let med = load("medqa", "test").head(Some(2));
    let study = EvalOptions {
        mode: Some(rlvr::eval::preset::Mode::Generate),
        max_tokens: Some(4),
        cache_dir: None,
        ..EvalOptions::default()
    };
    let res = eval::evaluate(&lm, &med, &study, &Job::silent()).unwrap();
    let preset: Vec<&str> = res
        .column("preset")
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .flatten()
        .collect();
    assert_eq!(preset, ["study", "study"]);
    // a mode the preset does not have is refused
    let wrong = EvalOptions {
        preset: Some("mmlu".into()),
        mode: Some(rlvr::eval::preset::Mode::Generate),
        ..EvalOptions::default()
    };
    let err = eval::evaluate(&lm, &med, &wrong, &Job::silent())
        .unwrap_err()
        .to_string();
    assert!(err.contains("loglik"), "{err}");
}

#[test]
fn an_adapter_is_merged_for_evaluation_and_fingerprinted() {
    let base = tiny();
    let tuned = base
        .load_adapter(&repo("tests/fixtures/tiny-gemma3/adapter"))
        .unwrap();
    let backend = LocalModel::new(&tuned).unwrap();
    let fingerprint = backend.adapter().expect("an adapter is attached");
    assert_eq!(LocalModel::new(&base).unwrap().adapter(), None);
    let other = base.with_lora(&Default::default()).unwrap();
    assert_ne!(
        LocalModel::new(&other).unwrap().adapter(),
        Some(fingerprint)
    );
    let request = Choices {
        context: "Question: which one?\nAnswer:".into(),
        continuations: vec![" A".into(), " the patient".into()],
    };
    let scored = backend
        .loglik(std::slice::from_ref(&request), &Job::silent())
        .unwrap();
    for (c, &lp) in request.continuations.iter().zip(&scored[0].logprobs) {
        // the adapter applied as B A x beside the frozen weight
        let unmerged = tuned.logprob(&request.context, c).unwrap() as f64;
        let plain = base.logprob(&request.context, c).unwrap() as f64;
        assert!((lp - unmerged).abs() < 1e-4, "{c:?}: {lp} vs {unmerged}");
        assert!((lp - plain).abs() > 1e-4, "the adapter changes the scores");
    }
}

/// `items` with `column` (text) replaced by `f(row, value)`.
fn edited(items: &DataFrame, column: &str, f: impl Fn(usize, &str) -> String) -> DataFrame {
    let values: Vec<String> = items
        .column(column)
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, v)| f(i, v))
        .collect();
    let mut edited = items.clone();
    edited
        .with_column(Column::new(column.into(), values))
        .unwrap();
    edited
}

#[test]
fn a_changed_question_prompt_or_stop_text_is_asked_again() {
    let med = load("medqa", "test").head(Some(3));
    let dir = temp_dir("key");
    std::fs::create_dir_all(&dir).unwrap();
    let backend = Counting {
        lm: LocalModel::new(&tiny()).unwrap(),
        asked: AtomicUsize::new(0),
    };
    // one preset name throughout: the cache must see the preset's content, not its name
    let preset = |file: &str, system: &str, text: &str, until: &str| -> EvalOptions {
        let path = dir.join(format!("{file}.json"));
        let preset = serde_json::json!({
            "name": "custom",
            "about": "a test preset",
            "mode": "generate",
            "chat": true,
            "system": system,
            "text": text,
            "generation": { "until": [until], "max_tokens": 4 },
            "filters": [{ "name": "answer", "steps": [{ "study": true }] }],
            "metric": { "kind": "study" },
        });
        std::fs::write(&path, preset.to_string()).unwrap();
        EvalOptions {
            preset: Some(path.display().to_string()),
            cache_dir: Some(dir.join("cache")),
            ..EvalOptions::default()
        }
    };
    let asked = |items: &DataFrame, options: &EvalOptions| {
        eval::evaluate(&backend, items, options, &Job::silent()).unwrap();
        backend.asked.load(Ordering::SeqCst)
    };
    let base = preset("base", "Be brief.", "{{ study_question }}", "</answer>");
    assert_eq!(asked(&med, &base), 3);
    assert_eq!(asked(&med, &base), 3, "a rerun asks nothing");
    let question = edited(&med, "question", |i, q| {
        if i == 0 {
            format!("{q} Explain.")
        } else {
            q.to_string()
        }
    });
    assert_eq!(asked(&question, &base), 4, "an edited question");
    let system = preset(
        "system",
        "Be thorough.",
        "{{ study_question }}",
        "</answer>",
    );
    assert_eq!(asked(&med, &system), 7, "a new system prompt");
    let text = preset("text", "Be brief.", "Q: {{ study_question }}", "</answer>");
    assert_eq!(asked(&med, &text), 10, "a new prompt template");
    let until = preset("until", "Be brief.", "{{ study_question }}", "\n");
    assert_eq!(asked(&med, &until), 13, "a new stop text");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_changed_answer_key_is_scored_anew_from_the_cached_output() {
    let items = mmlu_items(4);
    let dir = temp_dir("answer");
    let backend = Counting {
        lm: LocalModel::new(&tiny()).unwrap(),
        asked: AtomicUsize::new(0),
    };
    let options = EvalOptions {
        cache_dir: Some(dir.clone()),
        ..EvalOptions::default()
    };
    let first = eval::evaluate(&backend, &items, &options, &Job::silent()).unwrap();
    let preds: Vec<String> = first
        .column("pred")
        .unwrap()
        .str()
        .unwrap()
        .iter()
        .flatten()
        .map(str::to_string)
        .collect();
    // the key now agrees with every prediction: each row is right, without asking again
    let corrected = edited(&items, "answer", |i, _| preds[i].clone());
    let again = eval::evaluate(&backend, &corrected, &options, &Job::silent()).unwrap();
    assert_eq!(backend.asked.load(Ordering::SeqCst), 4);
    let correct: Vec<bool> = again
        .column("correct")
        .unwrap()
        .bool()
        .unwrap()
        .iter()
        .flatten()
        .collect();
    assert_eq!(correct, [true; 4]);
    let _ = std::fs::remove_dir_all(&dir);
}
