//! GRPO's advantages and per-token loss, written to equal TRL's `GRPOTrainer` (TRL 1.16:
//! the advantage code of `_generate_and_score_completions`, its rollout/training mismatch
//! correction, and `_compute_loss`) for every loss type TRL 1.16 has: grpo, bnpo, dr_grpo,
//! dapo, cispo, sapo, luspo and vespo, with token- or sequence-level (GSPO) importance
//! sampling, two-sided clipping (`delta`), the off-policy sequence mask, the high-entropy
//! token mask and the entropy bonus.

use candle_core::{bail, Device, Result, Tensor, D};

/// How the per-token losses of a micro-batch become one number, and which surrogate they
/// are (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossType {
    /// Mean over sequences of each sequence's token mean (the original; length-biased).
    Grpo,
    /// Token mean over the micro-batch.
    Bnpo,
    /// Token sum over `rows × max_completion_length` (Dr. GRPO).
    DrGrpo,
    /// Token sum over the active tokens of the whole generation batch (TRL's default).
    Dapo,
    /// MiniMax-M1's CISPO: the importance weight clipped at `epsilon_high` and detached,
    /// times the advantage and the log-prob; normalised as dapo.
    Cispo,
    /// Soft Adaptive Policy Optimization: a sigmoid gate of temperature
    /// `sapo_temperature_pos` / `_neg` instead of clipping; normalised as grpo.
    Sapo,
    /// Length-Unbiased Sequence Policy Optimization: the clipped surrogate summed over each
    /// sequence, mean over sequences (meant for `importance_sampling_level` sequence).
    Luspo,
    /// VESPO: a detached Gamma weight of the sequence's importance ratio times the advantage
    /// and the log-prob; normalised as dapo.
    Vespo,
}

/// The loss type names, in TRL's order.
pub const LOSS_TYPES: [&str; 8] = [
    "grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo",
];

impl LossType {
    /// The loss type called `name`.
    pub fn by_name(name: &str) -> Option<Self> {
        Some(match name {
            "grpo" => LossType::Grpo,
            "bnpo" => LossType::Bnpo,
            "dr_grpo" => LossType::DrGrpo,
            "dapo" => LossType::Dapo,
            "cispo" => LossType::Cispo,
            "sapo" => LossType::Sapo,
            "luspo" => LossType::Luspo,
            "vespo" => LossType::Vespo,
            _ => return None,
        })
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            LossType::Grpo => "grpo",
            LossType::Bnpo => "bnpo",
            LossType::DrGrpo => "dr_grpo",
            LossType::Dapo => "dapo",
            LossType::Cispo => "cispo",
            LossType::Sapo => "sapo",
            LossType::Luspo => "luspo",
            LossType::Vespo => "vespo",
        }
    }

    /// Whether it is the clipped PPO surrogate (grpo, bnpo, dr_grpo, dapo, luspo).
    fn clipped(self) -> bool {
        matches!(
            self,
            LossType::Grpo | LossType::Bnpo | LossType::DrGrpo | LossType::Dapo | LossType::Luspo
        )
    }
}

/// Where importance ratios are taken (TRL's `importance_sampling_level`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportanceSampling {
    /// One ratio per token (TRL's default).
    Token,
    /// One ratio per sequence: the exponential of the mean token log-ratio (GSPO).
    Sequence,
}

impl ImportanceSampling {
    /// The level called `name` (`token` or `sequence`).
    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "token" => Some(ImportanceSampling::Token),
            "sequence" => Some(ImportanceSampling::Sequence),
            _ => None,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            ImportanceSampling::Token => "token",
            ImportanceSampling::Sequence => "sequence",
        }
    }
}

/// Which standard deviation divides the centred rewards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleRewards {
    /// The group's (TRL's default).
    Group,
    /// The whole batch's (Lite-PPO).
    Batch,
    /// None: advantages are rewards minus the group mean (Dr. GRPO).
    None,
}

impl ScaleRewards {
    /// The mode called `name`.
    pub fn by_name(name: &str) -> Option<Self> {
        Some(match name {
            "group" => ScaleRewards::Group,
            "batch" => ScaleRewards::Batch,
            "none" => ScaleRewards::None,
            _ => return None,
        })
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            ScaleRewards::Group => "group",
            ScaleRewards::Batch => "batch",
            ScaleRewards::None => "none",
        }
    }
}

/// How several reward functions become one advantage (TRL's `multi_objective_aggregation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregation {
    /// Weighted sum of the rewards, then group advantages as `scale_rewards` says (TRL's
    /// default).
    SumThenNormalize,
    /// Each reward normalised within its group, the weighted sum then normalised over the
    /// batch (GDPO); `scale_rewards` is not used, as in TRL.
    NormalizeThenSum,
}

impl Aggregation {
    /// The mode called `name`.
    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "sum_then_normalize" => Some(Aggregation::SumThenNormalize),
            "normalize_then_sum" => Some(Aggregation::NormalizeThenSum),
            _ => None,
        }
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Aggregation::SumThenNormalize => "sum_then_normalize",
            Aggregation::NormalizeThenSum => "normalize_then_sum",
        }
    }
}

