//! GRPO settings, their defaults, their names (TRL 1.16's `GRPOConfig` names where TRL has
//! the setting) and the preset files that hold a training recipe as data
//! (`presets/grpo/*.json`).

use std::path::Path;

use serde_json::{json, Map, Value};

use super::loss::{
    Aggregation, Correction, CorrectionMode, ImportanceSampling, LossType, ScaleRewards, Vespo,
    LOSS_TYPES,
};
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
    /// What the preset says about where its settings come from (merged into the manifest).
    pub preset_notes: Map<String, Value>,
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
    /// Loss type.
    pub loss_type: LossType,
    /// Token- or sequence-level (GSPO) importance ratios.
    pub importance_sampling_level: ImportanceSampling,
    /// Advantage scaling.
    pub scale_rewards: ScaleRewards,
    /// How several rewards become one advantage.
    pub multi_objective_aggregation: Aggregation,
    /// One weight per reward function, replacing the rewards' own weights when given.
    pub reward_weights: Option<Vec<f64>>,
    /// Added to the standard deviation before dividing.
    pub std_floor: f64,
    /// Lower clip ε.
    pub epsilon_low: f64,
    /// Upper clip ε (cispo: the cap of the ratio).
    pub epsilon_high: f64,
    /// Two-sided clipping: the unclipped ratio capped at δ.
    pub delta: Option<f64>,
    /// sapo's temperature for positive advantages.
    pub sapo_temperature_pos: f64,
    /// sapo's temperature for other advantages.
    pub sapo_temperature_neg: f64,
    /// vespo's Gamma weighting.
    pub vespo: Vespo,
    /// KL weight against the reference (the adapters off, or the synced copy).
    pub beta: f64,
    /// Multiply the KL by the importance ratio.
    pub use_bias_correction_kl: bool,
    /// Share of the highest-entropy tokens the policy loss keeps.
    pub top_entropy_quantile: f64,
    /// Weight of the entropy bonus.
    pub entropy_coef: f64,
    /// Off-policy sequence mask threshold.
    pub off_policy_mask_threshold: Option<f64>,
    /// Updates per sampled batch (μ).
    pub num_iterations: usize,
    /// Leave completions that ran out of budget out of the loss (TRL's
    /// `mask_truncated_completions`).
    pub mask_truncated: bool,
    /// Leave groups whose rewards are all equal out of the loss.
    pub filter_zero_std: bool,
    /// Keep a reference copy of the adapters, mixed towards the policy every
    /// `ref_model_sync_steps` updates (TR-DPO), instead of the adapters-off reference.
    pub sync_ref_model: bool,
    /// α of the mix: `ref ← α · policy + (1 − α) · ref`.
    pub ref_model_mixup_alpha: f64,
    /// Updates between mixes.
    pub ref_model_sync_steps: usize,
    /// Correct for the mismatch between a remote sampler's log-probs and the trainer's.
    pub vllm_importance_sampling_correction: bool,
    /// The correction's mode and bounds.
    pub correction: Correction,
    /// Steps the policy sampling on a server may lag the trained one: step n (from 0) is
    /// sampled by the policy after max(0, n − s) steps, so the server samples the next s
    /// steps while one trains (0: synchronous).
    pub max_staleness: usize,
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
    /// TRL's defaults where it has them (dapo loss, token-level ratios, group scaling, ε 0.2,
    /// β 0, temperature 1, sapo 1 / 1.05, vespo 2, 3, 3, 2, the sequence_mask correction
    /// capped at 3, α 0.6 every 512 updates), sized for a CPU: G 4, 64 new tokens, 10
    /// steps, lr 1e-5, linear schedule. `presets/grpo/default.json` says the same.
    fn default() -> Self {
        GrpoConfig {
            preset: "default".into(),
            preset_notes: Map::new(),
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
            importance_sampling_level: ImportanceSampling::Token,
            scale_rewards: ScaleRewards::Group,
            multi_objective_aggregation: Aggregation::SumThenNormalize,
            reward_weights: None,
            std_floor: 1e-4,
            epsilon_low: 0.2,
            epsilon_high: 0.2,
            delta: None,
            sapo_temperature_pos: 1.0,
            sapo_temperature_neg: 1.05,
            vespo: Vespo::default(),
            beta: 0.0,
            use_bias_correction_kl: true,
            top_entropy_quantile: 1.0,
            entropy_coef: 0.0,
            off_policy_mask_threshold: None,
            num_iterations: 1,
            mask_truncated: false,
            filter_zero_std: false,
            sync_ref_model: false,
            ref_model_mixup_alpha: 0.6,
            ref_model_sync_steps: 512,
            vllm_importance_sampling_correction: true,
            correction: Correction::default(),
            max_staleness: 0,
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

/// The presets shipped with rlvr (`presets/grpo/<name>.json`, embedded in the binary).
const BUILTIN: [(&str, &str); 2] = [
    ("default", include_str!("../../presets/grpo/default.json")),
    (
        "open-medical-r1",
        include_str!("../../presets/grpo/open-medical-r1.json"),
    ),
];

/// The names of the built-in presets.
pub const PRESETS: [&str; 2] = [BUILTIN[0].0, BUILTIN[1].0];

/// Every setting `grpo(...)` options and preset files take, with what it does; TRL 1.16's
/// `GRPOConfig` names where TRL has the setting ([`ALIASES`] maps TRL's other names).
pub const SETTINGS: &[(&str, &str)] = &[
    ("group", "completions per prompt (TRL `num_generations`)"),
    (
        "batch",
        "completions per micro-batch (TRL `per_device_train_batch_size`)",
    ),
    (
        "grad_accum",
        "micro-batches per update (TRL `gradient_accumulation_steps`)",
    ),
    ("steps", "sampled batches (TRL `max_steps`)"),
    ("lr", "peak learning rate (TRL `learning_rate`)"),
    (
        "schedule",
        "constant, linear or cosine (TRL `lr_scheduler_type`)",
    ),
    ("warmup_ratio", "share of the updates spent warming up"),
    ("weight_decay", "AdamW's decoupled weight decay"),
    ("max_grad_norm", "gradient-norm clip (0: none)"),
    (
        "loss_type",
        "grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo or vespo",
    ),
    ("importance_sampling_level", "token, or sequence (GSPO)"),
    ("scale_rewards", "group, batch or none"),
    (
        "multi_objective_aggregation",
        "sum_then_normalize or normalize_then_sum",
    ),
    ("reward_weights", "one weight per reward function"),
    (
        "std_floor",
        "added to the standard deviation of the rewards (TRL: 1e-4)",
    ),
    (
        "epsilon",
        "clip ε (both sides unless epsilon_high is given)",
    ),
    (
        "epsilon_high",
        "upper clip ε (cispo: the ratio's cap, e.g. 5)",
    ),
    (
        "delta",
        "two-sided clipping: cap of the unclipped ratio (none: off)",
    ),
    (
        "sapo_temperature_pos",
        "sapo's gate temperature for positive advantages",
    ),
    (
        "sapo_temperature_neg",
        "sapo's gate temperature for other advantages",
    ),
    ("vespo_k_pos", "vespo's power for non-negative advantages"),
    (
        "vespo_lambda_pos",
        "vespo's decay for non-negative advantages",
    ),
    ("vespo_k_neg", "vespo's power for negative advantages"),
    ("vespo_lambda_neg", "vespo's decay for negative advantages"),
    ("beta", "KL weight against the reference"),
    (
        "use_bias_correction_kl",
        "multiply the KL by the importance ratio",
    ),
    (
        "top_entropy_quantile",
        "share of the highest-entropy tokens kept in the policy loss",
    ),
    ("entropy_coef", "weight of the entropy bonus"),
    (
        "off_policy_mask_threshold",
        "drop negative-advantage sequences this far off-policy (none: off)",
    ),
    ("num_iterations", "updates per sampled batch (μ)"),
    (
        "mask_truncated_completions",
        "leave completions that ran out of budget out of the loss",
    ),
    (
        "filter_zero_std",
        "leave groups whose rewards are all equal out of the loss",
    ),
    (
        "sync_ref_model",
        "mix a reference copy of the adapters towards the policy",
    ),
    ("ref_model_mixup_alpha", "α of that mix"),
    ("ref_model_sync_steps", "updates between mixes"),
    (
        "vllm_importance_sampling_correction",
        "correct remote rollouts' sampling mismatch",
    ),
    (
        "vllm_importance_sampling_mode",
        "token_truncate, token_mask, sequence_truncate or sequence_mask",
    ),
    (
        "vllm_importance_sampling_clip_min",
        "lower bound of the correction's ratio (none: off)",
    ),
    (
        "vllm_importance_sampling_clip_max",
        "upper bound of the correction's ratio (none: off)",
    ),
    (
        "max_staleness",
        "steps the policy sampling on a server may lag the trained one (0: synchronous)",
    ),
    (
        "max_tokens",
        "completion budget (TRL `max_completion_length`)",
    ),
    ("temperature", "sampling temperature"),
    ("top_p", "nucleus sampling"),
    ("top_k", "top-k sampling (0: off)"),
    ("min_p", "min-p sampling"),
    ("stop", "stop strings"),
    ("include_stop", "keep the stop string in the completion"),
    ("seed", "seed of data order and sampling"),
    ("system", "system prompt (none: no system turn)"),
    ("user", "user prompt template"),
    ("checkpoint_every", "steps between checkpoints"),
    ("resume", "continue from a matching checkpoint"),
];

/// TRL's other names for settings, and older names, each with the setting it sets.
pub const ALIASES: &[(&str, &str)] = &[
    ("num_generations", "group"),
    ("per_device_train_batch_size", "batch"),
    ("gradient_accumulation_steps", "grad_accum"),
    ("max_steps", "steps"),
    ("learning_rate", "lr"),
    ("lr_scheduler_type", "schedule"),
    ("max_completion_length", "max_tokens"),
    ("mask_truncated", "mask_truncated_completions"),
    (
        "vllm_importance_sampling_cap",
        "vllm_importance_sampling_clip_max",
    ),
];

/// Settings added after the first GRPO release: they enter a run's key only when set away
/// from their default, so runs made before keep their keys (and their caches).
const ADDED: &[&str] = &[
    "importance_sampling_level",
    "multi_objective_aggregation",
    "delta",
    "sapo_temperature_pos",
    "sapo_temperature_neg",
    "vespo_k_pos",
    "vespo_lambda_pos",
    "vespo_k_neg",
    "vespo_lambda_neg",
    "use_bias_correction_kl",
    "top_entropy_quantile",
    "entropy_coef",
    "off_policy_mask_threshold",
    "sync_ref_model",
    "ref_model_mixup_alpha",
    "ref_model_sync_steps",
    "vllm_importance_sampling_correction",
    "vllm_importance_sampling_mode",
    "vllm_importance_sampling_clip_min",
    "vllm_importance_sampling_clip_max",
    "max_staleness",
];

/// The setting `key` names (itself, or the one an alias stands for).
pub fn canonical(key: &str) -> Option<&'static str> {
    SETTINGS
        .iter()
        .map(|(k, _)| *k)
        .find(|k| *k == key)
        .or_else(|| ALIASES.iter().find(|(a, _)| *a == key).map(|(_, k)| *k))
}

fn number(v: &Value, key: &str) -> Result<f64, String> {
    v.as_f64()
        .ok_or_else(|| format!("`{key}` must be a number, not {v}"))
}

fn optional_number(v: &Value, key: &str) -> Result<Option<f64>, String> {
    if v.is_null() {
        Ok(None)
    } else {
        number(v, key).map(Some)
    }
}

fn whole(v: &Value, key: &str) -> Result<usize, String> {
    v.as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| format!("`{key}` must be a whole number, not {v}"))
}

