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
#[cfg(feature = "http")]
pub mod served;
mod store;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{Device, Tensor, Var};
use polars::prelude::DataFrame;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

pub use config::GrpoConfig;
use loss::{aggregate_advantages, reward_moments, LossInputs, LossSettings, LossStats};
use optim::{clip_grad_norm, AdamW};

use crate::data::question::Question;
use crate::model::generate::{Completion, Finish, Sampling};
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
/// policy's adapters, [`served::Served`]). With `max_staleness` s, step n (from 0) is
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

/// The run behind [`train_with`]: checks the setup, opens the run's files (resuming an
/// earlier run of the same key) and trains the steps still to train.
fn train_steps(
    policy: &mut LanguageModel,
    items: &[Question],
    rewards: &[Reward],
    config: &GrpoConfig,
    rollouts: &mut dyn rollout::Rollouts,
    job: &Job,
) -> Result<GrpoRun, GrpoError> {
    let served = rollouts.sampled_elsewhere();
    check_setup(policy, items, rewards, config, served)?;
    let weights: Vec<f64> = match &config.reward_weights {
        Some(w) => w.clone(),
        None => rewards.iter().map(|r| r.weight).collect(),
    };
    let vars = lora::variables(&mut policy.model);
    let policy: &LanguageModel = policy;
    let prompts = items
        .iter()
        .map(|q| {
            let text = policy.tokenizer.chat(&config.template.messages(q), true)?;
            policy.tokenizer.encode(&text)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut stop_ids = policy.tokenizer.stop_ids();
    stop_ids.sort_unstable();
    stop_ids.dedup();
    let run = RunInputs {
        policy,
        items,
        prompts: &prompts,
        rewards,
        weights: &weights,
        config,
        vars: &vars,
        stop_ids: &stop_ids,
        job,
    };
    Trainer::open(&run, rollouts, served)?.train()
}

/// Refuses settings and inputs a run cannot train with, before anything is read or written.
fn check_setup(
    policy: &LanguageModel,
    items: &[Question],
    rewards: &[Reward],
    config: &GrpoConfig,
    served: bool,
) -> Result<(), GrpoError> {
    config.validate()?;
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
    Ok(())
}

/// A run under way: its inputs, where its completions come from, its files, and the state
/// it trains besides the adapters.
struct Trainer<'a, 'r> {
    run: &'a RunInputs<'a>,
    rollouts: &'r mut dyn rollout::Rollouts,
    /// Whether another engine samples the completions.
    served: bool,
    store: store::RunStore,
    /// Where the run's files are.
    dir: PathBuf,
    optimizer: AdamW,
    /// The synced reference's values (`sync_ref_model`), starting as the starting adapter.
    reference: Option<Vec<Tensor>>,
    /// With max_staleness s, the policies of the last s steps (as each step found it): the
    /// steps still to train may be sampled by them, so they are checkpointed too.
    stale: Vec<(usize, Vec<Tensor>)>,
    /// Steps resumed from an earlier run (0 for a fresh one).
    resumed_from: usize,
    /// The step of the checkpoint on disk.
    saved: usize,
}

impl<'a, 'r> Trainer<'a, 'r> {
    /// Opens the run's files under the cache's `grpo/<key>`, resuming the checkpoint there
    /// with `resume` (else starting over).
    fn open(
        run: &'a RunInputs<'a>,
        rollouts: &'r mut dyn rollout::Rollouts,
        served: bool,
    ) -> Result<Self, GrpoError> {
        let config = run.config;
        let dir = config.cache_dir.join("grpo").join(run_key(run)?);
        let mut store = store::RunStore::open(&dir, config)?;
        let mut optimizer = AdamW::new(run.vars.to_vec(), config.adamw)?;
        let mut reference = if config.sync_ref_model {
            Some(adapter_values(run.vars)?)
        } else {
            None
        };
        let mut stale = Vec::new();
        let resumed_from = if config.resume {
            store.restore(run.vars, &mut optimizer, reference.as_mut(), &mut stale)?
        } else {
            store.reset()?;
            0
        };
        Ok(Trainer {
            run,
            rollouts,
            served,
            store,
            dir,
            optimizer,
            reference,
            stale,
            resumed_from,
            saved: resumed_from,
        })
    }

    /// Trains the steps still to train, step after step, and reads the run's tables.
    fn train(mut self) -> Result<GrpoRun, GrpoError> {
        let (config, job) = (self.run.config, self.run.job);
        job.progress.start("GRPO", config.steps as u64);
        job.progress.update(self.resumed_from as u64, "");
        let mut step = self.resumed_from;
        self.submit_first_steps(step)?;
        while step < config.steps {
            if job.cancel.is_cancelled() {
                return self.interrupt(step);
            }
            // with several updates per step, a step stopped between two of them has changed
            // the adapters, the optimiser and perhaps the synced reference: they go back to
            // where the step started
            let before = Snapshot::take(self.run.vars, &self.optimizer, self.reference.as_deref())?;
            let Some((row, completions)) = self.train_step(step)? else {
                before.restore(self.run.vars, &mut self.optimizer, self.reference.as_mut())?;
                return self.interrupt(step);
            };
            self.record(step, before.values, &row, &completions)?;
            step += 1;
            self.sample_ahead(step)?;
            job.progress.update(
                step as u64,
                &format!("reward {:.3} · {:.1} s/step", row.reward, row.step_s),
            );
        }
        job.progress.finish(&format!("{step} steps"));
        let reward_names: Vec<String> = self.run.rewards.iter().map(|r| r.name.clone()).collect();
        let (metrics, completions) = self.store.tables(&reward_names)?;
        Ok(GrpoRun {
            metrics,
            completions,
            dir: self.dir,
            resumed_from: self.resumed_from,
        })
    }

    /// Submits the first steps from `step` on: those sampled by policies that exist
    /// already (`max_staleness` + 1 at most), publishing each of those policies once.
    fn submit_first_steps(&mut self, step: usize) -> Result<(), GrpoError> {
        let run = self.run;
        let last = (step + run.config.max_staleness + 1).min(run.config.steps);
        let mut published = None;
        for m in step..last {
            let version = run.version_of(m);
            if published != Some(version) {
                publish(
                    run.policy,
                    run.vars,
                    &self.stale,
                    version,
                    step,
                    self.rollouts,
                )?;
                published = Some(version);
            }
            run.submit(self.rollouts, m, version)?;
        }
        Ok(())
    }

    /// Takes step `step`'s completions and trains the step; `None` when the job was
    /// cancelled.
    fn train_step(
        &mut self,
        step: usize,
    ) -> Result<Option<(StepMetrics, Vec<CompletionRow>)>, GrpoError> {
        let run = self.run;
        let started = Instant::now();
        let Some(completions) = self.rollouts.take(run.policy, step, run.job)? else {
            return Ok(None);
        };
        one_step(
            run,
            &mut self.optimizer,
            self.reference.as_mut(),
            Sampled {
                completions,
                served: self.served,
                staleness: step - run.version_of(step),
                started,
            },
            step,
        )
    }

    /// Records the trained step `step` (0-based): keeps the policy it started from
    /// (`before`) while later steps may be sampled by it, appends its rows, and checkpoints
    /// when one is due.
    fn record(
        &mut self,
        step: usize,
        before: Vec<Tensor>,
        row: &StepMetrics,
        completions: &[CompletionRow],
    ) -> Result<(), GrpoError> {
        let config = self.run.config;
        if config.max_staleness > 0 {
            self.stale.push((step, before));
            if self.stale.len() > config.max_staleness {
                self.stale.remove(0);
            }
        }
        let done = step + 1;
        self.store.append(row, completions)?;
        if done.is_multiple_of(config.checkpoint_every) || done == config.steps {
            self.checkpoint(done)?;
            self.saved = done;
        }
        Ok(())
    }

    /// After `done` steps: retires the policy that sampled the last one once no later step
    /// needs it, and has the policy as it is now sample the step `max_staleness` ahead.
    fn sample_ahead(&mut self, done: usize) -> Result<(), GrpoError> {
        let run = self.run;
        let used = run.version_of(done - 1);
        if done == run.config.steps || run.version_of(done) != used {
            self.rollouts.retire(used)?;
        }
        let next = done + run.config.max_staleness;
        if next < run.config.steps {
            self.rollouts.publish(run.policy, done)?;
            run.submit(self.rollouts, next, done)?;
        }
        Ok(())
    }

    /// Checkpoints the run after `step` steps.
    fn checkpoint(&mut self, step: usize) -> Result<(), GrpoError> {
        self.store.checkpoint(
            step,
            self.run.policy,
            &self.optimizer,
            self.reference.as_deref(),
            &self.stale,
        )
    }

    /// Ends the run interrupted after `step` steps: checkpoints them unless the checkpoint
    /// on disk has them already, then fails with [`GrpoError::Interrupted`].
    fn interrupt(&mut self, step: usize) -> Result<GrpoRun, GrpoError> {
        if self.saved != step {
            self.checkpoint(step)?;
        }
        Err(GrpoError::Interrupted {
            step,
            dir: self.dir.clone(),
        })
    }
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
    with_adapter_values(vars, values, || rollouts.publish(policy, version))
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
            values: adapter_values(vars)?,
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

/// What every step of a run reads: the policy, the items and their tokenized prompts, the
/// rewards and their weights, the settings, the adapters' variables, the stop tokens and
/// the job.
struct RunInputs<'a> {
    policy: &'a LanguageModel,
    items: &'a [Question],
    prompts: &'a [Vec<u32>],
    rewards: &'a [Reward<'a>],
    weights: &'a [f64],
    config: &'a GrpoConfig,
    vars: &'a [(String, Var)],
    stop_ids: &'a [u32],
    job: &'a Job,
}

impl RunInputs<'_> {
    /// The policy (after how many steps) that samples step `step`: the one `max_staleness`
    /// steps back, or the starting one.
    fn version_of(&self, step: usize) -> usize {
        step.saturating_sub(self.config.max_staleness)
    }

    /// Asks `rollouts` for step `step`'s completions sampled by the policy `version`.
    fn submit(
        &self,
        rollouts: &mut dyn rollout::Rollouts,
        step: usize,
        version: usize,
    ) -> Result<(), GrpoError> {
        let (_, rows, requests) = step_batch(
            self.items.len(),
            self.prompts,
            self.config,
            self.stop_ids,
            step,
        );
        rollouts.submit(step, version, rows, requests)
    }
}

