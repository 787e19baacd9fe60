//! LoRA-GRPO: group relative policy optimisation of a model's LoRA adapters, in process.
//!
//! Each step draws prompts in a seeded order, samples a group of completions per prompt with
//! the live adapters (one KV-cached batch), scores them with the rewards, turns the rewards
//! into group advantages and takes `num_iterations` AdamW updates of the loss (TRL 1.16's,
//! [`loss`]: every loss type and knob of its `GRPOConfig`), accumulating gradients over
//! micro-batches. The log-probs at sampling time (`old`, for μ > 1) are taken once per step,
//! before its first update, as TRL takes them at generation. The KL reference is the model
//! with its adapters off, or with `sync_ref_model` a copy of the adapters that starts as
//! the starting adapter (adapters off for a fresh one, whose B is 0) and is mixed towards
//! the policy every `ref_model_sync_steps` updates (TR-DPO's rule, applied to each LoRA
//! tensor as TRL applies it to each parameter; it is checkpointed with the run). Rollouts
//! from another engine carry the sampler's log-probs ([`Rollout`]'s `sampling_logps`) and
//! go through the mismatch correction ([`loss::sampling_correction`]); local rollouts are
//! sampled by the model being trained, so their mismatch is 0. With `max_staleness` s a
//! server samples step n with the policy after max(0, n − s) steps, the next s steps while
//! one trains; the correction's ratio (trainer now / sampler) covers that lag too, and the
//! checkpoint keeps the last s policies. Every random choice is
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
use loss::{aggregate_advantages, reward_moments, LossInputs, LossSettings, LossStats};
use optim::{clip_grad_norm, AdamW};

use crate::data::question::Question;
use crate::model::generate::{Finish, Sampling};
use crate::model::lm::LanguageModel;
use crate::model::{lora, padded};
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
    /// The sampling engine's log-prob of each token, for rollouts from another engine
    /// (none for local rollouts: the sampler is the model being trained).
    sampling_logps: Option<Vec<f32>>,
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
    train_with(
        policy,
        items,
        rewards,
        config,
        &mut rollout::Local::default(),
        job,
    )
}

/// [`train`] with the completions of each step from `rollouts` (e.g. a server holding the
/// policy's adapters, [`rollout::Served`]). With `max_staleness` s, step n (from 0) is
/// sampled by the policy after max(0, n − s) steps, submitted as soon as that policy
/// exists: a pure function of the settings, whatever the timing. Any sampling still running
/// when the run ends, fails or is interrupted is stopped.
pub fn train_with(
    policy: &mut LanguageModel,
    items: &[Question],
    rewards: &[Reward],
    config: &GrpoConfig,
    rollouts: &mut dyn rollout::Rollouts,
    job: &Job,
) -> Result<GrpoRun, GrpoError> {
    let run = train_steps(policy, items, rewards, config, rollouts, job);
    rollouts.stop();
    run
}