/// Unbiased standard deviation (torch's), 0 for fewer than two values.
fn std_of(xs: &[f64]) -> f64 {
    if xs.len() < 2 {
        return 0.0;
    }
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (xs.len() - 1) as f64;
    var.sqrt()
}

/// Group advantages of `rewards` laid out group after group (`group` consecutive
/// completions of one prompt): the reward minus its group's mean, divided by `std + floor`
/// (unbiased std, as torch's) unless `scale` is none. Also returns, per completion, whether
/// its group's rewards all were equal (TRL's `frac_reward_zero_std`).
pub fn advantages(
    rewards: &[f64],
    group: usize,
    scale: ScaleRewards,
    floor: f64,
) -> (Vec<f64>, Vec<bool>) {
    assert!(
        group >= 1 && rewards.len().is_multiple_of(group),
        "whole groups"
    );
    let batch_std = std_of(rewards);
    let mut adv = Vec::with_capacity(rewards.len());
    let mut zero = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group) {
        let mean = g.iter().sum::<f64>() / g.len() as f64;
        let s = match scale {
            ScaleRewards::Batch => batch_std,
            _ => std_of(g),
        };
        for r in g {
            let centred = r - mean;
            adv.push(match scale {
                ScaleRewards::None => centred,
                _ => centred / (s + floor),
            });
            zero.push(s.abs() <= 1e-8);
        }
    }
    (adv, zero)
}

/// Advantages from several rewards per completion (`per_func[i][k]`: completion `i`,
/// function `k`) weighted by `weights`, as TRL 1.16 aggregates them: see [`Aggregation`].
/// `floor` is added to every standard deviation (TRL: 1e-4). Also returns the per-completion
/// zero-std flags (group-wise for sum_then_normalize, batch-wide for normalize_then_sum).
pub fn aggregate_advantages(
    per_func: &[Vec<f64>],
    weights: &[f64],
    group: usize,
    scale: ScaleRewards,
    floor: f64,
    aggregation: Aggregation,
) -> (Vec<f64>, Vec<bool>) {
    let weighted = |row: &[f64]| -> f64 { row.iter().zip(weights).map(|(r, w)| r * w).sum() };
    match aggregation {
        Aggregation::SumThenNormalize => {
            let totals: Vec<f64> = per_func.iter().map(|r| weighted(r)).collect();
            advantages(&totals, group, scale, floor)
        }
        Aggregation::NormalizeThenSum => {
            assert!(
                group >= 1 && per_func.len().is_multiple_of(group),
                "whole groups"
            );
            let k = weights.len();
            let mut normalised = vec![vec![0.0; k]; per_func.len()];
            for (g, rows) in per_func.chunks(group).enumerate() {
                for f in 0..k {
                    let column: Vec<f64> = rows.iter().map(|r| r[f]).collect();
                    let mean = column.iter().sum::<f64>() / column.len() as f64;
                    let std = std_of(&column);
                    for (j, x) in column.iter().enumerate() {
                        normalised[g * group + j][f] = (x - mean) / (std + floor);
                    }
                }
            }
            let sums: Vec<f64> = normalised.iter().map(|r| weighted(r)).collect();
            let mean = sums.iter().sum::<f64>() / sums.len().max(1) as f64;
            let std = std_of(&sums);
            let adv = sums.iter().map(|s| (s - mean) / (std + floor)).collect();
            (adv, vec![std.abs() <= 1e-8; sums.len()])
        }
    }
}

/// Each reward function's mean and unbiased standard deviation over the batch (TRL's
/// `rewards/<name>/mean` and `/std`).
pub fn reward_moments(per_func: &[Vec<f64>], functions: usize) -> Vec<(f64, f64)> {
    (0..functions)
        .map(|f| {
            let column: Vec<f64> = per_func.iter().map(|r| r[f]).collect();
            let mean = column.iter().sum::<f64>() / column.len().max(1) as f64;
            (mean, std_of(&column))
        })
        .collect()
}

/// How the ratio between the training and the sampling engine's probabilities is bounded
/// (TRL's `vllm_importance_sampling_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CorrectionMode {
    /// Per-token ratios clipped into `[clip_min, clip_max]`.
    TokenTruncate,
    /// Per-token ratios outside `[clip_min, clip_max]` set to 0.
    TokenMask,
    /// One ratio per sequence (of the summed log-ratio), clipped.
    SequenceTruncate,
    /// One ratio per sequence, set to 0 outside the bounds (TRL's default).
    SequenceMask,
}

impl CorrectionMode {
    /// The mode called `name`.
    pub fn by_name(name: &str) -> Option<Self> {
        Some(match name {
            "token_truncate" => CorrectionMode::TokenTruncate,
            "token_mask" => CorrectionMode::TokenMask,
            "sequence_truncate" => CorrectionMode::SequenceTruncate,
            "sequence_mask" => CorrectionMode::SequenceMask,
            _ => return None,
        })
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            CorrectionMode::TokenTruncate => "token_truncate",
            CorrectionMode::TokenMask => "token_mask",
            CorrectionMode::SequenceTruncate => "sequence_truncate",
            CorrectionMode::SequenceMask => "sequence_mask",
        }
    }

    fn sequence(self) -> bool {
        matches!(
            self,
            CorrectionMode::SequenceTruncate | CorrectionMode::SequenceMask
        )
    }
}

