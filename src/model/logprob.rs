//! Log-probabilities of chosen tokens from hidden states, through the output projection in
//! chunks of rows, so a `[rows, vocab]` block is the largest thing ever held (never
//! `[batch, seq, vocab]`: Gemma's vocabulary has 262,144 entries). Each chunk's gradient
//! with respect to its hidden rows is formed while its probabilities are at hand (on the
//! CPU inside one op, in parallel over rows), so no `[rows, vocab]` block outlives its chunk
//! and backward computes no logits.

use std::sync::Mutex;

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

use super::frozen::{self, FrozenWeight};

/// Rows of hidden state pushed through the output projection at once.
pub const CHUNK_ROWS: usize = 512;

/// `log p(target)` for each row of `hidden: [n, d]` against `head: [vocab, d]`,
/// `targets: [n]` (u32), with an optional `tanh` soft cap on the logits and the logits
/// divided by `temperature` (1 for the model's own distribution).
///
/// Differentiable with respect to `hidden` (the head is frozen) without keeping any
/// `[rows, vocab]` block for the backward pass: each chunk's gradient with respect to its
/// hidden rows, `Σ_v (1[v = target] − p_v) · ∂logit_v · W_v`, is computed while the chunk's
/// probabilities are at hand, and only that `[rows, d]` block is kept: on the CPU in f32
/// without a soft cap by one op per chunk, elsewhere folded into a surrogate `Σ_d h · g`
/// whose value is removed again.
pub fn gather_logprobs(
    hidden: &Tensor,
    head: &FrozenWeight,
    targets: &Tensor,
    softcap: Option<f64>,
    temperature: f64,
) -> Result<Tensor> {
    let n = hidden.dim(0)?;
    let track = hidden.track_op();
    let mut parts = Vec::with_capacity(n.div_ceil(CHUNK_ROWS));
    for start in (0..n).step_by(CHUNK_ROWS) {
        let len = CHUNK_ROWS.min(n - start);
        let h = hidden.narrow(0, start, len)?;
        let t = targets.narrow(0, start, len)?.contiguous()?;
        if fusable(&h, head, softcap) {
            let op = ChosenLogprob {
                head: head.clone(),
                temperature,
                row_grads: track.then(|| Mutex::new(None)),
            };
            let h = h.contiguous()?;
            parts.push(match track {
                true => h.apply_op2(&t, op)?,
                false => h.apply_op2_no_bwd(&t, &op)?,
            });
            continue;
        }
        let raw = logits_of(&h.detach(), head, None)?;
        let capped = match softcap {
            Some(cap) => ((&raw / cap)?.tanh()? * cap)?,
            None => raw.clone(),
        };
        let logits = (capped / temperature)?;
        let logz = logsumexp(&logits)?;
        let chosen = logits.gather(&t.unsqueeze(1)?, 1)?.squeeze(1)?;
        let value = (chosen - &logz)?;
        if !track {
            parts.push(value);
            continue;
        }
        // d logprob / d logit_v = 1[v = t] − p_v, times d logit_v / d raw_v
        let probs = logits.broadcast_sub(&logz.unsqueeze(1)?)?.exp()?;
        let onehot = probs.zeros_like()?.scatter_add(
            &t.unsqueeze(1)?,
            &Tensor::ones((len, 1), probs.dtype(), probs.device())?,
            1,
        )?;
        let mut weights = ((onehot - probs)? / temperature)?;
        if let Some(cap) = softcap {
            let tanh = (&raw / cap)?.tanh()?;
            weights = (weights * (1.0 - tanh.sqr()?)?)?;
        }
        // in the head's dtype: a bf16 head is never copied to f32
        let grad =
            frozen::times_weight(&weights.to_dtype(head.dtype())?, head)?.to_dtype(h.dtype())?;
        let surrogate = (&h * &grad)?.sum(1)?.to_dtype(value.dtype())?;
        // the surrogate minus itself is exactly 0: the value is untouched, the gradient is `grad`
        parts.push((value + (&surrogate - surrogate.detach())?)?);
    }
    Tensor::cat(&parts, 0)
}

/// Whether the fused CPU op computes a chunk (f32 on the CPU, no soft cap).
fn fusable(hidden: &Tensor, head: &FrozenWeight, softcap: Option<f64>) -> bool {
    hidden.device().is_cpu()
        && head.device().is_cpu()
        && hidden.dtype() == DType::F32
        && head.dtype() == DType::F32
        && softcap.is_none()
}

/// `log softmax(h Wᵀ / T)[target]` per row of `h: [n, d]`, for `W: [vocab, d]` and u32
/// `targets: [n]`. The logits live only inside the forward call: when a backward pass will
/// follow, the forward also forms each row's gradient `∂ logprob / ∂ h = ((onehot − p) / T) W`
/// from the probabilities at hand and keeps it (`[n, d]`) for backward, which scales it by
/// the incoming gradient; nothing of vocabulary size outlives the call and no logit is
/// computed twice.
struct ChosenLogprob {
    /// `W: [vocab, d]`, f32 on the CPU (a tensor or blocks).
    head: FrozenWeight,
    temperature: f64,
    /// `Some` when backward will run: filled with the rows' gradients by the forward pass.
    row_grads: Option<Mutex<Option<Tensor>>>,
}

