//! LoRA-GRPO: group relative policy optimisation of a model's LoRA adapters, in process.
//!
//! Each step draws prompts in a seeded order, samples a group of completions per prompt with
//! the live adapters (one KV-cached batch), scores them with the rewards, turns the rewards
//! into group advantages and takes `num_iterations` AdamW updates of the clipped surrogate
//! loss (TRL's, [`loss`]), accumulating gradients over micro-batches. Every random choice is
//! a pure function of the seed and the step, so a run resumed from a checkpoint repeats the
//! uninterrupted run exactly. Progress (metrics, sample completions, checkpoints) is written
//! as it goes under `$RLVR_HOME/cache/grpo/<key>`, the key hashing the model, the starting
//! adapter, the items, the rewards and the settings: a rerun of the same training resumes.

pub mod config;
pub mod loss;
pub mod optim;
pub mod rollout;
mod store;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Tensor, Var};
use polars::prelude::DataFrame;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

pub use config::GrpoConfig;
use loss::{advantages, LossSettings, LossStats};
use optim::{clip_grad_norm, AdamW};

use crate::data::question::Question;
use crate::model::generate::{Finish, Sampling};
use crate::model::lm::LanguageModel;
use crate::model::lora;
use crate::progress::Job;
use crate::reward::{Reward, Scored};

/// A failure of a training run.
#[derive(Debug, thiserror::Error)]
pub enum GrpoError {
    /// Settings that cannot work together, or unusable input.
    #[error("grpo: {0}")]
    Setup(String),
    /// A model or tensor failure.
    #[error("grpo: {0}")]
    Model(#[from] crate::model::ModelError),
    /// A reward function failed.
    #[error("grpo: step {step}: {message}")]
    Reward { step: usize, message: String },
    /// Reading or writing the run's files failed.
    #[error("grpo: {0}")]
    Store(String),
    /// Stopped on request after `step` finished steps; the checkpoint keeps them.
    #[error(
        "grpo: interrupted after step {step}; the checkpoint in {dir} keeps it and a rerun resumes"
    )]
    Interrupted { step: usize, dir: PathBuf },
}

impl From<candle_core::Error> for GrpoError {
    fn from(e: candle_core::Error) -> Self {
        GrpoError::Model(e.into())
    }
}

/// The result of a training run.
#[derive(Debug, Clone)]
pub struct GrpoRun {
    /// One row per step (the Metrics table).
    pub metrics: DataFrame,
    /// One row per sampled completion: step, item id, completion, rewards, advantage.
    pub completions: DataFrame,
    /// Where the run's files are (metrics, completions, checkpoint, manifest).
    pub dir: PathBuf,
    /// Steps resumed from an earlier run (0 for a fresh one).
    pub resumed_from: usize,
}

/// One sampled completion and its scores.
struct Rollout {
    prompt: usize,
    ids: Vec<u32>,
    text: String,
    finish: Finish,
    rewards: Vec<f64>,
    total: f64,
}

/// Trains `policy`'s adapters on `items` with `rewards`; the adapters are updated in place.
pub fn train(
    policy: &mut LanguageModel,
    items: &[Question],
    rewards: &[Reward],
    config: &GrpoConfig,
    job: &Job,
) -> Result<GrpoRun, GrpoError> {
    train_with(policy, items, rewards, config, &mut rollout::Local, job)
}