/// The rollout/training mismatch correction's settings (TRL's
/// `vllm_importance_sampling_mode`, `_clip_min`, `_clip_max`; defaults sequence_mask, none, 3).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Correction {
    /// How ratios are bounded.
    pub mode: CorrectionMode,
    /// Lower bound C_min (none: unbounded below).
    pub clip_min: Option<f64>,
    /// Upper bound C_max (none: unbounded above).
    pub clip_max: Option<f64>,
}

impl Default for Correction {
    fn default() -> Self {
        Correction {
            mode: CorrectionMode::SequenceMask,
            clip_min: None,
            clip_max: Some(3.0),
        }
    }
}

/// What the correction measured (TRL's `sampling/sampling_logp_difference/{mean,max}` and
/// `sampling/importance_sampling_ratio/{min,mean,max}`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Mismatch {
    /// Mean |training − sampling| log-prob over active tokens the sampler scored.
    pub logp_diff_mean: f64,
    /// Its maximum.
    pub logp_diff_max: f64,
    /// Smallest importance ratio (over active tokens, or over sequences).
    pub ratio_min: f64,
    /// Mean importance ratio.
    pub ratio_mean: f64,
    /// Largest importance ratio.
    pub ratio_max: f64,
}

/// The entry point for rollouts sampled by another engine: from the training model's
/// log-probs of the sampled tokens before any update (`old`, `[b, t]`), the sampler's own
/// (`sampling`, `[b, t]`; NaN where it gave none) and the completion mask, the importance
/// ratio to pass to [`loss`] as [`LossInputs::is_ratio`] (`[b, t]` for token modes, `[b, 1]`
/// for sequence modes) and the measured mismatch, as TRL 1.16 computes them for vLLM.
pub fn sampling_correction(
    old: &Tensor,
    sampling: &Tensor,
    mask: &Tensor,
    c: &Correction,
) -> Result<(Tensor, Mismatch)> {
    let old: Vec<Vec<f32>> = old.to_vec2()?;
    let sampling: Vec<Vec<f32>> = sampling.to_vec2()?;
    let m: Vec<Vec<f32>> = mask.to_vec2()?;
    let b = m.len();
    let t = m.first().map_or(0, Vec::len);
    // (old − sampling) · mask, NaN → 0
    let diff: Vec<Vec<f32>> = (0..b)
        .map(|i| {
            (0..t)
                .map(|j| {
                    let d = (old[i][j] - sampling[i][j]) * m[i][j];
                    if d.is_nan() {
                        0.0
                    } else {
                        d
                    }
                })
                .collect()
        })
        .collect();
    let raw: Vec<Vec<f32>> = if c.mode.sequence() {
        diff.iter()
            .map(|row| vec![row.iter().sum::<f32>().exp()])
            .collect()
    } else {
        diff.iter()
            .map(|row| row.iter().map(|d| d.exp()).collect())
            .collect()
    };
    let (lo, hi) = (
        c.clip_min.map_or(f32::NEG_INFINITY, |v| v as f32),
        c.clip_max.map_or(f32::INFINITY, |v| v as f32),
    );
    let ratio: Vec<Vec<f32>> = raw
        .iter()
        .map(|row| {
            row.iter()
                .map(|&r| match c.mode {
                    CorrectionMode::TokenTruncate | CorrectionMode::SequenceTruncate => {
                        r.max(lo).min(hi)
                    }
                    _ if r < lo || r > hi => 0.0,
                    _ => r,
                })
                .collect()
        })
        .collect();
    let mut deltas = Vec::new();
    for i in 0..b {
        for j in 0..t {
            let d = (old[i][j] - sampling[i][j]).abs();
            if m[i][j] > 0.0 && !d.is_nan() {
                deltas.push(d as f64);
            }
        }
    }
    let flat: Vec<f64> = if c.mode.sequence() {
        ratio.iter().map(|r| r[0] as f64).collect()
    } else {
        let mut flat = Vec::new();
        for (row, mrow) in ratio.iter().zip(&m) {
            for (r, w) in row.iter().zip(mrow) {
                if *w > 0.0 {
                    flat.push(*r as f64);
                }
            }
        }
        flat
    };
    let stats = |xs: &[f64]| -> (f64, f64, f64) {
        if xs.is_empty() {
            return (0.0, 0.0, 0.0);
        }
        let min = xs.iter().copied().fold(f64::INFINITY, f64::min);
        let max = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (min, xs.iter().sum::<f64>() / xs.len() as f64, max)
    };
    let (_, logp_diff_mean, logp_diff_max) = stats(&deltas);
    let (ratio_min, ratio_mean, ratio_max) = stats(&flat);
    let width = if c.mode.sequence() { 1 } else { t };
    let tensor = Tensor::from_vec(
        ratio.into_iter().flatten().collect::<Vec<f32>>(),
        (b, width),
        mask.device(),
    )?;
    Ok((
        tensor,
        Mismatch {
            logp_diff_mean,
            logp_diff_max,
            ratio_min,
            ratio_mean,
            ratio_max,
        },
    ))
}

