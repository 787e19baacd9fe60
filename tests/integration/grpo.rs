//! GRPO on the tiny Gemma 3 fixture: it learns a toy verifiable task, and a run interrupted
//! and resumed ends with exactly the adapter of an uninterrupted run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::Device;
use rlvr::data::question::Question;
use rlvr::grpo::optim::Schedule;
use rlvr::grpo::{self, GrpoConfig, GrpoError};
use rlvr::model::lm::LanguageModel;
use rlvr::model::lora::{self, LoraConfig};
use rlvr::progress::{Cancel, Job, Progress};
use rlvr::prompt::PromptTemplate;
use rlvr::reward::Reward;

use super::{max_abs_diff, repo};

fn tiny_policy(seed: u64) -> LanguageModel {
    let base = LanguageModel::load(
        &repo("tests/fixtures/tiny-gemma3"),
        Some(&repo("tests/fixtures/tiny-tokenizer/tokenizer.json")),
        &Device::Cpu,
    )
    .unwrap();
    base.with_lora(&LoraConfig {
        rank: 8,
        alpha: 16.0,
        seed,
        ..LoraConfig::default()
    })
    .unwrap()
}

fn toy_items() -> Vec<Question> {
    [
        "Say something.",
        "Write a word.",
        "Count to three.",
        "Name a colour.",
    ]
    .iter()
    .enumerate()
    .map(|(i, q)| Question {
        id: format!("toy/{i}"),
        question: q.to_string(),
        answer: "x".into(),
        ..Question::default()
    })
    .collect()
}