/// Trains step `step` (0-based) on its sampled completions: scores them, turns the rewards
/// into advantages, takes the step's updates and returns its metrics and completion rows;
/// `None` when the job was cancelled between two micro-batches (the caller puts back the
/// state the step started from).
fn one_step(
    run: &RunInputs,
    optimizer: &mut AdamW,
    reference: Option<&mut Vec<Tensor>>,
    sampled: Sampled,
    step: usize,
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
    let config = run.config;

    let scoring = Instant::now();
    let rollouts = score(run, completions, served, step)?;
    let advantages = Advantages::of(&rollouts, run.weights, run.rewards.len(), config);
    let reward_s = scoring.elapsed().as_secs_f64();

    let training = Instant::now();
    let masks = loss_masks(&rollouts, &advantages.zero_std, config);
    let batches = MicroBatches::new(run, &rollouts, masks);
    let fixed = FixedLogps::take(run, &batches, reference.as_deref().map(Vec::as_slice))?;
    let step_loss = StepLoss {
        batches: &batches,
        fixed: &fixed,
        adv: &advantages.adv,
        settings: loss_settings(config, batches.tokens()),
    };
    let Some(optimised) = optimise(run, optimizer, reference, &step_loss)? else {
        return Ok(None);
    };
    let train_s = training.elapsed().as_secs_f64();

    let times = StepTimes {
        started,
        gen_s,
        reward_s,
        train_s,
    };
    let metrics = step_metrics(
        step,
        &rollouts,
        &advantages,
        &optimised,
        fixed.mismatch,
        staleness,
        times,
    );
    let rows = completion_rows(run.items, step, &rollouts, &advantages.adv);
    Ok(Some((metrics, rows)))
}