/// VESPO's Gamma weighting `φ(w) = e^λ · w^k · e^{−λw}` parameters (TRL's `vespo_k_pos`,
/// `vespo_lambda_pos`, `vespo_k_neg`, `vespo_lambda_neg`; defaults 2, 3, 3, 2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Vespo {
    /// Power for non-negative advantages.
    pub k_pos: f64,
    /// Decay for non-negative advantages.
    pub lambda_pos: f64,
    /// Power for negative advantages.
    pub k_neg: f64,
    /// Decay for negative advantages.
    pub lambda_neg: f64,
}

impl Default for Vespo {
    fn default() -> Self {
        Vespo {
            k_pos: 2.0,
            lambda_pos: 3.0,
            k_neg: 3.0,
            lambda_neg: 2.0,
        }
    }
}

/// The loss settings, named as TRL 1.16's `GRPOConfig` names them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossSettings {
    /// The surrogate and its aggregation.
    pub loss_type: LossType,
    /// Token- or sequence-level importance ratios.
    pub importance_sampling_level: ImportanceSampling,
    /// Lower clip: the ratio is kept at least `1 - epsilon_low`.
    pub epsilon_low: f64,
    /// Upper clip: the ratio is kept at most `1 + epsilon_high` (cispo: at most
    /// `epsilon_high`).
    pub epsilon_high: f64,
    /// Two-sided clipping (INTELLECT-2): the unclipped ratio is capped at `delta`.
    pub delta: Option<f64>,
    /// sapo's gate temperature for positive advantages.
    pub sapo_temperature_pos: f64,
    /// sapo's gate temperature for other advantages.
    pub sapo_temperature_neg: f64,
    /// vespo's weighting.
    pub vespo: Vespo,
    /// Weight of the k3 KL penalty against the reference (0: none).
    pub beta: f64,
    /// Multiply the KL by the importance ratio (TRL's `use_bias_correction_kl`, on).
    pub use_bias_correction_kl: bool,
    /// Share of the active tokens, those of highest entropy, the policy loss keeps (1: all).
    pub top_entropy_quantile: f64,
    /// Weight of the entropy bonus (0: none).
    pub entropy_coef: f64,
    /// Drop sequences with negative advantage whose mean KL from the sampler exceeds this.
    pub off_policy_mask_threshold: Option<f64>,
    /// Micro-batches accumulated per optimiser step.
    pub grad_accum: usize,
    /// The completion token budget (dr_grpo's normaliser).
    pub max_completion_length: usize,
    /// Active completion tokens in the whole generation batch (dapo, cispo and vespo's
    /// normaliser).
    pub batch_tokens: f64,
}

impl Default for LossSettings {
    /// TRL 1.16's defaults (dapo, token level, ε 0.2, no δ, sapo 1.0 / 1.05, β 0).
    fn default() -> Self {
        LossSettings {
            loss_type: LossType::Dapo,
            importance_sampling_level: ImportanceSampling::Token,
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
            grad_accum: 1,
            max_completion_length: 1,
            batch_tokens: 1.0,
        }
    }
}

impl LossSettings {
    /// Whether the loss needs per-token entropies.
    pub fn needs_entropy(&self) -> bool {
        self.top_entropy_quantile < 1.0 || self.entropy_coef != 0.0
    }
}

/// What one micro-batch's loss is computed from. Every tensor is f32 `[b, t]` but `adv`
/// (`[b]`) and `is_ratio` (`[b, t]` or `[b, 1]`).
#[derive(Debug, Clone, Copy)]
pub struct LossInputs<'a> {
    /// The policy's per-token log-probs (carrying the gradient).
    pub logps: &'a Tensor,
    /// The log-probs when the batch was sampled (`logps` detached when μ is 1).
    pub old: &'a Tensor,
    /// The reference's, when `beta` is not 0.
    pub ref_logps: Option<&'a Tensor>,
    /// One advantage per completion.
    pub adv: &'a Tensor,
    /// 1 for tokens in the loss, 0 for padding and masked completions.
    pub mask: &'a Tensor,
    /// Per-token entropy of the policy's (temperature-scaled) distribution; needed for
    /// `top_entropy_quantile` < 1 and `entropy_coef` (whose gradient it carries), and
    /// measured when given.
    pub entropies: Option<&'a Tensor>,
    /// The sampling engine's log-probs, read by the off-policy mask (`old` when absent).
    pub sampling_logps: Option<&'a Tensor>,
    /// The mismatch correction's importance ratio from [`sampling_correction`], when the
    /// rollouts came from another engine.
    pub is_ratio: Option<&'a Tensor>,
}

