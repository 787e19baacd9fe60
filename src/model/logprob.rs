//! Log-probabilities of chosen tokens from hidden states, through the output projection in
//! chunks of rows, so a `[rows, vocab]` block is the largest thing ever held (never
//! `[batch, seq, vocab]`: Gemma's vocabulary has 262,144 entries).

use candle_core::{DType, Result, Tensor, D};

/// Rows of hidden state pushed through the output projection at once.
pub const CHUNK_ROWS: usize = 64;

/// `log p(target)` for each row of `hidden: [n, d]` against `head: [vocab, d]`,
/// `targets: [n]` (u32), with an optional `tanh` soft cap on the logits and the logits
/// divided by `temperature` (1 for the model's own distribution). Differentiable.
pub fn gather_logprobs(
    hidden: &Tensor,
    head: &Tensor,
    targets: &Tensor,
    softcap: Option<f64>,
    temperature: f64,
) -> Result<Tensor> {
    let n = hidden.dim(0)?;
    let mut parts = Vec::with_capacity(n.div_ceil(CHUNK_ROWS));
    for start in (0..n).step_by(CHUNK_ROWS) {
        let len = CHUNK_ROWS.min(n - start);
        let h = hidden.narrow(0, start, len)?;
        let t = targets.narrow(0, start, len)?.contiguous()?;
        let mut logits = logits_of(&h, head, softcap)?;
        if temperature != 1.0 {
            logits = (logits / temperature)?;
        }
        let logz = logsumexp(&logits)?;
        let chosen = logits.gather(&t.unsqueeze(1)?, 1)?.squeeze(1)?;
        parts.push((chosen - logz)?);
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