fn flag(v: &Value, key: &str) -> Result<bool, String> {
    v.as_bool()
        .ok_or_else(|| format!("`{key}` must be true or false, not {v}"))
}

fn word<'a>(v: &'a Value, key: &str) -> Result<&'a str, String> {
    v.as_str()
        .ok_or_else(|| format!("`{key}` must be a string, not {v}"))
}

fn choice<T>(v: &Value, key: &str, parse: fn(&str) -> Option<T>, names: &str) -> Result<T, String> {
    let name = word(v, key)?;
    parse(name).ok_or_else(|| format!("unknown {key} `{name}`; use {names}"))
}

impl GrpoConfig {
    /// The settings of a preset: a built-in one by name ([`PRESETS`]), or a preset file
    /// by path. Errors name the file and the setting.
    pub fn preset(name: &str) -> Result<Self, GrpoError> {
        if let Some((_, text)) = BUILTIN.iter().find(|(n, _)| *n == name) {
            return Self::from_preset_text(text, &format!("presets/grpo/{name}.json"));
        }
        let path = Path::new(name);
        if path.is_file() {
            let text = std::fs::read_to_string(path)
                .map_err(|e| GrpoError::Setup(format!("{}: {e}", path.display())))?;
            return Self::from_preset_text(&text, &path.display().to_string());
        }
        Err(GrpoError::Setup(format!(
            "unknown preset `{name}`: neither a built-in preset ({}) nor a file",
            PRESETS.join(", ")
        )))
    }