/// Scores step `step`'s completions (a group of `group` per drawn prompt, in the draw's
/// order; sampled by the policy `staleness` steps back) with every reward. The sampler's
/// log-probs are kept for the mismatch correction when another engine sampled them and the
/// correction is on.
fn score(
    run: &RunInputs,
    completions: Vec<Completion>,
    served: bool,
    step: usize,
) -> Result<Vec<Rollout>, GrpoError> {
    let config = run.config;
    let chosen = draw(
        run.items.len(),
        config.prompts_per_step(),
        step,
        config.seed,
    );
    let mut rollouts = Vec::with_capacity(completions.len());
    for (row, c) in completions.into_iter().enumerate() {
        let prompt = chosen[row / config.group];
        let text = run.policy.text_of(&c, run.stop_ids, &config.sampling)?;
        let scored = Scored {
            completion: &text,
            question: &run.items[prompt],
            tokens: c.ids.len(),
            max_tokens: config.sampling.max_tokens,
            truncated: c.finish == Finish::Length,
        };
        let values = run
            .rewards
            .iter()
            .map(|r| r.score(&scored))
            .collect::<Result<Vec<f64>, String>>()
            .map_err(|message| GrpoError::Reward {
                step: step + 1,
                message,
            })?;
        let total = values.iter().zip(run.weights).map(|(v, w)| v * w).sum();
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
    Ok(rollouts)
}

/// A step's advantages and reward statistics.
struct Advantages {
    /// One per rollout.
    adv: Vec<f64>,
    /// Whether each rollout's group had all-equal rewards.
    zero_std: Vec<bool>,
    /// Each reward function's mean and standard deviation over the batch.
    moments: Vec<(f64, f64)>,
}

impl Advantages {
    /// From the rollouts' rewards, weighted and aggregated as the settings say and
    /// normalised per group (or batch).
    fn of(rollouts: &[Rollout], weights: &[f64], functions: usize, config: &GrpoConfig) -> Self {
        let per_func: Vec<Vec<f64>> = rollouts.iter().map(|r| r.rewards.clone()).collect();
        let (adv, zero_std) = aggregate_advantages(
            &per_func,
            weights,
            config.group,
            config.scale_rewards,
            config.std_floor,
            config.multi_objective_aggregation,
        );
        let moments = reward_moments(&per_func, functions);
        Advantages {
            adv,
            zero_std,
            moments,
        }
    }
}

/// Each rollout's loss mask: 1 per token, or 0 for a completion left out of the loss
/// (truncated with `mask_truncated`, or in an all-equal group with `filter_zero_std`).
fn loss_masks(rollouts: &[Rollout], zero_std: &[bool], config: &GrpoConfig) -> Vec<Vec<f32>> {
    rollouts
        .iter()
        .zip(zero_std)
        .map(|(r, &zero)| {
            let off = (config.mask_truncated && r.finish == Finish::Length)
                || (config.filter_zero_std && zero);
            vec![if off { 0.0 } else { 1.0 }; r.ids.len()]
        })
        .collect()
}

/// The loss's settings from the run's, with the step's count of tokens in the loss.
fn loss_settings(config: &GrpoConfig, batch_tokens: f64) -> LossSettings {
    LossSettings {
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
    }
}

/// A step's rollouts cut into micro-batches of `batch` completions, and each micro-batch as
/// the model's inputs and as padded `[b, t]` tensors.
struct MicroBatches<'a> {
    /// The rollout indices of each micro-batch.
    rows: Vec<Vec<usize>>,
    rollouts: &'a [Rollout],
    prompts: &'a [Vec<u32>],
    /// Each rollout's loss mask ([`loss_masks`]).
    masks: Vec<Vec<f32>>,
    policy: &'a LanguageModel,
    /// The temperature the log-probs are taken at (the sampling one, at least 1e-6).
    temperature: f64,
    device: Device,
}

