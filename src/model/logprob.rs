//! Log-probabilities of chosen tokens from hidden states, through the output projection in
//! chunks of rows, so a `[rows, vocab]` block is the largest thing ever held (never
//! `[batch, seq, vocab]`: Gemma's vocabulary has 262,144 entries).

use candle_core::{DType, Result, Tensor, D};

/// Rows of hidden state pushed through the output projection at once.
pub const CHUNK_ROWS: usize = 64;

/// `log p(target)` for each row of `hidden: [n, d]` against `head: [vocab, d]`,
/// `targets: [n]` (u32), with an optional `tanh` soft cap on the logits and the logits
/// divided by `temperature` (1 for the model's own distribution).
///
/// Differentiable with respect to `hidden` (the head is frozen) without keeping any
/// `[rows, vocab]` block for the backward pass: each chunk's gradient with respect to its
/// hidden rows, `Σ_v (1[v = target] − p_v) · ∂logit_v · W_v`, is computed while the chunk's
/// probabilities are at hand and folded into a surrogate `Σ_d h · g` whose value is removed
/// again, so the graph holds only `[rows, d]` per chunk.
pub fn gather_logprobs(
    hidden: &Tensor,
    head: &Tensor,
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
        let grad = weights
            .to_dtype(head.dtype())?
            .matmul(head)?
            .to_dtype(h.dtype())?;
        let surrogate = (&h * &grad)?.sum(1)?.to_dtype(value.dtype())?;
        // the surrogate minus itself is exactly 0: the value is untouched, the gradient is `grad`
        parts.push((value + (&surrogate - surrogate.detach())?)?);
    }
    Tensor::cat(&parts, 0)
}

/// Logits `[n, vocab]` in f32 for `hidden: [n, d]`.
pub fn logits_of(hidden: &Tensor, head: &Tensor, softcap: Option<f64>) -> Result<Tensor> {
    let logits = super::frozen::matmul_t(hidden, head)?.to_dtype(DType::F32)?;
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
