//! Supervised fine-tuning of a model's LoRA adapters on written answers: the warm-up a small
//! pre-trained model needs before GRPO can reward it, because a model that never writes the
//! study's `<think>…</think><answer>…</answer>` format gets the same reward for every sample
//! and GRPO's advantages are all zero (DeepSeek-R1's "cold start" does the same at scale).
//!
//! Each item becomes the conversation GRPO would prompt with (the same [`PromptTemplate`])
//! and a target completion written from a template (`{answer}`, `{answer_text}`,
//! `{question}`), ended with the model's end-of-turn token so the model learns to stop. The
//! loss is the mean negative log-likelihood of the target tokens (prompt tokens are not
//! trained), minimised with AdamW over shuffled batches. The trained adapter and the
//! metrics are kept under `$RLVR_HOME/cache/sft/<key>`, the key hashing the model, the
//! starting adapter, every prompt and target, and the settings: a rerun of the same warm-up
//! loads the result instead of training again.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Tensor, Var};
use polars::prelude::{Column, DataFrame};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use crate::data::question::Question;
use crate::grpo::optim::{clip_grad_norm, AdamW, AdamWSettings, Schedule};
use crate::model::lm::LanguageModel;
use crate::model::{lora, padded};
use crate::progress::Job;
use crate::prompt::PromptTemplate;

/// The study's format with the right answer: what the warm-up teaches by default.
pub const FORMAT_TARGET: &str =
    "<think> The answer is ({answer}) {answer_text}. </think><answer> {answer} </answer>";