impl<'a> MicroBatches<'a> {
    /// Cuts `rollouts` into micro-batches, in order.
    fn new(run: &RunInputs<'a>, rollouts: &'a [Rollout], masks: Vec<Vec<f32>>) -> Self {
        let rows = (0..rollouts.len())
            .collect::<Vec<_>>()
            .chunks(run.config.batch)
            .map(<[usize]>::to_vec)
            .collect();
        MicroBatches {
            rows,
            rollouts,
            prompts: run.prompts,
            masks,
            policy: run.policy,
            temperature: run.config.sampling.temperature.max(1e-6),
            device: run.policy.model.device().clone(),
        }
    }

    /// The tokens in the loss over the whole step.
    fn tokens(&self) -> f64 {
        self.masks.iter().flatten().map(|&m| m as f64).sum()
    }

    /// The (prompt, completion) token pairs of the rollouts `rows`.
    fn pairs(&self, rows: &[usize]) -> Vec<(&[u32], &[u32])> {
        rows.iter()
            .map(|&i| {
                (
                    self.prompts[self.rollouts[i].prompt].as_slice(),
                    self.rollouts[i].ids.as_slice(),
                )
            })
            .collect()
    }

    /// `values` of each rollout in `rows`, padded with 0 to the longest completion: `[b, t]`.
    fn padded(
        &self,
        rows: &[usize],
        values: &dyn Fn(usize) -> Vec<f32>,
    ) -> candle_core::Result<Tensor> {
        let t = rows
            .iter()
            .map(|&i| self.rollouts[i].ids.len())
            .max()
            .unwrap_or(0);
        let values: Vec<Vec<f32>> = rows.iter().map(|&i| values(i)).collect();
        padded::right_padded(&values, t, &self.device)
    }

