//! GRPO's advantages and per-token loss, written to equal TRL's `GRPOTrainer`
//! (`_generate_and_score_completions` and `_compute_loss`, TRL 1.16) for the loss types
//! grpo, bnpo, dr_grpo and dapo.

use candle_core::{Result, Tensor, D};

/// How the per-token losses of a micro-batch become one number.
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
}

impl LossType {
    /// The loss type called `name`.
    pub fn by_name(name: &str) -> Option<Self> {
        Some(match name {
            "grpo" => LossType::Grpo,
            "bnpo" => LossType::Bnpo,
            "dr_grpo" => LossType::DrGrpo,
            "dapo" => LossType::Dapo,
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
    let std = |xs: &[f64]| -> f64 {
        if xs.len() < 2 {
            return 0.0;
        }
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (xs.len() - 1) as f64;
        var.sqrt()
    };
    let batch_std = std(rewards);
    let mut adv = Vec::with_capacity(rewards.len());
    let mut zero = Vec::with_capacity(rewards.len());
    for g in rewards.chunks(group) {
        let mean = g.iter().sum::<f64>() / g.len() as f64;
        let s = match scale {
            ScaleRewards::Batch => batch_std,
            _ => std(g),
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

/// The loss settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossSettings {
    /// The aggregation.
    pub loss_type: LossType,
    /// Lower clip: the ratio is kept at least `1 - epsilon_low`.
    pub epsilon_low: f64,
    /// Upper clip: the ratio is kept at most `1 + epsilon_high`.
    pub epsilon_high: f64,
    /// Weight of the k3 KL penalty against the reference (0: none).
    pub beta: f64,
    /// Micro-batches accumulated per optimiser step.
    pub grad_accum: usize,
    /// The completion token budget (dr_grpo's normaliser).
    pub max_completion_length: usize,
    /// Active completion tokens in the whole generation batch (dapo's normaliser).
    pub batch_tokens: f64,
}

/// What the loss of one micro-batch measured besides its value.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossStats {
    /// The loss value (before the gradient-accumulation division), TRL's `policy_loss`.
    pub loss: f64,
    /// Mean k3 KL over active tokens (0 when `beta` is 0).
    pub kl: f64,
    /// Share of active tokens clipped below (ratio < 1 - ε_low with A < 0).
    pub clip_low: f64,
    /// Share clipped above (ratio > 1 + ε_high with A > 0).
    pub clip_high: f64,
    /// Share clipped either way.
    pub clip_region: f64,
    /// Active tokens in the micro-batch.
    pub tokens: f64,
}

/// The micro-batch loss to back-propagate, and its statistics. `logps`, `old`, `ref_logps`
/// and `mask` are `[b, t]` (f32; `logps` carries the gradient), `adv` is `[b]`.
pub fn loss(
    logps: &Tensor,
    old: &Tensor,
    ref_logps: Option<&Tensor>,
    adv: &Tensor,
    mask: &Tensor,
    s: &LossSettings,
) -> Result<(Tensor, LossStats)> {
    let adv = adv.unsqueeze(1)?;
    let coef_1 = (logps - old)?.exp()?;
    let coef_2 = coef_1.clamp(1.0 - s.epsilon_low, 1.0 + s.epsilon_high)?;
    let loss_1 = coef_1.broadcast_mul(&adv)?;
    let loss_2 = coef_2.broadcast_mul(&adv)?;
    let mut per_token = loss_1.minimum(&loss_2)?.neg()?;
    let mut kl_mean = 0.0;
    let active = mask.sum_all()?.to_scalar::<f32>()? as f64;
    if s.beta != 0.0 {
        let r = ref_logps.expect("reference log-probs when beta is not 0");
        let diff = (r - logps)?;
        // k3, times the importance ratio (TRL's use_bias_correction_kl, on by default)
        let kl = ((diff.exp()? - &diff)? - 1.0)?;
        let kl = (kl * &coef_1)?;
        kl_mean = (&kl * mask)?.sum_all()?.to_scalar::<f32>()? as f64 / active.max(1.0);
        per_token = (per_token + (kl * s.beta)?)?;
    }
    let masked = (per_token * mask)?;
    let ga = s.grad_accum as f64;
    let (value, scaled) = match s.loss_type {
        LossType::Grpo => {
            let lengths = mask.sum(D::Minus1)?.clamp(1.0, f64::INFINITY)?;
            let v = (masked.sum(D::Minus1)? / lengths)?.mean_all()?;
            (v.clone(), (v / ga)?)
        }
        LossType::Bnpo => {
            let v = (masked.sum_all()? / active.max(1.0))?;
            (v.clone(), (v / ga)?)
        }
        LossType::DrGrpo => {
            let rows = logps.dim(0)? as f64;
            let v = (masked.sum_all()? / (rows * s.max_completion_length as f64))?;
            (v.clone(), (v / ga)?)
        }
        LossType::Dapo => {
            let v = (masked.sum_all()? / s.batch_tokens.max(1.0))?;
            (v.clone(), v)
        }
    };
    // clipping statistics
    let ratio: Vec<Vec<f32>> = coef_1.detach().to_vec2()?;
    let advs: Vec<f32> = adv.squeeze(1)?.to_vec1()?;
    let m: Vec<Vec<f32>> = mask.to_vec2()?;
    let (mut low, mut high) = (0.0, 0.0);
    for (i, row) in ratio.iter().enumerate() {
        for (t, &c) in row.iter().enumerate() {
            if m[i][t] > 0.0 {
                let c = c as f64;
                if c < 1.0 - s.epsilon_low && advs[i] < 0.0 {
                    low += 1.0;
                }
                if c > 1.0 + s.epsilon_high && advs[i] > 0.0 {
                    high += 1.0;
                }
            }
        }
    }
    let n = active.max(1.0);
    let stats = LossStats {
        loss: value.to_scalar::<f32>()? as f64,
        kl: kl_mean,
        clip_low: low / n,
        clip_high: high / n,
        clip_region: (low + high) / n,
        tokens: active,
    };
    Ok((scaled, stats))
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