/// [`train`] with the completions of each step from `rollouts` (e.g. a server holding the
/// policy's current adapter, [`rollout::Served`]).
pub fn train_with(
    policy: &mut LanguageModel,
    items: &[Question],
    rewards: &[Reward],
    config: &GrpoConfig,
    rollouts: &mut dyn rollout::Rollouts,
    job: &Job,
) -> Result<GrpoRun, GrpoError> {
    config.validate()?;
    if items.is_empty() {
        return Err(GrpoError::Setup("no items to train on".into()));
    }
    if rewards.is_empty() {
        return Err(GrpoError::Setup("no reward functions".into()));
    }
    if policy.lora.is_none() {
        return Err(GrpoError::Setup(
            "the policy has no adapters; train `model.with_lora(...)`".into(),
        ));
    }
    let vars = lora::variables(&mut policy.model);
    let prompts = items
        .iter()
        .map(|q| {
            let text = policy.tokenizer.chat(&config.template.messages(q), true)?;
            policy.tokenizer.encode(&text)
        })
        .collect::<Result<Vec<_>, _>>()?;

    let key = run_key(policy, &vars, items, &prompts, rewards, config)?;
    let dir = config.cache_dir.join("grpo").join(&key);
    let mut store = store::RunStore::open(&dir, config)?;
    let mut optimizer = AdamW::new(vars.clone(), config.adamw)?;
    let resumed_from = if config.resume {
        store.restore(&vars, &mut optimizer)?
    } else {
        store.reset()?;
        0
    };

    let reward_names: Vec<String> = rewards.iter().map(|r| r.name.clone()).collect();
    job.progress.start("GRPO", config.steps as u64);
    job.progress.update(resumed_from as u64, "");
    let mut step = resumed_from;
    // the step of the checkpoint on disk
    let mut saved = resumed_from;
    while step < config.steps {
        if job.cancel.is_cancelled() {
            if saved != step {
                store.checkpoint(step, policy, &optimizer)?;
            }
            return Err(GrpoError::Interrupted { step, dir });
        }
        // with several updates per step, a step stopped between two of them has changed the
        // adapters and the optimiser: they go back to where the step started
        let before = Snapshot::take(&vars, &optimizer)?;
        match one_step(
            policy,
            items,
            &prompts,
            rewards,
            config,
            &vars,
            &mut optimizer,
            rollouts,
            step,
            job,
        )? {
            Some((row, completions)) => {
                step += 1;
                store.append(&row, &completions)?;
                if step % config.checkpoint_every == 0 || step == config.steps {
                    store.checkpoint(step, policy, &optimizer)?;
                    saved = step;
                }
                job.progress.update(
                    step as u64,
                    &format!("reward {:.3} · {:.1} s/step", row.reward, row.step_s),
                );
            }
            None => {
                before.restore(&vars, &mut optimizer)?;
                if saved != step {
                    store.checkpoint(step, policy, &optimizer)?;
                }
                return Err(GrpoError::Interrupted { step, dir });
            }
        }
    }
    job.progress.finish(&format!("{step} steps"));
    let (metrics, completions) = store.tables(&reward_names)?;
    Ok(GrpoRun {
        metrics,
        completions,
        dir,
        resumed_from,
    })
}

/// The adapters' values and the optimiser's state at the start of a step.
struct Snapshot {
    values: Vec<Tensor>,
    optimizer: optim::AdamWState,
}

impl Snapshot {
    fn take(vars: &[(String, Var)], optimizer: &AdamW) -> Result<Self, GrpoError> {
        Ok(Snapshot {
            // a copy: an update writes into the variables' storage
            values: vars
                .iter()
                .map(|(_, v)| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?,
            optimizer: optimizer.state(),
        })
    }

    fn restore(self, vars: &[(String, Var)], optimizer: &mut AdamW) -> Result<(), GrpoError> {
        for ((_, var), value) in vars.iter().zip(&self.values) {
            var.set(value)?;
        }
        optimizer.set_state(self.optimizer);
        Ok(())
    }
}

/// The metrics of one step (a Metrics row).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepMetrics {
    /// 1-based step.
    pub step: usize,
    /// Mean micro-batch loss (TRL's `policy_loss`).
    pub loss: f64,
    /// Mean summed reward.
    pub reward: f64,
    /// Standard deviation of the summed reward over the batch.
    pub reward_std: f64,
    /// Mean of each reward function, in the order given.
    pub rewards: Vec<f64>,
    /// Mean k3 KL against the adapters-off reference (0 when beta is 0).
    pub kl: f64,
    /// Share of tokens whose ratio was clipped.
    pub clip_ratio: f64,
    /// Mean completion length in tokens.
    pub completion_len: f64,
    /// Share of completions in groups whose rewards were all equal.
    pub frac_zero_std: f64,
    /// Gradient norm before clipping (of the last update of the step).
    pub grad_norm: f64,
    /// Learning rate of the last update of the step.
    pub lr: f64,
    /// Wall time of the step.
    pub step_s: f64,
    /// Generated tokens per second of generation.
    pub tokens_per_s: f64,
    /// Seconds generating.
    pub gen_s: f64,
    /// Seconds scoring.
    pub reward_s: f64,
    /// Seconds computing losses and updates.
    pub train_s: f64,
}