/// What the loss of one micro-batch measured besides its value.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossStats {
    /// The policy loss (before the gradient-accumulation division and the entropy bonus),
    /// TRL's `policy_loss`.
    pub loss: f64,
    /// Mean k3 KL over active tokens (0 when `beta` is 0).
    pub kl: f64,
    /// Mean entropy over active tokens (0 when no entropies were given).
    pub entropy: f64,
    /// Share of active tokens clipped below (ratio < 1 - ε_low with A < 0).
    pub clip_low: f64,
    /// Share clipped above (ratio > 1 + ε_high with A > 0).
    pub clip_high: f64,
    /// Share clipped either way (cispo: ratio > ε_high with A > 0).
    pub clip_region: f64,
    /// vespo's mean sequence weight φ (0 for other losses).
    pub phi_seq: f64,
    /// Active tokens in the micro-batch.
    pub tokens: f64,
}

/// Mean of `x` (`[b, t]` over active tokens, or `[b, 1]` over rows), TRL's
/// `global_masked_mean` on one process.
fn masked_mean(x: &[Vec<f32>], m: &[Vec<f32>]) -> f64 {
    let (mut sum, mut count) = (0.0f64, 0.0f64);
    for (row, mrow) in x.iter().zip(m) {
        if row.len() == 1 {
            sum += row[0] as f64;
            count += 1.0;
        } else {
            for (v, w) in row.iter().zip(mrow) {
                sum += (*v * *w) as f64;
                count += *w as f64;
            }
        }
    }
    sum / count.max(1.0)
}

/// TRL's `get_high_entropy_mask`: 1 for active tokens whose entropy is at least the
/// `quantile` (torch's linear interpolation) of the active tokens' entropies.
fn high_entropy_mask(
    entropies: &[Vec<f32>],
    m: &[Vec<f32>],
    quantile: f64,
    device: &Device,
) -> Result<Tensor> {
    let mut active: Vec<f32> = entropies
        .iter()
        .zip(m)
        .flat_map(|(e, w)| e.iter().zip(w).filter(|(_, w)| **w != 0.0).map(|(e, _)| *e))
        .collect();
    let b = m.len();
    let t = m.first().map_or(0, Vec::len);
    if active.is_empty() {
        return Tensor::zeros((b, t), candle_core::DType::F32, device);
    }
    active.sort_by(f32::total_cmp);
    let rank = quantile as f32 * (active.len() - 1) as f32;
    let below = rank.floor();
    let weight = rank - below;
    let (lo, hi) = (
        active[below as usize],
        active[(rank.ceil() as usize).min(active.len() - 1)],
    );
    // torch.lerp
    let threshold = if weight < 0.5 {
        lo + weight * (hi - lo)
    } else {
        hi - (hi - lo) * (1.0 - weight)
    };
    let data: Vec<f32> = entropies
        .iter()
        .zip(m)
        .flat_map(|(e, w)| {
            e.iter().zip(w).map(move |(e, w)| {
                if *w != 0.0 && e * w >= threshold {
                    1.0
                } else {
                    0.0
                }
            })
        })
        .collect();
    Tensor::from_vec(data, (b, t), device)
}

