//! Supervised fine-tuning (`sft`): the loss falls, an identical rerun loads the cached
//! result, a changed answer trains again, and a cancelled run leaves the adapters alone.

use std::path::PathBuf;

use candle_core::Device;
use rlvr::data::question::Question;
use rlvr::model::lm::LanguageModel;
use rlvr::model::lora;
use rlvr::progress::{Cancel, Job};
use rlvr::sft::{self, SftConfig, SftError};

use crate::{repo, tiny_policy};

fn items() -> Vec<Question> {
    ["Which organ pumps blood?", "Which organ filters urine?"]
        .iter()
        .enumerate()
        .map(|(i, q)| Question {
            id: format!("sft/{i}"),
            question: q.to_string(),
            choices: vec!["Heart".into(), "Kidney".into()],
            answer: ["A", "B"][i].into(),
            answer_text: ["Heart", "Kidney"][i].into(),
            ..Question::default()
        })
        .collect()
}

fn config(name: &str) -> SftConfig {
    let dir: PathBuf = std::env::temp_dir().join(format!("rlvr-sft-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    SftConfig {
        steps: 10,
        batch: 2,
        lr: 1e-2,
        cache_dir: dir,
        ..SftConfig::default()
    }
}

fn adapter_values(policy: &mut LanguageModel) -> Vec<Vec<f32>> {
    lora::variables(&mut policy.model)
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

fn losses(metrics: &polars::prelude::DataFrame) -> Vec<f64> {
    metrics
        .column("loss")
        .unwrap()
        .f64()
        .unwrap()
        .into_no_null_iter()
        .collect()
}

#[test]
fn the_loss_falls_and_an_identical_rerun_loads_the_cached_adapter() {
    let config = config("cache");
    let mut first = tiny_policy(3);
    let before = adapter_values(&mut first);
    let metrics = sft::train(&mut first, &items(), &config, &Job::silent()).unwrap();
    let loss = losses(&metrics);
    assert_eq!(loss.len(), 10);
    assert!(
        loss[9] < 0.5 * loss[0],
        "the loss should fall on two repeated examples: {loss:?}"
    );
    let trained = adapter_values(&mut first);
    assert_ne!(before, trained, "training changes the adapters");

    // the same run again: loaded, not trained (same metrics, same adapter, no new folder)
    let mut second = tiny_policy(3);
    let again = sft::train(&mut second, &items(), &config, &Job::silent()).unwrap();
    assert_eq!(losses(&again), loss);
    assert_eq!(adapter_values(&mut second), trained);
    let runs = || {
        std::fs::read_dir(config.cache_dir.join("sft"))
            .unwrap()
            .count()
    };
    assert_eq!(runs(), 1);

    // a corrected answer key is another run
    let mut changed = items();
    changed[1].answer = "A".into();
    let mut third = tiny_policy(3);
    sft::train(&mut third, &changed, &config, &Job::silent()).unwrap();
    assert_eq!(runs(), 2);
}

#[test]
fn a_cancelled_run_leaves_the_adapters_as_they_were() {
    let config = config("cancel");
    let mut policy = tiny_policy(3);
    let before = adapter_values(&mut policy);
    let cancel = Cancel::new();
    cancel.cancel();
    let job = Job {
        progress: Job::silent().progress,
        cancel,
    };
    match sft::train(&mut policy, &items(), &config, &job) {
        Err(SftError::Interrupted { step }) => assert_eq!(step, 1),
        other => panic!("expected an interruption, got {other:?}"),
    }
    assert_eq!(adapter_values(&mut policy), before);
    assert!(!config.cache_dir.join("sft").exists(), "nothing is saved");
}

#[test]
fn a_policy_without_adapters_is_refused() {
    let mut base = LanguageModel::load(
        &repo("tests/fixtures/tiny-gemma3"),
        Some(&repo("tests/fixtures/tiny-tokenizer/tokenizer.json")),
        &Device::Cpu,
    )
    .unwrap();
    let err = sft::train(&mut base, &items(), &config("none"), &Job::silent()).unwrap_err();
    assert!(err.to_string().contains("with_lora"), "{err}");
}