/// A sampled completion as stored.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CompletionRow {
    /// 1-based step.
    pub step: usize,
    /// The question's id.
    pub id: String,
    /// The completion's text.
    pub completion: String,
    /// Each reward, in the order given.
    pub rewards: Vec<f64>,
    /// The summed reward.
    pub reward: f64,
    /// Its advantage.
    pub advantage: f64,
    /// Its length in tokens.
    pub tokens: usize,
    /// `stop` or `length`.
    pub finish: String,
}

#[allow(clippy::too_many_arguments)]
fn one_step(
    policy: &LanguageModel,
    items: &[Question],
    prompts: &[Vec<u32>],
    rewards: &[Reward],
    config: &GrpoConfig,
    vars: &[(String, Var)],
    optimizer: &mut AdamW,
    rollouts: &mut dyn rollout::Rollouts,
    step: usize,
    job: &Job,
) -> Result<Option<(StepMetrics, Vec<CompletionRow>)>, GrpoError> {
    let started = Instant::now();
    let g = config.group;
    let chosen = draw(items.len(), config.prompts_per_step(), step, config.seed);

    // 1. sample a group per prompt with the live adapters
    let mut stop_ids = policy.tokenizer.stop_ids();
    stop_ids.sort_unstable();
    stop_ids.dedup();
    let row_prompts: Vec<Vec<u32>> = chosen
        .iter()
        .flat_map(|&p| std::iter::repeat_n(prompts[p].clone(), g))
        .collect();
    let step_seed = mix(config.seed, step as u64);
    let requests: Vec<Sampling> = (0..row_prompts.len())
        .map(|i| Sampling {
            seed: mix(step_seed, i as u64),
            stop_ids: stop_ids.clone(),
            ..config.sampling.clone()
        })
        .collect();
    let Some(completions) = rollouts.sample(policy, &row_prompts, &requests, step, job)? else {
        return Ok(None);
    };
    let gen_s = started.elapsed().as_secs_f64();

    // 2. score
    let scoring = Instant::now();
    let mut rollouts = Vec::with_capacity(completions.len());
    for (row, c) in completions.into_iter().enumerate() {
        let prompt = chosen[row / g];
        let text = policy.text_of(&c, &stop_ids, &config.sampling)?;
        let scored = Scored {
            completion: &text,
            question: &items[prompt],
            tokens: c.ids.len(),
            max_tokens: config.sampling.max_tokens,
            truncated: c.finish == Finish::Length,
        };
        let values = rewards
            .iter()
            .map(|r| r.score(&scored))
            .collect::<Result<Vec<f64>, String>>()
            .map_err(|message| GrpoError::Reward {
                step: step + 1,
                message,
            })?;
        let total = values.iter().zip(rewards).map(|(v, r)| v * r.weight).sum();
        rollouts.push(Rollout {
            prompt,
            ids: c.ids,
            text,
            finish: c.finish,
            rewards: values,
            total,
        });
    }
    let totals: Vec<f64> = rollouts.iter().map(|r| r.total).collect();
    let (adv, zero_std) = advantages(&totals, g, config.scale_rewards, config.std_floor);
    let reward_s = scoring.elapsed().as_secs_f64();

    // 3. optimise
    let training = Instant::now();
    let device = policy.model.device().clone();
    let masks: Vec<Vec<f32>> = rollouts
        .iter()
        .zip(&zero_std)
        .map(|(r, &zero)| {
            let off = (config.mask_truncated && r.finish == Finish::Length)
                || (config.filter_zero_std && zero);
            vec![if off { 0.0 } else { 1.0 }; r.ids.len()]
        })
        .collect();
    let batch_tokens: f64 = masks.iter().flatten().map(|&m| m as f64).sum();
    let settings = LossSettings {
        loss_type: config.loss_type,
        epsilon_low: config.epsilon_low,
        epsilon_high: config.epsilon_high,
        beta: config.beta,
        grad_accum: config.grad_accum,
        max_completion_length: config.sampling.max_tokens,
        batch_tokens,
    };
    let micro: Vec<Vec<usize>> = (0..rollouts.len())
        .collect::<Vec<_>>()
        .chunks(config.batch)
        .map(<[usize]>::to_vec)
        .collect();
    let pairs_of = |rows: &[usize]| -> Vec<(&[u32], &[u32])> {
        rows.iter()
            .map(|&i| {
                (
                    prompts[rollouts[i].prompt].as_slice(),
                    rollouts[i].ids.as_slice(),
                )
            })
            .collect()
    };
    let padded =
        |rows: &[usize], values: &dyn Fn(usize) -> Vec<f32>| -> candle_core::Result<Tensor> {
            let t = rows
                .iter()
                .map(|&i| rollouts[i].ids.len())
                .max()
                .unwrap_or(0);
            let mut data = Vec::with_capacity(rows.len() * t);
            for &i in rows {
                let mut v = values(i);
                v.resize(t, 0.0);
                data.extend(v);
            }
            Tensor::from_vec(data, (rows.len(), t), &device)
        };
    let no_grad = |rows: &[usize], adapters_on: bool| -> Result<Tensor, GrpoError> {
        Ok(crate::model::linear::no_grad(|| {
            policy.model.pair_logprobs(
                &pairs_of(rows),
                adapters_on,
                config.sampling.temperature.max(1e-6),
            )
        })?)
    };
    let old: Option<Vec<Tensor>> = if config.num_iterations > 1 {
        Some(
            micro
                .iter()
                .map(|rows| no_grad(rows, true))
                .collect::<Result<_, _>>()?,
        )
    } else {
        None
    };
    let reference: Option<Vec<Tensor>> = if config.beta != 0.0 {
        Some(
            micro
                .iter()
                .map(|rows| no_grad(rows, false))
                .collect::<Result<_, _>>()?,
        )
    } else {
        None
    };
    let mut stats_sum = LossStats::default();
    let mut stats_n = 0.0f64;
    let (mut grad_norm, mut lr) = (0.0, 0.0);
    for _ in 0..config.num_iterations {
        let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
        for (k, rows) in micro.iter().enumerate() {
            if job.cancel.is_cancelled() {
                return Ok(None);
            }
            let logps = policy.model.pair_logprobs(
                &pairs_of(rows),
                true,
                config.sampling.temperature.max(1e-6),
            )?;
            let mask = padded(rows, &|i| masks[i].clone())?;
            let adv_t = Tensor::from_vec(
                rows.iter().map(|&i| adv[i] as f32).collect::<Vec<f32>>(),
                rows.len(),
                &device,
            )?;
            let old_k = match &old {
                Some(o) => o[k].clone(),
                None => logps.detach(),
            };
            let (loss, stats) = loss::loss(
                &logps,
                &old_k,
                reference.as_ref().map(|r| &r[k]),
                &adv_t,
                &mask,
                &settings,
            )?;
            let store = loss.backward()?;
            for (slot, (_, var)) in grads.iter_mut().zip(vars) {
                if let Some(g) = store.get(var.as_tensor()) {
                    *slot = Some(match slot.take() {
                        Some(acc) => (acc + g)?,
                        None => g.clone(),
                    });
                }
            }
            stats_sum.loss += stats.loss;
            stats_sum.kl += stats.kl;
            stats_sum.clip_region += stats.clip_region;
            stats_n += 1.0;
        }
        let mut grads: Vec<Tensor> = grads
            .into_iter()
            .zip(vars)
            .map(|(g, (_, v))| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
            .collect::<candle_core::Result<_>>()?;
        grad_norm = clip_grad_norm(&mut grads, config.max_grad_norm)?;
        let update = optimizer.steps();
        lr = config.schedule.rate(
            config.lr,
            update,
            config.steps * config.num_iterations,
            config.warmup_steps(),
        );
        optimizer.step(&grads, lr)?;
    }
    let train_s = training.elapsed().as_secs_f64();

    let n = rollouts.len() as f64;
    let mean = totals.iter().sum::<f64>() / n;
    let reward_std = if totals.len() > 1 {
        (totals.iter().map(|t| (t - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    let generated: usize = rollouts.iter().map(|r| r.ids.len()).sum();
    let metrics = StepMetrics {
        step: step + 1,
        loss: stats_sum.loss / stats_n.max(1.0),
        reward: mean,
        reward_std,
        rewards: (0..rewards.len())
            .map(|k| rollouts.iter().map(|r| r.rewards[k]).sum::<f64>() / n)
            .collect(),
        kl: stats_sum.kl / stats_n.max(1.0),
        clip_ratio: stats_sum.clip_region / stats_n.max(1.0),
        completion_len: generated as f64 / n,
        frac_zero_std: zero_std.iter().filter(|&&z| z).count() as f64 / n,
        grad_norm,
        lr,
        step_s: started.elapsed().as_secs_f64(),
        tokens_per_s: generated as f64 / gen_s.max(1e-9),
        gen_s,
        reward_s,
        train_s,
    };
    let rows = rollouts
        .iter()
        .zip(&adv)
        .map(|(r, &a)| CompletionRow {
            step: step + 1,
            id: items[r.prompt].id.clone(),
            completion: r.text.clone(),
            rewards: r.rewards.clone(),
            reward: r.total,
            advantage: a,
            tokens: r.ids.len(),
            finish: match r.finish {
                Finish::Stop => "stop",
                _ => "length",
            }
            .to_string(),
        })
        .collect();
    Ok(Some((metrics, rows)))
}

/// The item indices of step `step`: consecutive slices of per-epoch shuffles of all items.
fn draw(n_items: usize, per_step: usize, step: usize, seed: u64) -> Vec<usize> {
    let start = step * per_step;
    (start..start + per_step)
        .map(|k| {
            let epoch = k / n_items;
            let mut order: Vec<usize> = (0..n_items).collect();
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix(
                seed,
                epoch as u64 + 0x5eed,
            )));
            order[k % n_items]
        })
        .collect()
}

/// Mixes two numbers into a seed (SplitMix64's finaliser).
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b
        .wrapping_add(0x9e37_79b9_7f4a_7c15)
        .wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The run's identity: everything that changes its result. The model (its name and
/// configuration), the starting adapter's values, every field of every item (the rewards
/// may read any of them), the tokenized prompts (question, choices, prompt template,
/// system prompt and chat template as the model sees them), each reward's identity (a
/// closure's code and captured values) and weight, and the settings. How often checkpoints
/// are written changes nothing and is left out.
fn run_key(
    policy: &LanguageModel,
    vars: &[(String, Var)],
    items: &[Question],
    prompts: &[Vec<u32>],
    rewards: &[Reward],
    config: &GrpoConfig,
) -> Result<String, GrpoError> {
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(policy.name.as_bytes());
    field(policy.model.config.to_string().as_bytes());
    for (name, var) in vars {
        field(name.as_bytes());
        let values: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        field(&bytes);
    }
    for (q, prompt) in items.iter().zip(prompts) {
        field(format!("{q:?}").as_bytes());
        let bytes: Vec<u8> = prompt.iter().flat_map(|t| t.to_le_bytes()).collect();
        field(&bytes);
    }
    for r in rewards {
        field(r.identity().as_bytes());
        field(&r.weight.to_le_bytes());
    }
    let mut settings = config.manifest();
    if let Some(map) = settings.as_object_mut() {
        map.remove("checkpoint_every");
    }
    field(settings.to_string().as_bytes());
    let digest = h.finalize();
    Ok(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_cover_every_item_once_per_epoch() {
        let mut seen: Vec<usize> = (0..5).flat_map(|s| draw(10, 2, s, 7)).collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..10).collect::<Vec<_>>());
        assert_eq!(draw(10, 2, 3, 7), draw(10, 2, 3, 7));
        assert_ne!(draw(10, 4, 0, 7), draw(10, 4, 0, 8));
    }
}