/// A failure of a fine-tuning run.
#[derive(Debug, thiserror::Error)]
pub enum SftError {
    /// Settings that cannot work together, or unusable input.
    #[error("sft: {0}")]
    Setup(String),
    /// A model or tensor failure.
    #[error("sft: {0}")]
    Model(#[from] crate::model::ModelError),
    /// Reading or writing the run's files failed.
    #[error("sft: {0}")]
    Store(String),
    /// Stopped on request; nothing is saved and the adapters are as they were.
    #[error("sft: interrupted at step {step}; the adapters are as they were before `sft`")]
    Interrupted {
        /// The step that was running.
        step: usize,
    },
}

impl From<candle_core::Error> for SftError {
    fn from(e: candle_core::Error) -> Self {
        SftError::Model(e.into())
    }
}

/// Everything a fine-tuning run is set up with.
#[derive(Debug, Clone, PartialEq)]
pub struct SftConfig {
    /// Optimiser steps.
    pub steps: usize,
    /// Examples per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Gradient-norm clip (0: none).
    pub max_grad_norm: f64,
    /// Seed of the example order.
    pub seed: u64,
    /// How a question becomes a conversation (GRPO's, so warm-up and training match).
    pub template: PromptTemplate,
    /// The completion written for each item, with `{answer}`, `{answer_text}` and
    /// `{question}` replaced.
    pub target: String,
    /// Load the result of an identical earlier run instead of training again.
    pub cache: bool,
    /// Where runs keep their files (`<cache_dir>/sft/<key>`).
    pub cache_dir: PathBuf,
}

impl Default for SftConfig {
    /// 16 steps of 4 examples at lr 1e-4 (linear decay), the study's prompt and format.
    fn default() -> Self {
        SftConfig {
            steps: 16,
            batch: 4,
            lr: 1e-4,
            schedule: Schedule::Linear,
            max_grad_norm: 1.0,
            seed: 42,
            template: PromptTemplate::study(),
            target: FORMAT_TARGET.into(),
            cache: true,
            cache_dir: crate::paths::rlvr_home().join("cache"),
        }
    }
}

/// The target completion of one question.
pub fn target_text(template: &str, q: &Question) -> String {
    template
        .replace("{answer_text}", &q.answer_text)
        .replace("{answer}", &q.answer)
        .replace("{question}", &q.question)
}

/// One row per step: `step`, `loss` (mean negative log-likelihood per target token),
/// `tokens` (target tokens), `lr`, `grad_norm`, `step_s`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
struct Metrics {
    step: Vec<u64>,
    loss: Vec<f64>,
    tokens: Vec<u64>,
    lr: Vec<f64>,
    grad_norm: Vec<f64>,
    step_s: Vec<f64>,
}

impl Metrics {
    fn table(&self) -> Result<DataFrame, SftError> {
        DataFrame::new(
            self.step.len(),
            vec![
                Column::new("step".into(), &self.step),
                Column::new("loss".into(), &self.loss),
                Column::new("tokens".into(), &self.tokens),
                Column::new("lr".into(), &self.lr),
                Column::new("grad_norm".into(), &self.grad_norm),
                Column::new("step_s".into(), &self.step_s),
            ],
        )
        .map_err(|e| SftError::Store(e.to_string()))
    }
}

/// Fine-tunes `policy`'s adapters on `items` in place; returns the Metrics table (one row
/// per step). An identical earlier run (same model, starting adapter, examples and
/// settings) is loaded from the cache instead.
pub fn train(
    policy: &mut LanguageModel,
    items: &[Question],
    config: &SftConfig,
    job: &Job,
) -> Result<DataFrame, SftError> {
    if items.is_empty() {
        return Err(SftError::Setup("no items to train on".into()));
    }
    if config.steps == 0 || config.batch == 0 {
        return Err(SftError::Setup("steps and batch must be at least 1".into()));
    }
    if policy.lora.is_none() {
        return Err(SftError::Setup(
            "the policy has no adapters; train `model.with_lora(...)`".into(),
        ));
    }
    let end = policy
        .tokenizer
        .token_id("<end_of_turn>")
        .or_else(|| policy.tokenizer.stop_ids().first().copied())
        .ok_or_else(|| SftError::Setup("the tokenizer has no end-of-turn token".into()))?;
    let mut examples = Vec::with_capacity(items.len());
    for q in items {
        let prompt = policy
            .tokenizer
            .chat(&config.template.messages(q), true)
            .and_then(|text| policy.tokenizer.encode(&text))?;
        let mut target = policy
            .tokenizer
            .encode_plain(&target_text(&config.target, q))?;
        target.push(end);
        examples.push((prompt, target));
    }
    let vars = lora::variables(&mut policy.model);
    let dir = config
        .cache_dir
        .join("sft")
        .join(run_key(policy, &vars, &examples, config)?);
    if config.cache {
        if let Some(metrics) = restore(&dir, &vars)? {
            return metrics.table();
        }
    }
    let start: Vec<Tensor> = vars
        .iter()
        .map(|(_, v)| v.as_tensor().copy())
        .collect::<candle_core::Result<_>>()?;
    let put_back = |vars: &[(String, Var)]| -> Result<(), SftError> {
        for ((_, v), t) in vars.iter().zip(&start) {
            lora::set(v, t)?;
        }
        Ok(())
    };
    let mut optimizer = AdamW::new(vars.clone(), AdamWSettings::default())?;
    let mut metrics = Metrics::default();
    job.progress.start("SFT", config.steps as u64);
    for step in 0..config.steps {
        if job.cancel.is_cancelled() {
            put_back(&vars)?;
            return Err(SftError::Interrupted { step: step + 1 });
        }
        let started = Instant::now();
        let rows = draw(examples.len(), config.batch, step, config.seed);
        let pairs: Vec<(&[u32], &[u32])> = rows
            .iter()
            .map(|&i| (examples[i].0.as_slice(), examples[i].1.as_slice()))
            .collect();
        let logps = policy.model.pair_logprobs(&pairs, true, 1.0)?;
        let lens: Vec<usize> = pairs.iter().map(|(_, t)| t.len()).collect();
        let tokens: usize = lens.iter().sum();
        let mask = padded::length_mask(&lens, logps.dim(1)?, logps.device())?;
        let loss = ((logps * mask)?.sum_all()? / -(tokens as f64))?;
        let grads_store = loss.backward()?;
        let mut grads: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| match grads_store.get(v.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => v.as_tensor().zeros_like(),
            })
            .collect::<candle_core::Result<_>>()?;
        let grad_norm = clip_grad_norm(&mut grads, config.max_grad_norm)?;
        let lr = config.schedule.rate(config.lr, step, config.steps, 0);
        optimizer.step(&grads, lr)?;
        let loss = loss.to_scalar::<f32>()? as f64;
        metrics.step.push(step as u64 + 1);
        metrics.loss.push(loss);
        metrics.tokens.push(tokens as u64);
        metrics.lr.push(lr);
        metrics.grad_norm.push(grad_norm);
        metrics.step_s.push(started.elapsed().as_secs_f64());
        job.progress
            .update(step as u64 + 1, &format!("loss {loss:.3}"));
    }
    job.progress.finish(&format!("{} steps", config.steps));
    save(&dir, &vars, &metrics)?.table()
}

