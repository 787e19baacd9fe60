//! GRPO settings, their defaults and the study's preset.

use serde_json::{json, Value};

use super::loss::{LossType, ScaleRewards};
use super::optim::{AdamWSettings, Schedule};
use super::GrpoError;
use crate::model::generate::Sampling;
use crate::prompt::PromptTemplate;

/// Everything a GRPO run is set up with. Sizes follow TRL: `batch` counts completions per
/// micro-batch (TRL's `per_device_train_batch_size`), and one step samples
/// `batch × grad_accum` completions, `group` per prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpoConfig {
    /// The preset the settings started from.
    pub preset: String,
    /// Completions per prompt (G).
    pub group: usize,
    /// Completions per micro-batch.
    pub batch: usize,
    /// Micro-batches per update.
    pub grad_accum: usize,
    /// Steps (one sampled batch each; `num_iterations` updates per step).
    pub steps: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Share of the updates spent warming up.
    pub warmup_ratio: f64,
    /// AdamW's settings.
    pub adamw: AdamWSettings,
    /// Gradient-norm clip (0: none).
    pub max_grad_norm: f64,
    /// Loss aggregation.
    pub loss_type: LossType,
    /// Advantage scaling.
    pub scale_rewards: ScaleRewards,
    /// Added to the standard deviation before dividing.
    pub std_floor: f64,
    /// Lower clip ε.
    pub epsilon_low: f64,
    /// Upper clip ε.
    pub epsilon_high: f64,
    /// KL weight against the adapters-off reference.
    pub beta: f64,
    /// Updates per sampled batch (μ).
    pub num_iterations: usize,
    /// Leave completions that ran out of budget out of the loss.
    pub mask_truncated: bool,
    /// Leave groups whose rewards are all equal out of the loss.
    pub filter_zero_std: bool,
    /// How completions are sampled (max_tokens is the completion budget).
    pub sampling: Sampling,
    /// Seed of data order, sampling and nothing else (adapters are seeded by `with_lora`).
    pub seed: u64,
    /// How a question becomes a conversation.
    pub template: PromptTemplate,
    /// Steps between checkpoints (1 by default: the adapter and the optimiser's moments are
    /// small, and a kill then loses at most the step in flight).
    pub checkpoint_every: usize,
    /// Continue from a matching checkpoint when there is one.
    pub resume: bool,
    /// Where runs keep their files (`<cache_dir>/grpo/<key>`); `$RLVR_HOME/cache` by default.
    pub cache_dir: std::path::PathBuf,
}

impl Default for GrpoConfig {
    /// TRL's defaults where it has them (dapo loss, group scaling, ε 0.2, β 0, temperature
    /// 1), sized for a CPU: G 4, 64 new tokens, 10 steps, lr 1e-5, linear schedule.
    fn default() -> Self {
        GrpoConfig {
            preset: "default".into(),
            group: 4,
            batch: 4,
            grad_accum: 1,
            steps: 10,
            lr: 1e-5,
            schedule: Schedule::Linear,
            warmup_ratio: 0.0,
            adamw: AdamWSettings::default(),
            max_grad_norm: 1.0,
            loss_type: LossType::Dapo,
            scale_rewards: ScaleRewards::Group,
            std_floor: 1e-4,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            beta: 0.0,
            num_iterations: 1,
            mask_truncated: false,
            filter_zero_std: false,
            sampling: Sampling {
                max_tokens: 64,
                temperature: 1.0,
                ..Sampling::default()
            },
            seed: 42,
            template: PromptTemplate::study(),
            checkpoint_every: 1,
            resume: true,
            cache_dir: crate::paths::rlvr_home().join("cache"),
        }
    }
}

/// The presets [`GrpoConfig::preset`] knows.
pub const PRESETS: [&str; 2] = ["default", "open-medical-r1"];

impl GrpoConfig {
    /// The settings of a named preset. `open-medical-r1`: what the study states (G 3,
    /// lr 2e-5 with a cosine schedule, batch 3, gradient accumulation 4, its system prompt)
    /// and, for what it does not state, the defaults of TRL 0.15, through which its
    /// trainer ran in early 2025 (β 0.04, the per-sequence `grpo` loss, temperature 0.9,
    /// group std scaling), the warm-up of the study's own recipes (10 %) and a 512-token
    /// completion budget. [`GrpoConfig::manifest`] lists which is which.
    pub fn preset(name: &str) -> Option<Self> {
        match name {
            "default" => Some(GrpoConfig::default()),
            "open-medical-r1" => Some(GrpoConfig {
                preset: name.into(),
                group: 3,
                batch: 3,
                grad_accum: 4,
                steps: 500,
                lr: 2e-5,
                schedule: Schedule::Cosine,
                warmup_ratio: 0.1,
                loss_type: LossType::Grpo,
                scale_rewards: ScaleRewards::Group,
                beta: 0.04,
                sampling: Sampling {
                    max_tokens: 512,
                    temperature: 0.9,
                    ..Sampling::default()
                },
                template: PromptTemplate::study(),
                ..GrpoConfig::default()
            }),
            _ => None,
        }
    }