    /// A preset file's settings on top of [`GrpoConfig::default`]. The file is a JSON
    /// object: `name`, `about`, `settings` (setting → value, as `grpo` options), and
    /// optionally `stated_by_the_study` and `chosen_here` (copied into the manifest).
    fn from_preset_text(text: &str, file: &str) -> Result<Self, GrpoError> {
        let bad = |m: String| GrpoError::Setup(format!("{file}: {m}"));
        let value: Value =
            serde_json::from_str(text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
        let Value::Object(top) = value else {
            return Err(bad("a preset is a JSON object".into()));
        };
        let mut c = GrpoConfig::default();
        for (key, v) in &top {
            match key.as_str() {
                "name" => c.preset = word(v, key).map_err(&bad)?.to_string(),
                "about" => {
                    word(v, key).map_err(&bad)?;
                }
                "settings" => {
                    let Value::Object(settings) = v else {
                        return Err(bad("`settings` must be an object".into()));
                    };
                    c.apply_all(settings.iter().map(|(k, v)| (k.as_str(), v)))
                        .map_err(&bad)?;
                }
                "stated_by_the_study" | "chosen_here" => {
                    c.preset_notes.insert(key.clone(), v.clone());
                }
                other => {
                    return Err(bad(format!(
                        "unknown key `{other}`; a preset has name, about, settings, \
                         stated_by_the_study and chosen_here"
                    )))
                }
            }
        }
        if !top.contains_key("name") {
            return Err(bad("no `name`".into()));
        }
        Ok(c)
    }

    /// Applies `(key, value)` settings in order; a setting given twice (also through an
    /// alias) is an error.
    pub fn apply_all<'a>(
        &mut self,
        settings: impl IntoIterator<Item = (&'a str, &'a Value)>,
    ) -> Result<(), String> {
        let mut seen: Vec<&'static str> = Vec::new();
        let mut epsilon_high = None;
        for (key, value) in settings {
            let name = canonical(key).ok_or_else(|| {
                format!(
                    "unknown setting `{key}`; settings: {}",
                    SETTINGS
                        .iter()
                        .map(|(k, _)| *k)
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })?;
            if seen.contains(&name) {
                return Err(format!("`{name}` is given twice (`{key}` names it too)"));
            }
            seen.push(name);
            if name == "epsilon_high" {
                // after `epsilon`, whatever the order
                epsilon_high = Some(value);
                continue;
            }
            self.apply(name, value)?;
        }
        if seen.contains(&"group") && !seen.contains(&"batch") {
            // one prompt's group per micro-batch unless told otherwise
            self.batch = self.group;
        }
        if let Some(v) = epsilon_high {
            self.apply("epsilon_high", v)?;
        }
        Ok(())
    }

    /// Sets one setting (its canonical name, see [`canonical`]).
    pub fn apply(&mut self, key: &str, v: &Value) -> Result<(), String> {
        // Left whole: a flat table of one arm per setting, read by looking a name up.
        match key {
            "group" => self.group = whole(v, key)?,
            "batch" => self.batch = whole(v, key)?,
            "grad_accum" => self.grad_accum = whole(v, key)?,
            "steps" => self.steps = whole(v, key)?,
            "num_iterations" => self.num_iterations = whole(v, key)?,
            "max_staleness" => self.max_staleness = whole(v, key)?,
            "checkpoint_every" => self.checkpoint_every = whole(v, key)?,
            "ref_model_sync_steps" => self.ref_model_sync_steps = whole(v, key)?,
            "max_tokens" => self.sampling.max_tokens = whole(v, key)?,
            "top_k" => self.sampling.top_k = whole(v, key)?,
            "seed" => {
                self.seed = v
                    .as_u64()
                    .ok_or_else(|| format!("`seed` must be a whole number, not {v}"))?
            }
            "lr" => self.lr = number(v, key)?,
            "warmup_ratio" => self.warmup_ratio = number(v, key)?,
            "weight_decay" => self.adamw.weight_decay = number(v, key)?,
            "max_grad_norm" => self.max_grad_norm = number(v, key)?,
            "std_floor" => self.std_floor = number(v, key)?,
            "epsilon" => {
                self.epsilon_low = number(v, key)?;
                self.epsilon_high = self.epsilon_low;
            }
            "epsilon_high" => self.epsilon_high = number(v, key)?,
            "delta" => self.delta = optional_number(v, key)?,
            "sapo_temperature_pos" => self.sapo_temperature_pos = number(v, key)?,
            "sapo_temperature_neg" => self.sapo_temperature_neg = number(v, key)?,
            "vespo_k_pos" => self.vespo.k_pos = number(v, key)?,
            "vespo_lambda_pos" => self.vespo.lambda_pos = number(v, key)?,
            "vespo_k_neg" => self.vespo.k_neg = number(v, key)?,
            "vespo_lambda_neg" => self.vespo.lambda_neg = number(v, key)?,
            "beta" => self.beta = number(v, key)?,
            "top_entropy_quantile" => self.top_entropy_quantile = number(v, key)?,
            "entropy_coef" => self.entropy_coef = number(v, key)?,
            "off_policy_mask_threshold" => {
                self.off_policy_mask_threshold = optional_number(v, key)?
            }
            "ref_model_mixup_alpha" => self.ref_model_mixup_alpha = number(v, key)?,
            "vllm_importance_sampling_clip_min" => {
                self.correction.clip_min = optional_number(v, key)?
            }
            "vllm_importance_sampling_clip_max" => {
                self.correction.clip_max = optional_number(v, key)?
            }
            "temperature" => self.sampling.temperature = number(v, key)?,
            "top_p" => self.sampling.top_p = number(v, key)?,
            "min_p" => self.sampling.min_p = number(v, key)?,
            "use_bias_correction_kl" => self.use_bias_correction_kl = flag(v, key)?,
            "mask_truncated_completions" => self.mask_truncated = flag(v, key)?,
            "filter_zero_std" => self.filter_zero_std = flag(v, key)?,
            "sync_ref_model" => self.sync_ref_model = flag(v, key)?,
            "vllm_importance_sampling_correction" => {
                self.vllm_importance_sampling_correction = flag(v, key)?
            }
            "include_stop" => self.sampling.include_stop = flag(v, key)?,
            "resume" => self.resume = flag(v, key)?,
            "schedule" => {
                self.schedule = choice(v, key, Schedule::by_name, "constant, linear or cosine")?
            }
            "loss_type" => {
                self.loss_type = choice(v, key, LossType::by_name, &LOSS_TYPES.join(", "))?
            }
            "importance_sampling_level" => {
                self.importance_sampling_level =
                    choice(v, key, ImportanceSampling::by_name, "token or sequence")?
            }
            "scale_rewards" => {
                self.scale_rewards = choice(v, key, ScaleRewards::by_name, "group, batch or none")?
            }
            "multi_objective_aggregation" => {
                self.multi_objective_aggregation = choice(
                    v,
                    key,
                    Aggregation::by_name,
                    "sum_then_normalize or normalize_then_sum",
                )?
            }
            "vllm_importance_sampling_mode" => {
                self.correction.mode = choice(
                    v,
                    key,
                    CorrectionMode::by_name,
                    "token_truncate, token_mask, sequence_truncate or sequence_mask",
                )?
            }
            "reward_weights" => {
                self.reward_weights = if v.is_null() {
                    None
                } else {
                    let list = v.as_array().ok_or_else(|| {
                        format!("`reward_weights` must be an array of numbers, not {v}")
                    })?;
                    Some(
                        list.iter()
                            .map(|w| number(w, "reward_weights"))
                            .collect::<Result<_, _>>()?,
                    )
                }
            }
            "stop" => {
                self.sampling.stop_strings = match v {
                    Value::String(s) => vec![s.clone()],
                    Value::Array(list) => list
                        .iter()
                        .map(|s| word(s, "stop").map(str::to_string))
                        .collect::<Result<_, _>>()?,
                    Value::Null => vec![],
                    other => {
                        return Err(format!(
                            "`stop` must be a string or an array of strings, not {other}"
                        ))
                    }
                }
            }
            "system" => {
                self.template.system = match v {
                    Value::Null => None,
                    other => Some(word(other, key)?.to_string()),
                }
            }
            "user" => self.template.user = word(v, key)?.to_string(),
            other => return Err(format!("unknown setting `{other}`")),
        }
        Ok(())
    }

    /// Prompts sampled per step.
    pub fn prompts_per_step(&self) -> usize {
        self.batch * self.grad_accum / self.group.max(1)
    }

    /// Updates spent warming up.
    pub fn warmup_steps(&self) -> usize {
        (self.warmup_ratio * (self.steps * self.num_iterations) as f64).ceil() as usize
    }

    /// The mismatch correction to apply to rollouts sampled by another engine (none when
    /// `vllm_importance_sampling_correction` is off). Fails, as TRL does, for vespo with a
    /// sequence-level mode.
    pub fn remote_correction(&self) -> Result<Option<Correction>, GrpoError> {
        if !self.vllm_importance_sampling_correction {
            return Ok(None);
        }
        if self.loss_type == LossType::Vespo
            && !matches!(
                self.correction.mode,
                CorrectionMode::TokenTruncate | CorrectionMode::TokenMask
            )
        {
            return Err(GrpoError::Setup(format!(
                "vespo needs vllm_importance_sampling_mode token_truncate or token_mask, not {}",
                self.correction.mode.name()
            )));
        }
        Ok(Some(self.correction))
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
        if !(0.0..=1.0).contains(&self.top_entropy_quantile) {
            return bad(format!(
                "top_entropy_quantile must be in [0, 1], got {}",
                self.top_entropy_quantile
            ));
        }
        if self.sapo_temperature_pos <= 0.0 || self.sapo_temperature_neg <= 0.0 {
            return bad("sapo_temperature_pos and sapo_temperature_neg must be positive".into());
        }
        if let Some(w) = &self.reward_weights {
            if w.iter().any(|x| !x.is_finite()) {
                return bad("reward_weights must be finite numbers".into());
            }
        }
        if self.sync_ref_model {
            if self.beta == 0.0 {
                return bad(
                    "sync_ref_model with beta 0: the reference is never used; set beta or leave \
                     sync_ref_model off"
                        .into(),
                );
            }
            if self.ref_model_sync_steps == 0 {
                return bad("ref_model_sync_steps must be at least 1".into());
            }
            if !(0.0..=1.0).contains(&self.ref_model_mixup_alpha) {
                return bad(format!(
                    "ref_model_mixup_alpha must be in [0, 1], got {}",
                    self.ref_model_mixup_alpha
                ));
            }
        }
        if let (Some(lo), Some(hi)) = (self.correction.clip_min, self.correction.clip_max) {
            if lo >= hi {
                return bad(format!(
                    "vllm_importance_sampling_clip_min ({lo}) must be less than \
                     vllm_importance_sampling_clip_max ({hi})"
                ));
            }
        }
        if self.vllm_importance_sampling_correction
            && matches!(
                self.correction.mode,
                CorrectionMode::TokenTruncate | CorrectionMode::SequenceTruncate
            )
            && self.correction.clip_min.is_none()
            && self.correction.clip_max.is_none()
        {
            return bad(
                "a *_truncate vllm_importance_sampling_mode needs vllm_importance_sampling_clip_min \
                 or _clip_max"
                    .into(),
            );
        }
        Ok(())
    }

    /// Every setting, for the run's manifest, with the preset's notes on which settings a
    /// study states and which were chosen here.
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
        let added = json!({
            "importance_sampling_level": self.importance_sampling_level.name(),
            "multi_objective_aggregation": self.multi_objective_aggregation.name(),
            "reward_weights": self.reward_weights,
            "delta": self.delta,
            "sapo_temperature_pos": self.sapo_temperature_pos,
            "sapo_temperature_neg": self.sapo_temperature_neg,
            "vespo_k_pos": self.vespo.k_pos,
            "vespo_lambda_pos": self.vespo.lambda_pos,
            "vespo_k_neg": self.vespo.k_neg,
            "vespo_lambda_neg": self.vespo.lambda_neg,
            "use_bias_correction_kl": self.use_bias_correction_kl,
            "top_entropy_quantile": self.top_entropy_quantile,
            "entropy_coef": self.entropy_coef,
            "off_policy_mask_threshold": self.off_policy_mask_threshold,
            "sync_ref_model": self.sync_ref_model,
            "ref_model_mixup_alpha": self.ref_model_mixup_alpha,
            "ref_model_sync_steps": self.ref_model_sync_steps,
            "vllm_importance_sampling_correction": self.vllm_importance_sampling_correction,
            "vllm_importance_sampling_mode": self.correction.mode.name(),
            "vllm_importance_sampling_clip_min": self.correction.clip_min,
            "vllm_importance_sampling_clip_max": self.correction.clip_max,
            "max_staleness": self.max_staleness,
        });
        if let (Some(map), Value::Object(added)) = (v.as_object_mut(), added) {
            map.extend(added);
        }
        if let Some(map) = v.as_object_mut() {
            for (k, note) in &self.preset_notes {
                map.insert(k.clone(), note.clone());
            }
        }
        v
    }