/// The example indices of step `step`: consecutive slices of per-epoch shuffles.
fn draw(n: usize, per_step: usize, step: usize, seed: u64) -> Vec<usize> {
    (step * per_step..(step + 1) * per_step)
        .map(|k| {
            let mut order: Vec<usize> = (0..n).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed ^ (k / n) as u64));
            order[k % n]
        })
        .collect()
}

/// The run's identity: model, starting adapter, every prompt and target, and settings.
fn run_key(
    policy: &LanguageModel,
    vars: &[(String, Var)],
    examples: &[(Vec<u32>, Vec<u32>)],
    config: &SftConfig,
) -> Result<String, SftError> {
    let mut h = Sha256::new();
    h.update(policy.name.as_bytes());
    for (name, var) in vars {
        h.update(name.as_bytes());
        for v in var.as_tensor().flatten_all()?.to_vec1::<f32>()? {
            h.update(v.to_le_bytes());
        }
    }
    for (prompt, target) in examples {
        for id in prompt.iter().chain([&u32::MAX]).chain(target) {
            h.update(id.to_le_bytes());
        }
        h.update(u32::MAX.to_le_bytes());
    }
    h.update(
        format!(
            "{} {} {} {} {} {}",
            config.steps,
            config.batch,
            config.lr,
            config.schedule.name(),
            config.max_grad_norm,
            config.seed
        )
        .as_bytes(),
    );
    Ok(h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect())
}

const ADAPTER: &str = "adapter.safetensors";
const METRICS: &str = "metrics.json";

/// Writes the trained adapter and the metrics, the metrics last (a run whose metrics file
/// exists is complete), each through a temporary file and a rename. Returns the metrics as
/// a rerun reads them back (JSON's reading of a float may differ in its last bit), so a
/// run and its rerun return the same table.
fn save(
    dir: &std::path::Path,
    vars: &[(String, Var)],
    metrics: &Metrics,
) -> Result<Metrics, SftError> {
    let store = |e: &dyn std::fmt::Display| SftError::Store(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(|e| store(&e))?;
    let tensors: std::collections::HashMap<String, Tensor> = vars
        .iter()
        .map(|(name, v)| (name.clone(), v.as_tensor().clone()))
        .collect();
    let tmp = dir.join(format!("{ADAPTER}.tmp"));
    candle_core::safetensors::save(&tensors, &tmp)?;
    std::fs::rename(&tmp, dir.join(ADAPTER)).map_err(|e| store(&e))?;
    let tmp = dir.join(format!("{METRICS}.tmp"));
    let json = serde_json::to_vec(metrics).map_err(|e| store(&e))?;
    std::fs::write(&tmp, &json).map_err(|e| store(&e))?;
    std::fs::rename(&tmp, dir.join(METRICS)).map_err(|e| store(&e))?;
    serde_json::from_slice(&json).map_err(|e| store(&e))
}

/// Loads a complete earlier run into `vars`; `None` when there is none.
fn restore(dir: &std::path::Path, vars: &[(String, Var)]) -> Result<Option<Metrics>, SftError> {
    let Ok(json) = std::fs::read(dir.join(METRICS)) else {
        return Ok(None);
    };
    let store = |e: &dyn std::fmt::Display| SftError::Store(format!("{}: {e}", dir.display()));
    let metrics: Metrics = serde_json::from_slice(&json).map_err(|e| store(&e))?;
    let device = vars
        .first()
        .map(|(_, v)| v.as_tensor().device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let tensors = candle_core::safetensors::load(dir.join(ADAPTER), &device)?;
    for (name, var) in vars {
        let t = tensors
            .get(name)
            .ok_or_else(|| store(&format!("{ADAPTER} has no tensor `{name}`")))?;
        lora::set(var, t)?;
    }
    Ok(Some(metrics))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_target_scores_full_marks_with_the_study_rewards() {
        let q = Question {
            answer: "C".into(),
            answer_text: "Vitamin C".into(),
            ..Question::default()
        };
        let text = target_text(FORMAT_TARGET, &q);
        assert_eq!(
            crate::reward::study_accuracy(&text, "C", Some("Vitamin C")),
            2.0
        );
        assert_eq!(crate::reward::study_format(&text), 2.0);
    }

    #[test]
    fn draws_cover_every_example_once_per_epoch() {
        let mut seen: Vec<usize> = (0..3).flat_map(|s| draw(6, 2, s, 7)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..6).collect::<Vec<_>>());
    }
}