fn train_steps(
    policy: &mut LanguageModel,
    items: &[Question],
    rewards: &[Reward],
    config: &GrpoConfig,
    rollouts: &mut dyn rollout::Rollouts,
    job: &Job,
) -> Result<GrpoRun, GrpoError> {
    config.validate()?;
    let served = rollouts.sampled_elsewhere();
    if config.max_staleness > 0 && !served {
        return Err(GrpoError::Setup(format!(
            "max_staleness {} needs rollouts on a server (`rollout: endpoint(...)`): local \
             rollouts are sampled by the policy being trained, between its updates; set \
             max_staleness to 0",
            config.max_staleness
        )));
    }
    if served && config.vllm_importance_sampling_correction && config.sampling.temperature != 1.0 {
        // a server's log-probs are the model's at temperature 1; the trainer's are tempered
        return Err(GrpoError::Setup(format!(
            "the mismatch correction compares the server's log-probs (temperature 1) with \
             the trainer's at the sampling temperature {}: sample at temperature 1 or set \
             vllm_importance_sampling_correction to false",
            config.sampling.temperature
        )));
    }
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
    if let Some(w) = &config.reward_weights {
        if w.len() != rewards.len() {
            return Err(GrpoError::Setup(format!(
                "{} reward_weights for {} rewards",
                w.len(),
                rewards.len()
            )));
        }
    }
    let weights: Vec<f64> = match &config.reward_weights {
        Some(w) => w.clone(),
        None => rewards.iter().map(|r| r.weight).collect(),
    };
    let vars = lora::variables(&mut policy.model);
    let prompts = items
        .iter()
        .map(|q| {
            let text = policy.tokenizer.chat(&config.template.messages(q), true)?;
            policy.tokenizer.encode(&text)
        })
        .collect::<Result<Vec<_>, _>>()?;

    let key = run_key(policy, &vars, items, &prompts, rewards, &weights, config)?;
    let dir = config.cache_dir.join("grpo").join(&key);
    let mut store = store::RunStore::open(&dir, config)?;
    let mut optimizer = AdamW::new(vars.clone(), config.adamw)?;
    // the synced reference starts as the starting adapter
    let mut reference: Option<Vec<Tensor>> = if config.sync_ref_model {
        Some(
            vars.iter()
                .map(|(_, v)| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?,
        )
    } else {
        None
    };
    // with max_staleness s, the policies of the last s steps (as each step found it): the
    // steps still to train may be sampled by them, so they are checkpointed too
    let mut stale: Vec<(usize, Vec<Tensor>)> = Vec::new();
    let resumed_from = if config.resume {
        store.restore(&vars, &mut optimizer, reference.as_mut(), &mut stale)?
    } else {
        store.reset()?;
        0
    };

    let reward_names: Vec<String> = rewards.iter().map(|r| r.name.clone()).collect();
    job.progress.start("GRPO", config.steps as u64);
    job.progress.update(resumed_from as u64, "");
    let mut stop_ids = policy.tokenizer.stop_ids();
    stop_ids.sort_unstable();
    stop_ids.dedup();
    let s = config.max_staleness;
    // the policy (after how many steps) that samples step `m`
    let version_of = |m: usize| m.saturating_sub(s);
    let mut step = resumed_from;
    // the first steps: those sampled by policies that exist already
    let mut published = None;
    for m in step..(step + s + 1).min(config.steps) {
        let version = version_of(m);
        if published != Some(version) {
            publish(policy, &vars, &stale, version, step, rollouts)?;
            published = Some(version);
        }
        let (_, rows, requests) = step_batch(items.len(), &prompts, config, &stop_ids, m);
        rollouts.submit(m, version, rows, requests)?;
    }
    // the step of the checkpoint on disk
    let mut saved = resumed_from;
    while step < config.steps {
        if job.cancel.is_cancelled() {
            if saved != step {
                store.checkpoint(step, policy, &optimizer, reference.as_deref(), &stale)?;
            }
            return Err(GrpoError::Interrupted { step, dir });
        }
        // with several updates per step, a step stopped between two of them has changed the
        // adapters, the optimiser and perhaps the synced reference: they go back to where
        // the step started
        let before = Snapshot::take(&vars, &optimizer, reference.as_deref())?;
        let started = Instant::now();
        let sampled = rollouts.take(policy, step, job)?;
        let done = match sampled {
            Some(sampled) => one_step(
                policy,
                items,
                &prompts,
                rewards,
                &weights,
                config,
                &vars,
                &mut optimizer,
                reference.as_mut(),
                Sampled {
                    completions: sampled,
                    served,
                    staleness: step - version_of(step),
                    started,
                },
                &stop_ids,
                step,
                job,
            )?,
            None => None,
        };
        match done {
            Some((row, completions)) => {
                if s > 0 {
                    stale.push((step, before.values));
                    if stale.len() > s {
                        stale.remove(0);
                    }
                }
                step += 1;
                store.append(&row, &completions)?;
                if step % config.checkpoint_every == 0 || step == config.steps {
                    store.checkpoint(step, policy, &optimizer, reference.as_deref(), &stale)?;
                    saved = step;
                }
                // the policy that sampled the step just trained, once no later step needs it
                let used = version_of(step - 1);
                if step == config.steps || version_of(step) != used {
                    rollouts.retire(used)?;
                }
                // the policy as it is now samples the step s ahead
                let next = step + s;
                if next < config.steps {
                    rollouts.publish(policy, step)?;
                    let (_, rows, requests) =
                        step_batch(items.len(), &prompts, config, &stop_ids, next);
                    rollouts.submit(next, step, rows, requests)?;
                }
                job.progress.update(
                    step as u64,
                    &format!("reward {:.3} · {:.1} s/step", row.reward, row.step_s),
                );
            }
            None => {
                before.restore(&vars, &mut optimizer, reference.as_mut())?;
                if saved != step {
                    store.checkpoint(step, policy, &optimizer, reference.as_deref(), &stale)?;
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

/// Makes the policy after `version` steps available to `rollouts`: the live adapters when
/// `version` is the current step `at`, else the kept values of that earlier step, swapped in
/// for the writing (a run resumed with `max_staleness` > 0).
fn publish(
    policy: &LanguageModel,
    vars: &[(String, Var)],
    stale: &[(usize, Vec<Tensor>)],
    version: usize,
    at: usize,
    rollouts: &mut dyn rollout::Rollouts,
) -> Result<(), GrpoError> {
    if version == at {
        return rollouts.publish(policy, version);
    }
    let (_, values) = stale.iter().find(|(k, _)| *k == version).ok_or_else(|| {
        GrpoError::Store(format!(
            "the checkpoint of step {at} lacks the policy of step {version} that \
             max_staleness needs; start over with `resume: false`"
        ))
    })?;
    let current: Vec<Tensor> = vars
        .iter()
        .map(|(_, v)| v.as_tensor().copy())
        .collect::<candle_core::Result<_>>()?;
    for ((_, var), value) in vars.iter().zip(values) {
        crate::model::lora::set(var, value)?;
    }
    let published = rollouts.publish(policy, version);
    for ((_, var), value) in vars.iter().zip(&current) {
        crate::model::lora::set(var, value)?;
    }
    published
}

/// Step `step`'s draw: the chosen items, one prompt row per completion (each prompt `group`
/// times) and each row's sampling request with its own seed.
fn step_batch(
    n_items: usize,
    prompts: &[Vec<u32>],
    config: &GrpoConfig,
    stop_ids: &[u32],
    step: usize,
) -> (Vec<usize>, Vec<Vec<u32>>, Vec<Sampling>) {
    let chosen = draw(n_items, config.prompts_per_step(), step, config.seed);
    let rows: Vec<Vec<u32>> = chosen
        .iter()
        .flat_map(|&p| std::iter::repeat_n(prompts[p].clone(), config.group))
        .collect();
    let step_seed = mix(config.seed, step as u64);
    let requests = (0..rows.len())
        .map(|i| Sampling {
            seed: mix(step_seed, i as u64),
            stop_ids: stop_ids.to_vec(),
            ..config.sampling.clone()
        })
        .collect();
    (chosen, rows, requests)
}

/// A step's completions as they reach the trainer.
struct Sampled {
    /// The completions and their sampling time.
    completions: rollout::Sampled,
    /// Sampled by another engine (their log-probs go through the mismatch correction).
    served: bool,
    /// Steps between the sampling policy and the trained one.
    staleness: usize,
    /// When the step started waiting for them.
    started: Instant,
}

/// The adapters' values, the optimiser's state and the synced reference at the start of a
/// step.
struct Snapshot {
    values: Vec<Tensor>,
    optimizer: optim::AdamWState,
    reference: Option<Vec<Tensor>>,
}

impl Snapshot {
    fn take(
        vars: &[(String, Var)],
        optimizer: &AdamW,
        reference: Option<&[Tensor]>,
    ) -> Result<Self, GrpoError> {
        Ok(Snapshot {
            // a copy: an update writes into the variables' storage
            values: vars
                .iter()
                .map(|(_, v)| v.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?,
            optimizer: optimizer.state(),
            reference: reference.map(<[Tensor]>::to_vec),
        })
    }

    fn restore(
        self,
        vars: &[(String, Var)],
        optimizer: &mut AdamW,
        reference: Option<&mut Vec<Tensor>>,
    ) -> Result<(), GrpoError> {
        for ((_, var), value) in vars.iter().zip(&self.values) {
            lora::set(var, value)?;
        }
        optimizer.set_state(self.optimizer);
        if let (Some(slot), Some(saved)) = (reference, self.reference) {
            *slot = saved;
        }
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
    /// Standard deviation of each reward function over the batch (TRL's
    /// `rewards/<name>/std`).
    #[serde(default)]
    pub reward_stds: Vec<f64>,
    /// Mean entropy of the policy's (temperature-scaled) distribution over the tokens in
    /// the loss.
    #[serde(default)]
    pub entropy: f64,
    /// Mean |sampling − training| log-prob of the sampled tokens (TRL's
    /// `sampling/sampling_logp_difference/mean`): 0 by construction for local rollouts.
    #[serde(default)]
    pub logp_mismatch: f64,
    /// Steps the policy that sampled the step's completions lagged the trained one (at most
    /// `max_staleness`; 0 for synchronous rollouts).
    #[serde(default)]
    pub staleness: usize,
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
    weights: &[f64],
    config: &GrpoConfig,
    vars: &[(String, Var)],
    optimizer: &mut AdamW,
    mut reference: Option<&mut Vec<Tensor>>,
    sampled: Sampled,
    stop_ids: &[u32],
    step: usize,
    job: &Job,
) -> Result<Option<(StepMetrics, Vec<CompletionRow>)>, GrpoError> {
    let Sampled {
        completions:
            rollout::Sampled {
                completions,
                seconds: gen_s,
            },
        served,
        staleness,
        started,
    } = sampled;
    let g = config.group;
    // 1. the step's completions, a group per prompt (sampled by the policy `staleness`
    // steps back)
    let chosen = draw(items.len(), config.prompts_per_step(), step, config.seed);

    // 2. score
    let scoring = Instant::now();
    let mut rollouts = Vec::with_capacity(completions.len());
    for (row, c) in completions.into_iter().enumerate() {
        let prompt = chosen[row / g];
        let text = policy.text_of(&c, stop_ids, &config.sampling)?;
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
        let total = values.iter().zip(weights).map(|(v, w)| v * w).sum();
        rollouts.push(Rollout {
            prompt,
            sampling_logps: (served && config.vllm_importance_sampling_correction)
                .then(|| c.logprobs.clone()),
            ids: c.ids,
            text,
            finish: c.finish,
            rewards: values,
            total,
        });
    }
    let totals: Vec<f64> = rollouts.iter().map(|r| r.total).collect();
    let per_func: Vec<Vec<f64>> = rollouts.iter().map(|r| r.rewards.clone()).collect();
    let (adv, zero_std) = aggregate_advantages(
        &per_func,
        weights,
        g,
        config.scale_rewards,
        config.std_floor,
        config.multi_objective_aggregation,
    );
    let moments = reward_moments(&per_func, rewards.len());
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
        importance_sampling_level: config.importance_sampling_level,
        epsilon_low: config.epsilon_low,
        epsilon_high: config.epsilon_high,
        delta: config.delta,
        sapo_temperature_pos: config.sapo_temperature_pos,
        sapo_temperature_neg: config.sapo_temperature_neg,
        vespo: config.vespo,
        beta: config.beta,
        use_bias_correction_kl: config.use_bias_correction_kl,
        top_entropy_quantile: config.top_entropy_quantile,
        entropy_coef: config.entropy_coef,
        off_policy_mask_threshold: config.off_policy_mask_threshold,
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
            let values: Vec<Vec<f32>> = rows.iter().map(|&i| values(i)).collect();
            padded::right_padded(&values, t, &device)
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
    // rollouts from another engine: the trainer's log-probs before any update are compared
    // with the sampler's (TRL computes them whenever the correction is on)
    let remote = rollouts.iter().any(|r| r.sampling_logps.is_some());
    let correction = if remote {
        config.remote_correction()?
    } else {
        None
    };
    let old: Option<Vec<Tensor>> = if config.num_iterations > 1 || remote {
        Some(
            micro
                .iter()
                .map(|rows| no_grad(rows, true))
                .collect::<Result<_, _>>()?,
        )
    } else {
        None
    };
    let sampling: Option<Vec<Tensor>> = if remote {
        Some(
            micro
                .iter()
                .map(|rows| {
                    padded(rows, &|i| {
                        rollouts[i]
                            .sampling_logps
                            .clone()
                            .unwrap_or_else(|| vec![f32::NAN; rollouts[i].ids.len()])
                    })
                })
                .collect::<candle_core::Result<_>>()?,
        )
    } else {
        None
    };
    // the correction's ratios and the measured mismatch, per micro-batch
    let mut ratios: Vec<Option<Tensor>> = vec![None; micro.len()];
    let mut mismatch = 0.0;
    if let (Some(sampling), Some(old)) = (&sampling, &old) {
        let (mut sum, mut tokens) = (0.0, 0.0);
        for (k, rows) in micro.iter().enumerate() {
            let mask = padded(rows, &|i| masks[i].clone())?;
            let c = correction.unwrap_or_default();
            let (ratio, m) = loss::sampling_correction(&old[k], &sampling[k], &mask, &c)?;
            let n = mask.sum_all()?.to_scalar::<f32>()? as f64;
            sum += m.logp_diff_mean * n;
            tokens += n;
            if correction.is_some() {
                ratios[k] = Some(ratio);
            }
        }
        mismatch = sum / f64::max(tokens, 1.0);
    }
    let reference_logps: Option<Vec<Tensor>> = if config.beta != 0.0 {
        Some(match reference.as_deref() {
            // the synced reference: its values in the adapters for the no-grad forwards
            Some(values) => {
                let current: Vec<Tensor> = vars
                    .iter()
                    .map(|(_, v)| v.as_tensor().copy())
                    .collect::<candle_core::Result<_>>()?;
                for ((_, var), value) in vars.iter().zip(values) {
                    lora::set(var, value)?;
                }
                let logps = micro
                    .iter()
                    .map(|rows| no_grad(rows, true))
                    .collect::<Result<Vec<_>, _>>();
                for ((_, var), value) in vars.iter().zip(&current) {
                    lora::set(var, value)?;
                }
                logps?
            }
            None => micro
                .iter()
                .map(|rows| no_grad(rows, false))
                .collect::<Result<_, _>>()?,
        })
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
            let (logps, entropies) = policy.model.pair_logprobs_entropy(
                &pairs_of(rows),
                true,
                config.sampling.temperature.max(1e-6),
                config.entropy_coef != 0.0,
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
                &LossInputs {
                    logps: &logps,
                    old: &old_k,
                    ref_logps: reference_logps.as_ref().map(|r| &r[k]),
                    adv: &adv_t,
                    mask: &mask,
                    entropies: Some(&entropies),
                    sampling_logps: sampling.as_ref().map(|s| &s[k]),
                    is_ratio: ratios[k].as_ref(),
                },
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
            stats_sum.entropy += stats.entropy;
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
        if let Some(values) = reference.as_deref_mut() {
            if optimizer
                .steps()
                .is_multiple_of(config.ref_model_sync_steps)
            {
                // TR-DPO: ref ← α · policy + (1 − α) · ref
                let alpha = config.ref_model_mixup_alpha;
                for ((_, var), value) in vars.iter().zip(values.iter_mut()) {
                    *value = ((var.as_tensor() * alpha)? + (&*value * (1.0 - alpha))?)?;
                }
            }
        }
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
        rewards: moments.iter().map(|m| m.0).collect(),
        reward_stds: moments.iter().map(|m| m.1).collect(),
        entropy: stats_sum.entropy / stats_n.max(1.0),
        logp_mismatch: mismatch,
        staleness,
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
/// closure's code and captured values) and weight, and the settings
/// ([`GrpoConfig::key_settings`]: how often checkpoints are written changes nothing and is
/// left out; `reward_weights` enters as the rewards' weights).
fn run_key(
    policy: &LanguageModel,
    vars: &[(String, Var)],
    items: &[Question],
    prompts: &[Vec<u32>],
    rewards: &[Reward],
    weights: &[f64],
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
    for (r, w) in rewards.iter().zip(weights) {
        field(r.identity().as_bytes());
        field(&w.to_le_bytes());
    }
    field(config.key_settings().to_string().as_bytes());
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