    /// The loss mask of the rollouts `rows`, `[b, t]`.
    fn mask(&self, rows: &[usize]) -> candle_core::Result<Tensor> {
        self.padded(rows, &|i| self.masks[i].clone())
    }

    /// The sampler's log-probs of every micro-batch, `[b, t]` each (NaN for a rollout
    /// without).
    fn sampling_logps(&self) -> candle_core::Result<Vec<Tensor>> {
        self.rows
            .iter()
            .map(|rows| {
                self.padded(rows, &|i| {
                    self.rollouts[i]
                        .sampling_logps
                        .clone()
                        .unwrap_or_else(|| vec![f32::NAN; self.rollouts[i].ids.len()])
                })
            })
            .collect()
    }

    /// The policy's log-probs of every micro-batch without gradient, its adapters on or off.
    fn no_grad_logps(&self, adapters_on: bool) -> Result<Vec<Tensor>, GrpoError> {
        self.rows
            .iter()
            .map(|rows| {
                Ok(crate::model::linear::no_grad(|| {
                    self.policy.model.pair_logprobs(
                        &self.pairs(rows),
                        adapters_on,
                        self.temperature,
                    )
                })?)
            })
            .collect()
    }

    /// The policy's log-probs and entropies of the rollouts `rows`, carrying the gradient
    /// (the entropies' only with `entropy_grad`).
    fn logps_entropy(
        &self,
        rows: &[usize],
        entropy_grad: bool,
    ) -> Result<(Tensor, Tensor), GrpoError> {
        Ok(self.policy.model.pair_logprobs_entropy(
            &self.pairs(rows),
            true,
            self.temperature,
            entropy_grad,
        )?)
    }
}

/// The log-probs each micro-batch's loss compares against, all taken before the step's
/// first update, and the mismatch measured between the sampler's and the trainer's.
struct FixedLogps {
    /// The policy's at sampling time, when μ > 1 or another engine sampled the rollouts
    /// (else each micro-batch's own, detached, in the loss).
    old: Option<Vec<Tensor>>,
    /// The sampler's, when another engine sampled the rollouts.
    sampling: Option<Vec<Tensor>>,
    /// The mismatch correction's importance ratios, when the correction is on.
    ratios: Vec<Option<Tensor>>,
    /// Mean |sampling − training| log-prob over the active tokens (0 for local rollouts).
    mismatch: f64,
    /// The KL reference's, when beta is not 0.
    reference: Option<Vec<Tensor>>,
}