    /// Prompts sampled per step.
    pub fn prompts_per_step(&self) -> usize {
        self.batch * self.grad_accum / self.group.max(1)
    }

    /// Updates spent warming up.
    pub fn warmup_steps(&self) -> usize {
        (self.warmup_ratio * (self.steps * self.num_iterations) as f64).ceil() as usize
    }

    /// Fails naming the setting that cannot work.
    pub fn validate(&self) -> Result<(), GrpoError> {
        let bad = |m: String| Err(GrpoError::Setup(m));
        if self.group < 2 {
            return bad(format!(
                "group is {}; GRPO needs at least 2 completions per prompt",
                self.group
            ));
        }
        if self.batch == 0 || self.grad_accum == 0 || self.num_iterations == 0 {
            return bad("batch, grad_accum and num_iterations must be at least 1".into());
        }
        if !(self.batch * self.grad_accum).is_multiple_of(self.group) {
            return bad(format!(
                "batch × grad_accum ({} × {}) must be a multiple of group ({}): each step samples whole groups",
                self.batch, self.grad_accum, self.group
            ));
        }
        if self.sampling.max_tokens == 0 {
            return bad("max_tokens must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("lr must be positive, got {}", self.lr));
        }
        if self.checkpoint_every == 0 {
            return bad("checkpoint_every must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(format!(
                "warmup_ratio must be in [0, 1), got {}",
                self.warmup_ratio
            ));
        }
        Ok(())
    }

    /// Every setting, for the run's manifest, with the settings the study does not state
    /// marked under `chosen_here` for the study's preset.
    pub fn manifest(&self) -> Value {
        let mut v = json!({
            "preset": self.preset,
            "group": self.group,
            "batch": self.batch,
            "grad_accum": self.grad_accum,
            "prompts_per_step": self.prompts_per_step(),
            "steps": self.steps,
            "lr": self.lr,
            "schedule": self.schedule.name(),
            "warmup_ratio": self.warmup_ratio,
            "adam_beta1": self.adamw.beta1,
            "adam_beta2": self.adamw.beta2,
            "adam_eps": self.adamw.eps,
            "weight_decay": self.adamw.weight_decay,
            "max_grad_norm": self.max_grad_norm,
            "loss_type": self.loss_type.name(),
            "scale_rewards": self.scale_rewards.name(),
            "std_floor": self.std_floor,
            "epsilon_low": self.epsilon_low,
            "epsilon_high": self.epsilon_high,
            "beta": self.beta,
            "num_iterations": self.num_iterations,
            "mask_truncated": self.mask_truncated,
            "filter_zero_std": self.filter_zero_std,
            "max_tokens": self.sampling.max_tokens,
            "temperature": self.sampling.temperature,
            "top_p": self.sampling.top_p,
            "top_k": self.sampling.top_k,
            "min_p": self.sampling.min_p,
            "stop": self.sampling.stop_strings,
            "include_stop": self.sampling.include_stop,
            "seed": self.seed,
            "system_prompt": self.template.system,
            "user_template": self.template.user,
            "checkpoint_every": self.checkpoint_every,
        });
        if self.preset == "open-medical-r1" {
            v["stated_by_the_study"] = json!([
                "group",
                "lr",
                "schedule",
                "batch",
                "grad_accum",
                "system_prompt"
            ]);
            v["chosen_here"] = json!({
                "beta": "TRL 0.15 default",
                "loss_type": "TRL 0.15's per-sequence mean",
                "temperature": "TRL 0.15 default",
                "scale_rewards": "TRL's group std",
                "epsilon_low": "TRL default",
                "warmup_ratio": "the study repository's recipes",
                "max_tokens": "chosen for 2-core CPUs and small GPUs",
                "steps": "not stated; 500 questions at 4 prompts per step is 125 steps per epoch",
                "lora": "set by with_lora (not stated)",
            });
        }
        v
    }
}
