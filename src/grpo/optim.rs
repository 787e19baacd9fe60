//! AdamW as torch implements it (decoupled weight decay, bias-corrected moments), with
//! gradient-norm clipping and a learning-rate schedule; its state saves to and loads from a
//! safetensors file so a resumed run continues exactly.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Result, Tensor, Var};

/// How the learning rate moves over the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// The same rate throughout (after warm-up).
    Constant,
    /// Down linearly to 0 at the last step.
    Linear,
    /// Down along a half cosine to 0 at the last step.
    Cosine,
}

impl Schedule {
    /// The schedule called `name`.
    pub fn by_name(name: &str) -> Option<Self> {
        Some(match name {
            "constant" => Schedule::Constant,
            "linear" => Schedule::Linear,
            "cosine" => Schedule::Cosine,
            _ => return None,
        })
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        match self {
            Schedule::Constant => "constant",
            Schedule::Linear => "linear",
            Schedule::Cosine => "cosine",
        }
    }

    /// The rate at optimiser step `step` (0-based) of `total`, after `warmup` steps rising
    /// linearly from 0, as transformers' `get_*_schedule_with_warmup`.
    pub fn rate(self, peak: f64, step: usize, total: usize, warmup: usize) -> f64 {
        if step < warmup {
            return peak * step as f64 / warmup.max(1) as f64;
        }
        let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
        match self {
            Schedule::Constant => peak,
            Schedule::Linear => peak * (1.0 - progress).max(0.0),
            Schedule::Cosine => {
                peak * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

/// AdamW's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWSettings {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWSettings {
    fn default() -> Self {
        AdamWSettings {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW's moments and step count, to put back with [`AdamW::set_state`].
#[derive(Clone)]
pub struct AdamWState {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    steps: usize,
}

/// AdamW over named variables.
pub struct AdamW {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    steps: usize,
    settings: AdamWSettings,
}

impl AdamW {
    /// An optimiser for `vars`, moments at zero.
    pub fn new(vars: Vec<(String, Var)>, settings: AdamWSettings) -> Result<Self> {
        let m = vars
            .iter()
            .map(|(_, v)| v.as_tensor().zeros_like())
            .collect::<Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(AdamW {
            vars,
            m,
            v,
            steps: 0,
            settings,
        })
    }

    /// Optimiser steps taken.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The moments and step count now (each update makes new moment tensors, so this is a
    /// snapshot).
    pub fn state(&self) -> AdamWState {
        AdamWState {
            m: self.m.clone(),
            v: self.v.clone(),
            steps: self.steps,
        }
    }

    /// Puts back a state taken with [`AdamW::state`].
    pub fn set_state(&mut self, state: AdamWState) {
        self.m = state.m;
        self.v = state.v;
        self.steps = state.steps;
    }

    /// One update with the gradients `grads` (one per variable, in order) at rate `lr`.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.steps += 1;
        let s = self.settings;
        let t = self.steps as i32;
        let bias1 = 1.0 - s.beta1.powi(t);
        let bias2 = 1.0 - s.beta2.powi(t);
        for (i, ((_, var), g)) in self.vars.iter().zip(grads).enumerate() {
            let m = ((&self.m[i] * s.beta1)? + (g * (1.0 - s.beta1))?)?;
            let v = ((&self.v[i] * s.beta2)? + (g.sqr()? * (1.0 - s.beta2))?)?;
            let mut p = var.as_tensor().clone();
            if s.weight_decay != 0.0 {
                p = (p * (1.0 - lr * s.weight_decay))?;
            }
            let denom = ((v.sqrt()? / bias2.sqrt())? + s.eps)?;
            let p = (p - ((&m / denom)? * (lr / bias1))?)?;
            crate::model::lora::set(var, &p)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Writes the moments and the step count to a safetensors file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            tensors.insert(format!("{name}.exp_avg"), self.m[i].clone());
            tensors.insert(format!("{name}.exp_avg_sq"), self.v[i].clone());
        }
        let device = self.m.first().map(|m| m.device().clone());
        if let Some(device) = device {
            tensors.insert("step".into(), Tensor::new(&[self.steps as u32], &device)?);
        }
        candle_core::safetensors::save(&tensors, path)
    }

    /// Reads the state [`AdamW::save`] wrote; fails naming a missing tensor.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let device = match self.m.first() {
            Some(m) => m.device().clone(),
            None => return Ok(()),
        };
        let tensors = candle_core::safetensors::load(path, &device)?;
        let get = |key: &str| {
            tensors.get(key).cloned().ok_or_else(|| {
                candle_core::Error::Msg(format!("{}: no tensor `{key}`", path.display()))
            })
        };
        for (i, (name, _)) in self.vars.iter().enumerate() {
            self.m[i] = get(&format!("{name}.exp_avg"))?;
            self.v[i] = get(&format!("{name}.exp_avg_sq"))?;
        }
        self.steps = get("step")?.to_vec1::<u32>()?[0] as usize;
        Ok(())
    }
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm` (as torch's
/// `clip_grad_norm_`); returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let mut total = 0.0f64;
    for g in grads.iter() {
        total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = total.sqrt();
    let coef = max_norm / (norm + 1e-6);
    if max_norm > 0.0 && coef < 1.0 {
        for g in grads.iter_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cosine_schedule_warms_up_then_decays_to_zero() {
        let s = Schedule::Cosine;
        assert_eq!(s.rate(1.0, 0, 10, 2), 0.0);
        assert_eq!(s.rate(1.0, 1, 10, 2), 0.5);
        assert_eq!(s.rate(1.0, 2, 10, 2), 1.0);
        assert!((s.rate(1.0, 6, 10, 2) - 0.5).abs() < 1e-12);
        assert!(s.rate(1.0, 10, 10, 2).abs() < 1e-12);
    }

    #[test]
    fn adamw_first_step_moves_by_the_rate() {
        let var = Var::new(&[1.0f32, -1.0], &Device::Cpu).unwrap();
        let mut opt =
            AdamW::new(vec![("w".into(), var.clone())], AdamWSettings::default()).unwrap();
        let g = Tensor::new(&[0.5f32, -2.0], &Device::Cpu).unwrap();
        opt.step(&[g], 0.1).unwrap();
        // the first bias-corrected step is lr * sign(g)
        let w: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        assert!((w[0] - 0.9).abs() < 1e-5 && (w[1] + 0.9).abs() < 1e-5);
        let mut grads = vec![Tensor::new(&[3.0f32, 4.0], &Device::Cpu).unwrap()];
        let norm = clip_grad_norm(&mut grads, 1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let g: Vec<f32> = grads[0].to_vec1().unwrap();
        assert!((g[0] - 0.6).abs() < 1e-5);
    }
}