impl FixedLogps {
    /// Takes them for `batches`; `reference` is the synced reference's values (none: the
    /// reference is the model with its adapters off).
    fn take(
        run: &RunInputs,
        batches: &MicroBatches,
        reference: Option<&[Tensor]>,
    ) -> Result<Self, GrpoError> {
        let config = run.config;
        // rollouts from another engine: the trainer's log-probs before any update are
        // compared with the sampler's (TRL computes them whenever the correction is on)
        let remote = batches.rollouts.iter().any(|r| r.sampling_logps.is_some());
        let correction = if remote {
            config.remote_correction()?
        } else {
            None
        };
        let old = if config.num_iterations > 1 || remote {
            Some(batches.no_grad_logps(true)?)
        } else {
            None
        };
        let sampling = if remote {
            Some(batches.sampling_logps()?)
        } else {
            None
        };
        let (ratios, mismatch) = match (&sampling, &old) {
            (Some(sampling), Some(old)) => sampler_mismatch(batches, old, sampling, correction)?,
            _ => (vec![None; batches.rows.len()], 0.0),
        };
        let reference = if config.beta != 0.0 {
            Some(match reference {
                // the synced reference: its values in the adapters for the no-grad forwards
                Some(values) => {
                    with_adapter_values(run.vars, values, || batches.no_grad_logps(true))?
                }
                None => batches.no_grad_logps(false)?,
            })
        } else {
            None
        };
        Ok(FixedLogps {
            old,
            sampling,
            ratios,
            mismatch,
            reference,
        })
    }
}

/// The mismatch correction of each micro-batch from the trainer's log-probs before any
/// update (`old`) and the sampler's: its ratios (none when the correction is off) and the
/// mean |sampling − training| log-prob over all active tokens.
fn sampler_mismatch(
    batches: &MicroBatches,
    old: &[Tensor],
    sampling: &[Tensor],
    correction: Option<loss::Correction>,
) -> Result<(Vec<Option<Tensor>>, f64), GrpoError> {
    let mut ratios: Vec<Option<Tensor>> = vec![None; batches.rows.len()];
    let (mut sum, mut tokens) = (0.0, 0.0);
    for (k, rows) in batches.rows.iter().enumerate() {
        let mask = batches.mask(rows)?;
        let c = correction.unwrap_or_default();
        let (ratio, m) = loss::sampling_correction(&old[k], &sampling[k], &mask, &c)?;
        let n = mask.sum_all()?.to_scalar::<f32>()? as f64;
        sum += m.logp_diff_mean * n;
        tokens += n;
        if correction.is_some() {
            ratios[k] = Some(ratio);
        }
    }
    Ok((ratios, sum / f64::max(tokens, 1.0)))
}

/// A step's loss, per micro-batch: the micro-batches, their fixed log-probs, the rollouts'
/// advantages and the loss's settings.
struct StepLoss<'a> {
    batches: &'a MicroBatches<'a>,
    fixed: &'a FixedLogps,
    adv: &'a [f64],
    settings: LossSettings,
}

impl StepLoss<'_> {
    /// Micro-batch `k`'s loss, carrying the gradient, and its statistics.
    fn of(&self, k: usize) -> Result<(Tensor, LossStats), GrpoError> {
        let batches = self.batches;
        let rows = &batches.rows[k];
        let (logps, entropies) = batches.logps_entropy(rows, self.settings.entropy_coef != 0.0)?;
        let mask = batches.mask(rows)?;
        let adv = Tensor::from_vec(
            rows.iter()
                .map(|&i| self.adv[i] as f32)
                .collect::<Vec<f32>>(),
            rows.len(),
            &batches.device,
        )?;
        let old = match &self.fixed.old {
            Some(o) => o[k].clone(),
            None => logps.detach(),
        };
        Ok(loss::loss(
            &LossInputs {
                logps: &logps,
                old: &old,
                ref_logps: self.fixed.reference.as_ref().map(|r| &r[k]),
                adv: &adv,
                mask: &mask,
                entropies: Some(&entropies),
                sampling_logps: self.fixed.sampling.as_ref().map(|s| &s[k]),
                is_ratio: self.fixed.ratios[k].as_ref(),
            },
            &self.settings,
        )?)
    }
}