/// The share of a completion's characters that are ASCII letters or digits.
fn alphanumeric_share(text: &str) -> f64 {
    let n = text.chars().count();
    if n == 0 {
        return 0.0;
    }
    text.chars().filter(char::is_ascii_alphanumeric).count() as f64 / n as f64
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rlvr-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn toy_config(steps: usize, cache: &str) -> GrpoConfig {
    let mut c = GrpoConfig {
        group: 8,
        batch: 8,
        grad_accum: 1,
        steps,
        lr: 2e-2,
        schedule: Schedule::Constant,
        template: PromptTemplate {
            system: None,
            user: "{question}".into(),
        },
        checkpoint_every: 2,
        cache_dir: scratch(cache),
        ..GrpoConfig::default()
    };
    c.sampling.max_tokens = 8;
    c
}

#[test]
fn mean_reward_rises_on_a_toy_task() {
    let mut policy = tiny_policy(1);
    let items = toy_items();
    let rewards = [Reward::custom("alnum", 1.0, |s| {
        Ok(alphanumeric_share(s.completion))
    })];
    let config = toy_config(40, "learn");
    let run = grpo::train(&mut policy, &items, &rewards, &config, &Job::silent()).unwrap();
    let reward: Vec<f64> = run
        .metrics
        .column("reward")
        .unwrap()
        .f64()
        .unwrap()
        .into_no_null_iter()
        .collect();
    assert_eq!(reward.len(), 40);
    let first = reward[..8].iter().sum::<f64>() / 8.0;
    let last = reward[32..].iter().sum::<f64>() / 8.0;
    assert!(
        last > first + 0.2,
        "mean reward should rise: first 8 steps {first:.3}, last 8 steps {last:.3}: {reward:.3?}"
    );
    assert_eq!(run.completions.height(), 40 * 8);
    assert!(run.metrics.column("reward_alnum").is_ok());
}

/// Cancels the run once `after` steps are done.
struct CancelAfter {
    after: u64,
    cancel: Cancel,
    updates: AtomicUsize,
}

impl Progress for CancelAfter {
    fn start(&self, _: &str, _: u64) {}
    fn update(&self, done: u64, _: &str) {
        self.updates.fetch_add(1, Ordering::SeqCst);
        if done >= self.after {
            self.cancel.cancel();
        }
    }
    fn finish(&self, _: &str) {}
}

fn adapter_values(policy: &mut LanguageModel) -> Vec<Vec<f32>> {
    lora::variables(&mut policy.model)
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn a_resumed_run_equals_an_uninterrupted_one() {
    let items = toy_items();
    let rewards = [Reward::custom("alnum", 1.0, |s| {
        Ok(alphanumeric_share(s.completion))
    })];

    let mut whole = tiny_policy(7);
    let config = toy_config(4, "resume-whole");
    let uninterrupted = grpo::train(&mut whole, &items, &rewards, &config, &Job::silent()).unwrap();

    let config = toy_config(4, "resume-split");
    let cancel = Cancel::new();
    let job = Job {
        progress: Arc::new(CancelAfter {
            after: 2,
            cancel: cancel.clone(),
            updates: AtomicUsize::new(0),
        }),
        cancel,
    };
    let mut first = tiny_policy(7);
    match grpo::train(&mut first, &items, &rewards, &config, &job) {
        Err(GrpoError::Interrupted { step, .. }) => assert_eq!(step, 2),
        other => panic!("expected an interruption, got {other:?}"),
    }
    // a fresh process: the same starting adapter, the same settings
    let mut second = tiny_policy(7);
    let resumed = grpo::train(&mut second, &items, &rewards, &config, &Job::silent()).unwrap();
    assert_eq!(resumed.resumed_from, 2);
    assert_eq!(adapter_values(&mut second), adapter_values(&mut whole));
    let col = |df: &polars::prelude::DataFrame, c: &str| -> Vec<f64> {
        df.column(c)
            .unwrap()
            .f64()
            .unwrap()
            .into_no_null_iter()
            .collect()
    };
    assert_eq!(
        col(&resumed.metrics, "reward"),
        col(&uninterrupted.metrics, "reward")
    );
    assert_eq!(
        col(&resumed.metrics, "loss"),
        col(&uninterrupted.metrics, "loss")
    );
    assert_eq!(resumed.completions.height(), 4 * 8);
}

/// Where the adapter check keeps its files: `$RLVR_PEFT_CHECK_DIR` when set (for
/// `reference/check_grpo_adapter.py`, which loads them in PEFT), else a scratch folder.
fn peft_check_dir() -> PathBuf {
    match std::env::var_os("RLVR_PEFT_CHECK_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => scratch("peft-check"),
    }
}

#[test]
fn an_adapter_saved_after_grpo_reloads_with_equal_logits() {
    let mut policy = tiny_policy(11);
    let rewards = [Reward::custom("alnum", 1.0, |s| {
        Ok(alphanumeric_share(s.completion))
    })];
    let config = toy_config(3, "peft-train");
    grpo::train(&mut policy, &toy_items(), &rewards, &config, &Job::silent()).unwrap();

    let dir = peft_check_dir();
    policy.save_adapter(&dir.join("adapter")).unwrap();
    let encode = |t: &str| policy.tokenizer.encode(t).unwrap();
    let (a, b) = (
        encode("The patient has a fever and a cough."),
        encode("Which drug is given first for anaphylaxis?"),
    );
    let n = a.len().min(b.len());
    let rows = vec![a[..n].to_vec(), b[..n].to_vec()];
    let trained = policy.model.logits(&rows, true).unwrap();
    let base = policy.model.logits(&rows, false).unwrap();
    assert!(
        max_abs_diff(&trained, &base) > 1e-3,
        "three GRPO steps should move the logits"
    );
    let reloaded = policy.load_adapter(&dir.join("adapter")).unwrap();
    let again = reloaded.model.logits(&rows, true).unwrap();
    assert_eq!(max_abs_diff(&again, &trained), 0.0);

    let ids: Vec<i64> = rows.iter().flatten().map(|&i| i64::from(i)).collect();
    let tensors = std::collections::HashMap::from([
        (
            "input_ids".to_string(),
            candle_core::Tensor::from_vec(ids, (2, n), &Device::Cpu).unwrap(),
        ),
        ("logits".to_string(), trained),
        ("base_logits".to_string(), base),
    ]);
    candle_core::safetensors::save(&tensors, dir.join("logits.safetensors")).unwrap();
}