impl CustomOp2 for ChosenLogprob {
    fn name(&self) -> &'static str {
        "chosen-logprob"
    }

    fn cpu_fwd(
        &self,
        h: &CpuStorage,
        h_layout: &Layout,
        targets: &CpuStorage,
        targets_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, d) = h_layout.shape().dims2()?;
        let (vocab, w_d) = self.head.dims2()?;
        let (CpuStorage::U32(ids), Some((start, end))) =
            (targets, targets_layout.contiguous_offsets())
        else {
            bail!("chosen-logprob takes contiguous u32 targets");
        };
        let ids = &ids[start..end];
        if !h_layout.is_contiguous() || w_d != d || ids.len() != n {
            bail!(
                "chosen-logprob: hidden [{n}, {d}], head [{vocab}, {w_d}], {} targets",
                ids.len()
            );
        }
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= vocab) {
            bail!("chosen-logprob: target {bad} outside the vocabulary of {vocab}");
        }
        let CpuStorage::F32(hs) = h else {
            bail!("chosen-logprob takes f32 hidden states");
        };
        let hs = &hs[h_layout.start_offset()..][..n * d];
        let mut logits = frozen::cpu_times_t(hs, n, &self.head)?;
        let inv_t = (1.0 / self.temperature) as f32;
        let keep_grads = self.row_grads.is_some();
        let mut out = vec![0f32; n];
        // rows in parallel: each turns its logits into its log-prob and, for backward, into
        // `(onehot − p) / T` in place
        let threads = candle_core::utils::get_num_threads().clamp(1, n.max(1));
        let rows_per = n.div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            for ((rows, outs), ids) in logits
                .chunks_mut(rows_per * vocab)
                .zip(out.chunks_mut(rows_per))
                .zip(ids.chunks(rows_per))
            {
                scope.spawn(move || {
                    for ((row, out), &id) in rows.chunks_exact_mut(vocab).zip(outs).zip(ids) {
                        *out = row_logprob(row, id as usize, inv_t, keep_grads);
                    }
                });
            }
        });
        if let Some(slot) = &self.row_grads {
            let grads = frozen::cpu_times(&logits, n, &self.head)?;
            let grads = Tensor::from_vec(grads, (n, d), &candle_core::Device::Cpu)?;
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(grads);
        }
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        _h: &Tensor,
        _targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let Some(slot) = &self.row_grads else {
            bail!("chosen-logprob: backward through a chunk recorded without gradients");
        };
        let row_grads = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(row_grads) = row_grads else {
            bail!("chosen-logprob: the chunk's gradient was already used");
        };
        Ok((Some(row_grads.broadcast_mul(&grad.unsqueeze(1)?)?), None))
    }
}

/// `log softmax(row / T)[target]` of one row of logits; with `into_weights` the row is
/// overwritten with `(onehot(target) − softmax(row / T)) / T`, the log-prob's gradient with
/// respect to the logits.
fn row_logprob(row: &mut [f32], target: usize, inv_t: f32, into_weights: bool) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) * inv_t;
    let log_z = max + super::exp::exp_sum(row, inv_t, max).ln() as f32;
    let logprob = row[target] * inv_t - log_z;
    if into_weights {
        super::exp::exp_in_place(row, inv_t, log_z, -inv_t);
        row[target] += inv_t;
    }
    logprob
}

/// Logits `[n, vocab]` in f32 for `hidden: [n, d]`.
pub fn logits_of(hidden: &Tensor, head: &FrozenWeight, softcap: Option<f64>) -> Result<Tensor> {
    let logits = frozen::matmul_t(hidden, head)?.to_dtype(DType::F32)?;
    soft_capped(logits, softcap)
}

/// `cap · tanh(logits / cap)` where the model has a soft cap, the logits as they are where not.
pub fn soft_capped(logits: Tensor, softcap: Option<f64>) -> Result<Tensor> {
    match softcap {
        Some(cap) => (logits / cap)?.tanh()? * cap,
        None => Ok(logits),
    }
}

/// `log Σ exp(x)` over the last dimension, stable: `[n, v] → [n]`.
fn logsumexp(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let sum = x.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?;
    (sum.log()? + max)?.squeeze(D::Minus1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn the_fused_chunk_equals_the_composite_in_value_and_gradient() {
        let device = Device::Cpu;
        let head = FrozenWeight::from(Tensor::randn(0f32, 1.0, (50, 8), &device).unwrap());
        let h = Var::randn(0f32, 1.0, (7, 8), &device).unwrap();
        let targets = Tensor::new(&[3u32, 0, 49, 7, 7, 12, 30], &device).unwrap();
        let weights = Tensor::randn(0f32, 1.0, 7, &device).unwrap();
        let fused = gather_logprobs(h.as_tensor(), &head, &targets, None, 0.7).unwrap();
        // the composite path: a soft cap too large to change anything
        let composite = gather_logprobs(h.as_tensor(), &head, &targets, Some(1e9), 0.7).unwrap();
        let max = |t: Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(max((&fused - &composite).unwrap()) < 1e-5);
        let g_fused = (fused * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g_comp = (composite * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (g_fused.get(&h).unwrap(), g_comp.get(&h).unwrap());
        assert!(max((a - b).unwrap()) < 1e-4);
    }
}