/// What a step's updates measured.
#[derive(Default)]
struct Optimised {
    /// The loss statistics summed over every micro-batch of every update.
    stats: LossStats,
    /// How many micro-batch losses were summed.
    losses: f64,
    /// The last update's gradient norm before clipping.
    grad_norm: f64,
    /// The last update's learning rate.
    lr: f64,
}

impl Optimised {
    /// Adds one micro-batch loss's statistics.
    fn add(&mut self, stats: &LossStats) {
        self.stats.loss += stats.loss;
        self.stats.kl += stats.kl;
        self.stats.clip_region += stats.clip_region;
        self.stats.entropy += stats.entropy;
        self.losses += 1.0;
    }

    /// The mean over the micro-batch losses of a summed statistic.
    fn mean(&self, sum: f64) -> f64 {
        sum / self.losses.max(1.0)
    }
}

/// Takes the step's `num_iterations` updates, each with the gradient summed over every
/// micro-batch; `None` when the job was cancelled.
fn optimise(
    run: &RunInputs,
    optimizer: &mut AdamW,
    mut reference: Option<&mut Vec<Tensor>>,
    step_loss: &StepLoss,
) -> Result<Option<Optimised>, GrpoError> {
    let mut optimised = Optimised::default();
    for _ in 0..run.config.num_iterations {
        let Some(grads) = accumulate_gradients(run, step_loss, &mut optimised)? else {
            return Ok(None);
        };
        (optimised.grad_norm, optimised.lr) =
            update(run, optimizer, reference.as_deref_mut(), grads)?;
    }
    Ok(Some(optimised))
}

/// The gradient of the step's loss summed over its micro-batches, one per variable (zeros
/// where the loss does not reach), with each micro-batch's statistics added to
/// `optimised`; `None` when the job was cancelled.
fn accumulate_gradients(
    run: &RunInputs,
    step_loss: &StepLoss,
    optimised: &mut Optimised,
) -> Result<Option<Vec<Tensor>>, GrpoError> {
    let mut grads: Vec<Option<Tensor>> = vec![None; run.vars.len()];
    for k in 0..step_loss.batches.rows.len() {
        if run.job.cancel.is_cancelled() {
            return Ok(None);
        }
        let (loss, stats) = step_loss.of(k)?;
        let store = loss.backward()?;
        for (slot, (_, var)) in grads.iter_mut().zip(run.vars) {
            if let Some(g) = store.get(var.as_tensor()) {
                *slot = Some(match slot.take() {
                    Some(acc) => (acc + g)?,
                    None => g.clone(),
                });
            }
        }
        optimised.add(&stats);
    }
    let grads = grads
        .into_iter()
        .zip(run.vars)
        .map(|(g, (_, v))| g.map_or_else(|| v.as_tensor().zeros_like(), Ok))
        .collect::<candle_core::Result<_>>()?;
    Ok(Some(grads))
}