    /// The settings that identify a run's result: the manifest without `checkpoint_every`
    /// and `reward_weights` (the run's key hashes each reward with its weight), and without
    /// the settings added after the first release ([`ADDED`]) where they hold their default,
    /// so that runs made before them keep their keys.
    pub fn key_settings(&self) -> Value {
        let mut settings = self.manifest();
        let defaults = GrpoConfig::default().manifest();
        if let Some(map) = settings.as_object_mut() {
            map.remove("checkpoint_every");
            map.remove("reward_weights");
            for key in ADDED {
                if map.get(*key) == defaults.get(*key) {
                    map.remove(*key);
                }
            }
        }
        settings
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_preset_file_is_the_default() {
        assert_eq!(
            GrpoConfig::preset("default").unwrap(),
            GrpoConfig::default()
        );
    }

    /// The manifests written before the settings of TRL 1.16 were added (the run keys of
    /// earlier runs hash them): the key settings of both presets are unchanged.
    #[test]
    fn earlier_run_keys_are_kept() {
        let c = GrpoConfig::preset("open-medical-r1").unwrap();
        let mut before = json!({
            "preset": "open-medical-r1", "group": 3, "batch": 3, "grad_accum": 4,
            "prompts_per_step": 4, "steps": 500, "lr": 2e-5, "schedule": "cosine",
            "warmup_ratio": 0.1, "adam_beta1": 0.9, "adam_beta2": 0.999,
            "adam_eps": c.adamw.eps, "weight_decay": c.adamw.weight_decay,
            "max_grad_norm": 1.0, "loss_type": "grpo", "scale_rewards": "group",
            "std_floor": 1e-4, "epsilon_low": 0.2, "epsilon_high": 0.2, "beta": 0.04,
            "num_iterations": 1, "mask_truncated": false, "filter_zero_std": false,
        });
        let rest = json!({
            "max_tokens": 512, "temperature": 0.9, "top_p": c.sampling.top_p,
            "top_k": c.sampling.top_k, "min_p": c.sampling.min_p, "stop": c.sampling.stop_strings,
            "include_stop": c.sampling.include_stop, "seed": 42,
            "system_prompt": c.template.system, "user_template": c.template.user,
            "stated_by_the_study": ["group", "lr", "schedule", "batch", "grad_accum", "system_prompt"],
        });
        let chosen = json!({
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
        if let (Some(map), Value::Object(rest)) = (before.as_object_mut(), rest) {
            map.extend(rest);
            map.insert("chosen_here".into(), chosen);
        }
        assert_eq!(c.key_settings(), before);
        let mut d = GrpoConfig::default();
        assert!(d.key_settings().get("loss_type").is_some());
        assert!(d.key_settings().get("entropy_coef").is_none());
        d.entropy_coef = 0.01;
        assert_eq!(d.key_settings()["entropy_coef"], json!(0.01));
        assert!(d.key_settings().get("max_staleness").is_none());
        d.max_staleness = 1;
        assert_eq!(d.key_settings()["max_staleness"], json!(1));
    }

    #[test]
    fn settings_take_trl_names_and_fail_naming_the_key() {
        let mut c = GrpoConfig::default();
        let v = |s: &str| serde_json::from_str::<Value>(s).unwrap();
        let (a, b, d, e, f) = (v("6"), v("true"), v("\"sequence\""), v("0.28"), v("0.1"));
        c.apply_all([
            ("num_generations", &a),
            ("mask_truncated_completions", &b),
            ("importance_sampling_level", &d),
            ("epsilon_high", &e),
            ("epsilon", &f),
        ])
        .unwrap();
        assert_eq!((c.group, c.batch), (6, 6));
        assert!(c.mask_truncated);
        assert_eq!(c.importance_sampling_level, ImportanceSampling::Sequence);
        assert_eq!((c.epsilon_low, c.epsilon_high), (0.1, 0.28));
        let err = c.apply_all([("entropy_cof", &f)]).unwrap_err();
        assert!(err.contains("unknown setting `entropy_cof`"), "{err}");
        let err = c
            .apply_all([("group", &a), ("num_generations", &a)])
            .unwrap_err();
        assert!(err.contains("given twice"), "{err}");
        let err = c.apply_all([("loss_type", &v("\"ppo\""))]).unwrap_err();
        assert!(err.contains("unknown loss_type `ppo`"), "{err}");
    }

    #[test]
    fn preset_files_fail_naming_the_file_and_the_key() {
        let dir = std::env::temp_dir().join(format!("rlvr-grpo-preset-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("mine.json");
        std::fs::write(
            &path,
            r#"{"name": "mine", "about": "x", "settings": {"loss_type": "sapo", "lr": "fast"}}"#,
        )
        .unwrap();
        let err = GrpoConfig::preset(path.to_str().unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("mine.json") && err.contains("`lr` must be a number"),
            "{err}"
        );
        std::fs::write(
            &path,
            r#"{"name": "mine", "settings": {"loss_type": "sapo", "sapo_temperature_neg": 2}}"#,
        )
        .unwrap();
        let c = GrpoConfig::preset(path.to_str().unwrap()).unwrap();
        assert_eq!((c.loss_type, c.sapo_temperature_neg), (LossType::Sapo, 2.0));
        assert_eq!(c.preset, "mine");
        let err = GrpoConfig::preset("nonesuch").unwrap_err().to_string();
        assert!(err.contains("open-medical-r1"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