/// TRL's `get_off_policy_mask` (DeepSeek-V3.2): `[b, 1]`, 0 for sequences with a negative
/// advantage whose mean `sampling − logps` over active tokens exceeds `threshold`.
fn off_policy_mask(
    advs: &[f32],
    logps: &[Vec<f32>],
    sampling: &[Vec<f32>],
    m: &[Vec<f32>],
    threshold: f64,
    device: &Device,
) -> Result<Tensor> {
    let keep: Vec<f32> = (0..advs.len())
        .map(|i| {
            let (mut sum, mut n) = (0f32, 0f32);
            for t in 0..m[i].len() {
                let kl = sampling[i][t] - logps[i][t];
                let kl = if kl.is_nan() { 0.0 } else { kl };
                sum += kl * m[i][t];
                n += m[i][t];
            }
            let mean = sum / n.max(1.0);
            if advs[i] >= 0.0 || mean <= threshold as f32 {
                1.0
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(keep, (advs.len(), 1), device)
}

/// TRL's `get_gamma_weights` (VESPO), `[b, 1]` and detached: `φ(w)` of the sequence ratio
/// `w = exp Σ_t log(π/π_old)` (token log-ratios clamped to ±20), times the correction's
/// ratio when given.
fn gamma_weights(
    advs: &[f32],
    log_ratio: &[Vec<f32>],
    m: &[Vec<f32>],
    is_ratio: Option<&[Vec<f32>]>,
    v: &Vespo,
    device: &Device,
) -> Result<Tensor> {
    let lower = (1e-8f64).ln() as f32;
    let phi: Vec<f32> = (0..advs.len())
        .map(|i| {
            let mut seq: f32 = log_ratio[i]
                .iter()
                .zip(&m[i])
                .map(|(r, w)| r.clamp(-20.0, 20.0) * w)
                .sum();
            if let Some(ratio) = is_ratio {
                seq += ratio[i]
                    .iter()
                    .map(|r| r.ln().clamp(lower, 20.0))
                    .sum::<f32>();
            }
            let log_w = seq.clamp(lower, 20.0);
            let w = log_w.exp();
            let (k, lambda) = if advs[i] >= 0.0 {
                (v.k_pos as f32, v.lambda_pos as f32)
            } else {
                (v.k_neg as f32, v.lambda_neg as f32)
            };
            let lambda = lambda.max(1e-4);
            let phi = (lambda + k * log_w - lambda * w).exp();
            if phi.is_finite() {
                phi
            } else {
                0.0
            }
        })
        .collect();
    Tensor::from_vec(phi, (advs.len(), 1), device)
}

/// The micro-batch loss to back-propagate, and its statistics: TRL 1.16's `_compute_loss`.
pub fn loss(x: &LossInputs, s: &LossSettings) -> Result<(Tensor, LossStats)> {
    let rows = HostRows::read(x, s)?;
    let gates = Gates::of(x, s, &rows)?;
    let (log_ratio, coef_1) = importance_ratios(x, s.importance_sampling_level)?;
    let kl = k3_kl(x, s, &coef_1)?;
    let surrogate = Surrogate::of(x, s, &rows, &coef_1, &log_ratio)?;
    let masked = masked_token_loss(x, s, surrogate.per_token, &gates, kl.as_ref())?;
    let (value, mut scaled) = aggregate(x, s, &masked, rows.active)?;
    if s.entropy_coef != 0.0 {
        scaled = (scaled - entropy_bonus(x, s, gates.high_entropy.as_ref())?)?;
    }
    let (clip_low, clip_high, clip_region) = clip_shares(&surrogate.stat_coef, &rows, s)?;
    let stats = LossStats {
        loss: value.to_scalar::<f32>()? as f64,
        kl: match &kl {
            Some(kl) => masked_mean(&kl.detach().to_vec2()?, &rows.m),
            None => 0.0,
        },
        entropy: rows
            .entropies
            .as_ref()
            .map_or(0.0, |e| masked_mean(e, &rows.m)),
        clip_low,
        clip_high,
        clip_region,
        phi_seq: match &surrogate.phi {
            Some(p) => masked_mean(&p.to_vec2()?, &rows.m),
            None => 0.0,
        },
        tokens: rows.active,
    };
    Ok((scaled, stats))
}

/// What the loss reads of a micro-batch on the host: the mask, the advantages and the
/// entropies, with the advantages as a column and the count of active tokens.
struct HostRows {
    /// The mask, `[b, t]`.
    m: Vec<Vec<f32>>,
    /// One advantage per completion.
    advs: Vec<f32>,
    /// The advantages as a `[b, 1]` tensor.
    adv: Tensor,
    /// Tokens in the loss.
    active: f64,
    /// The per-token entropies, when given.
    entropies: Option<Vec<Vec<f32>>>,
}

impl HostRows {
    /// Reads them from the inputs; refuses settings that need entropies without them.
    fn read(x: &LossInputs, s: &LossSettings) -> Result<Self> {
        let mask = x.mask;
        let m: Vec<Vec<f32>> = mask.to_vec2()?;
        let advs: Vec<f32> = x.adv.to_vec1()?;
        let adv = x.adv.unsqueeze(1)?;
        let active = mask.sum_all()?.to_scalar::<f32>()? as f64;
        let entropies: Option<Vec<Vec<f32>>> = x.entropies.map(|e| e.to_vec2()).transpose()?;
        if s.needs_entropy() && entropies.is_none() {
            bail!("top_entropy_quantile < 1 and entropy_coef need per-token entropies");
        }
        Ok(HostRows {
            m,
            advs,
            adv,
            active,
            entropies,
        })
    }
}

/// The masks the per-token loss is multiplied by besides the completion mask.
struct Gates {
    /// The high-entropy tokens (`top_entropy_quantile` < 1), `[b, t]`.
    high_entropy: Option<Tensor>,
    /// The sequences kept by the off-policy mask (`off_policy_mask_threshold`), `[b, 1]`.
    off_policy: Option<Tensor>,
}

impl Gates {
    /// The gates the settings ask for.
    fn of(x: &LossInputs, s: &LossSettings, rows: &HostRows) -> Result<Self> {
        let device = x.logps.device();
        let high_entropy = match (&rows.entropies, s.top_entropy_quantile < 1.0) {
            (Some(e), true) => Some(high_entropy_mask(
                e,
                &rows.m,
                1.0 - s.top_entropy_quantile,
                device,
            )?),
            _ => None,
        };
        let logps_now: Vec<Vec<f32>> = x.logps.to_vec2()?;
        let off_policy = match s.off_policy_mask_threshold {
            Some(threshold) => {
                let sampling: Vec<Vec<f32>> = x.sampling_logps.unwrap_or(x.old).to_vec2()?;
                Some(off_policy_mask(
                    &rows.advs, &logps_now, &sampling, &rows.m, threshold, device,
                )?)
            }
            None => None,
        };
        Ok(Gates {
            high_entropy,
            off_policy,
        })
    }
}

/// The token log-ratios `logps − old` and the importance weights of `level`: per token, or
/// GSPO's one per sequence (the exponential of the masked mean log-ratio, `[b, 1]`).
fn importance_ratios(x: &LossInputs, level: ImportanceSampling) -> Result<(Tensor, Tensor)> {
    let mask = x.mask;
    let log_ratio = (x.logps - x.old)?;
    let log_weights = match level {
        ImportanceSampling::Token => log_ratio.clone(),
        ImportanceSampling::Sequence => (&log_ratio * mask)?
            .sum_keepdim(D::Minus1)?
            .broadcast_div(&mask.sum_keepdim(D::Minus1)?.clamp(1.0, f64::INFINITY)?)?,
    };
    let coef_1 = log_weights.exp()?;
    Ok((log_ratio, coef_1))
}

/// The per-token k3 KL against the reference (times the importance weight `coef_1` with
/// `use_bias_correction_kl`); none when `beta` is 0.
fn k3_kl(x: &LossInputs, s: &LossSettings, coef_1: &Tensor) -> Result<Option<Tensor>> {
    if s.beta == 0.0 {
        return Ok(None);
    }
    let Some(r) = x.ref_logps else {
        bail!("reference log-probs are needed when beta is not 0");
    };
    let diff = (r - x.logps)?;
    let kl = ((diff.exp()? - &diff)? - 1.0)?;
    Ok(Some(if s.use_bias_correction_kl {
        kl.broadcast_mul(coef_1)?
    } else {
        kl
    }))
}

/// The loss type's per-token surrogate, before any mask.
struct Surrogate {
    /// The per-token loss.
    per_token: Tensor,
    /// The ratio the clipping statistics read (capped by delta, as TRL's).
    stat_coef: Tensor,
    /// vespo's detached sequence weights φ, `[b, 1]`.
    phi: Option<Tensor>,
}

impl Surrogate {
    /// The surrogate of `s.loss_type` from the importance weights `coef_1` and the token
    /// log-ratios: cispo's detached capped weight, sapo's sigmoid gate, vespo's Gamma
    /// weight, or the clipped surrogate (with δ) of the others.
    fn of(
        x: &LossInputs,
        s: &LossSettings,
        rows: &HostRows,
        coef_1: &Tensor,
        log_ratio: &Tensor,
    ) -> Result<Self> {
        let device = x.logps.device();
        let (b, _) = x.logps.dims2()?;
        let adv = &rows.adv;
        let mut stat_coef = coef_1.clone();
        let mut phi = None;
        let per_token = match s.loss_type {
            LossType::Cispo => {
                let clamped = coef_1.clamp(f64::NEG_INFINITY, s.epsilon_high)?.detach();
                clamped.broadcast_mul(adv)?.broadcast_mul(x.logps)?.neg()?
            }
            LossType::Sapo => {
                let temps: Vec<f32> = rows
                    .advs
                    .iter()
                    .map(|&a| {
                        if a > 0.0 {
                            s.sapo_temperature_pos as f32
                        } else {
                            s.sapo_temperature_neg as f32
                        }
                    })
                    .collect();
                let temps = Tensor::from_vec(temps, (b, 1), device)?;
                let z = (coef_1 - 1.0)?.broadcast_mul(&temps)?;
                let sigmoid = (z.neg()?.exp()? + 1.0)?.recip()?;
                let soft = (sigmoid * 4.0)?.broadcast_div(&temps)?;
                soft.broadcast_mul(adv)?.neg()?
            }
            LossType::Vespo => {
                let ratio: Vec<Vec<f32>> = log_ratio.to_vec2()?;
                let is: Option<Vec<Vec<f32>>> = x.is_ratio.map(|r| r.to_vec2()).transpose()?;
                let p =
                    gamma_weights(&rows.advs, &ratio, &rows.m, is.as_deref(), &s.vespo, device)?;
                let loss = p.broadcast_mul(adv)?.broadcast_mul(x.logps)?.neg()?;
                phi = Some(p);
                loss
            }
            _ => {
                let coef_2 = coef_1.clamp(1.0 - s.epsilon_low, 1.0 + s.epsilon_high)?;
                if let Some(delta) = s.delta {
                    stat_coef = coef_1.clamp(f64::NEG_INFINITY, delta)?;
                }
                let loss_1 = stat_coef.broadcast_mul(adv)?;
                let loss_2 = coef_2.broadcast_mul(adv)?;
                loss_1.minimum(&loss_2)?.neg()?
            }
        };
        Ok(Surrogate {
            per_token,
            stat_coef,
            phi,
        })
    }
}

/// The per-token loss in the loss: the surrogate through the gates, times the mismatch
/// correction's ratio (vespo has it in its weight), plus β times the KL, times the
/// completion mask.
fn masked_token_loss(
    x: &LossInputs,
    s: &LossSettings,
    mut per_token: Tensor,
    gates: &Gates,
    kl: Option<&Tensor>,
) -> Result<Tensor> {
    if let Some(keep) = &gates.off_policy {
        per_token = per_token.broadcast_mul(keep)?;
    }
    if let Some(high) = &gates.high_entropy {
        per_token = per_token.broadcast_mul(high)?;
    }
    if let (Some(ratio), false) = (x.is_ratio, s.loss_type == LossType::Vespo) {
        per_token = per_token.broadcast_mul(ratio)?;
    }
    if let Some(kl) = kl {
        per_token = per_token.broadcast_add(&(kl * s.beta)?)?;
    }
    per_token.broadcast_mul(x.mask)
}

/// The loss type's aggregation of the masked per-token loss: its value (TRL's
/// `policy_loss`) and the value to back-propagate (divided by the gradient accumulation,
/// except for the losses normalised by the whole generation batch's tokens).
fn aggregate(
    x: &LossInputs,
    s: &LossSettings,
    masked: &Tensor,
    active: f64,
) -> Result<(Tensor, Tensor)> {
    let (b, _) = x.logps.dims2()?;
    let mask = x.mask;
    let ga = s.grad_accum as f64;
    let per_sequence_mean = || -> Result<Tensor> {
        let lengths = mask.sum(D::Minus1)?.clamp(1.0, f64::INFINITY)?;
        (masked.sum(D::Minus1)? / lengths)?.mean_all()
    };
    Ok(match s.loss_type {
        LossType::Grpo | LossType::Sapo => {
            let v = per_sequence_mean()?;
            (v.clone(), (v / ga)?)
        }
        LossType::Bnpo => {
            let v = (masked.sum_all()? / active.max(1.0))?;
            (v.clone(), (v / ga)?)
        }
        LossType::DrGrpo => {
            let v = (masked.sum_all()? / (b as f64 * s.max_completion_length as f64))?;
            (v.clone(), (v / ga)?)
        }
        LossType::Dapo | LossType::Cispo | LossType::Vespo => {
            let v = (masked.sum_all()? / s.batch_tokens.max(1.0))?;
            (v.clone(), v)
        }
        LossType::Luspo => {
            let v = masked.sum(D::Minus1)?.mean_all()?;
            (v.clone(), (v / ga)?)
        }
    })
}

/// The entropy bonus to subtract from the loss: `entropy_coef` times the mean entropy over
/// the active (and, with the high-entropy mask, high-entropy) tokens, divided by the
/// gradient accumulation.
fn entropy_bonus(
    x: &LossInputs,
    s: &LossSettings,
    high_entropy: Option<&Tensor>,
) -> Result<Tensor> {
    let mask = x.mask;
    let h = x.entropies.expect("checked when the rows were read");
    let effective = match high_entropy {
        Some(high) => (mask * high)?,
        None => mask.clone(),
    };
    let count = effective.sum_all()?.to_scalar::<f32>()? as f64;
    let bonus = ((h * &effective)?.sum_all()? / (count.max(1.0) * s.grad_accum as f64))?;
    bonus * s.entropy_coef
}

/// The shares of active tokens clipped below, above and either way, read from the ratio
/// `stat_coef` (0 for the losses that do not clip; cispo's share clipped above its cap).
fn clip_shares(stat_coef: &Tensor, rows: &HostRows, s: &LossSettings) -> Result<(f64, f64, f64)> {
    let m = &rows.m;
    let adv_col: Vec<Vec<f32>> = rows.advs.iter().map(|&a| vec![a]).collect();
    let ratio: Vec<Vec<f32>> = stat_coef.detach().to_vec2()?;
    let flag = |f: &dyn Fn(f32, f32) -> bool| -> Vec<Vec<f32>> {
        ratio
            .iter()
            .zip(&adv_col)
            .map(|(row, a)| {
                row.iter()
                    .map(|&c| f32::from(u8::from(f(c, a[0]))))
                    .collect()
            })
            .collect()
    };
    let (el, eh) = (s.epsilon_low as f32, s.epsilon_high as f32);
    let (mut clip_low, mut clip_high, mut clip_region) = (0.0, 0.0, 0.0);
    if s.loss_type.clipped() {
        clip_low = masked_mean(&flag(&|c, a| c < 1.0 - el && a < 0.0), m);
        clip_high = masked_mean(&flag(&|c, a| c > 1.0 + eh && a > 0.0), m);
        clip_region = masked_mean(
            &flag(&|c, a| (c < 1.0 - el && a < 0.0) || (c > 1.0 + eh && a > 0.0)),
            m,
        );
    } else if s.loss_type == LossType::Cispo {
        clip_region = masked_mean(&flag(&|c, a| c > eh && a > 0.0), m);
        clip_high = clip_region;
    }
    Ok((clip_low, clip_high, clip_region))
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advantages_are_centred_and_scaled_per_group() {
        let (a, zero) = advantages(
            &[1.0, 2.0, 3.0, 5.0, 5.0, 5.0],
            3,
            ScaleRewards::Group,
            1e-4,
        );
        assert!((a[0] + 1.0 / (1.0 + 1e-4)).abs() < 1e-12);
        assert!(a[1].abs() < 1e-12);
        assert_eq!(&a[3..], &[0.0, 0.0, 0.0]);
        assert_eq!(zero, vec![false, false, false, true, true, true]);
        let (a, _) = advantages(&[1.0, 3.0], 2, ScaleRewards::None, 1e-4);
        assert_eq!(a, vec![-1.0, 1.0]);
    }
}