/// One optimiser update with the summed gradient `grads`, clipped to `max_grad_norm`, at
/// the schedule's rate, then the synced reference mixed towards the policy when due;
/// returns the gradient norm before clipping and the rate.
fn update(
    run: &RunInputs,
    optimizer: &mut AdamW,
    reference: Option<&mut Vec<Tensor>>,
    mut grads: Vec<Tensor>,
) -> Result<(f64, f64), GrpoError> {
    let config = run.config;
    let grad_norm = clip_grad_norm(&mut grads, config.max_grad_norm)?;
    let lr = config.schedule.rate(
        config.lr,
        optimizer.steps(),
        config.steps * config.num_iterations,
        config.warmup_steps(),
    );
    optimizer.step(&grads, lr)?;
    if let Some(values) = reference {
        if optimizer
            .steps()
            .is_multiple_of(config.ref_model_sync_steps)
        {
            // TR-DPO: ref ← α · policy + (1 − α) · ref
            let alpha = config.ref_model_mixup_alpha;
            for ((_, var), value) in run.vars.iter().zip(values.iter_mut()) {
                *value = ((var.as_tensor() * alpha)? + (&*value * (1.0 - alpha))?)?;
            }
        }
    }
    Ok((grad_norm, lr))
}

/// The wall times of a step.
struct StepTimes {
    /// When the step started waiting for its completions.
    started: Instant,
    /// Seconds generating.
    gen_s: f64,
    /// Seconds scoring.
    reward_s: f64,
    /// Seconds computing losses and updates.
    train_s: f64,
}

/// The Metrics row of step `step` (0-based).
fn step_metrics(
    step: usize,
    rollouts: &[Rollout],
    advantages: &Advantages,
    optimised: &Optimised,
    logp_mismatch: f64,
    staleness: usize,
    times: StepTimes,
) -> StepMetrics {
    let n = rollouts.len() as f64;
    let totals: Vec<f64> = rollouts.iter().map(|r| r.total).collect();
    let mean = totals.iter().sum::<f64>() / n;
    let reward_std = if totals.len() > 1 {
        (totals.iter().map(|t| (t - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    let generated: usize = rollouts.iter().map(|r| r.ids.len()).sum();
    let stats = &optimised.stats;
    StepMetrics {
        step: step + 1,
        loss: optimised.mean(stats.loss),
        reward: mean,
        reward_std,
        rewards: advantages.moments.iter().map(|m| m.0).collect(),
        reward_stds: advantages.moments.iter().map(|m| m.1).collect(),
        entropy: optimised.mean(stats.entropy),
        logp_mismatch,
        staleness,
        kl: optimised.mean(stats.kl),
        clip_ratio: optimised.mean(stats.clip_region),
        completion_len: generated as f64 / n,
        frac_zero_std: advantages.zero_std.iter().filter(|&&z| z).count() as f64 / n,
        grad_norm: optimised.grad_norm,
        lr: optimised.lr,
        step_s: times.started.elapsed().as_secs_f64(),
        tokens_per_s: generated as f64 / times.gen_s.max(1e-9),
        gen_s: times.gen_s,
        reward_s: times.reward_s,
        train_s: times.train_s,
    }
}

/// Step `step`'s (0-based) completions as stored, with their rewards and advantages.
fn completion_rows(
    items: &[Question],
    step: usize,
    rollouts: &[Rollout],
    adv: &[f64],
) -> Vec<CompletionRow> {
    rollouts
        .iter()
        .zip(adv)
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
        .collect()
}

/// Runs `f` with `values` in the adapters in place of their own, which are put back after.
fn with_adapter_values<T>(
    vars: &[(String, Var)],
    values: &[Tensor],
    f: impl FnOnce() -> Result<T, GrpoError>,
) -> Result<T, GrpoError> {
    let current = adapter_values(vars)?;
    for ((_, var), value) in vars.iter().zip(values) {
        lora::set(var, value)?;
    }
    let result = f();
    for ((_, var), value) in vars.iter().zip(&current) {
        lora::set(var, value)?;
    }
    result
}

/// A copy of the adapters' values (an update writes into the variables' storage).
fn adapter_values(vars: &[(String, Var)]) -> candle_core::Result<Vec<Tensor>> {
    vars.iter().map(|(_, v)| v.as_tensor().copy()).collect()
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
fn run_key(run: &RunInputs) -> Result<String, GrpoError> {
    let RunInputs {
        policy,
        vars,
        items,
        prompts,
        rewards,
        weights,
        config,
        ..
    } = *run;
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
