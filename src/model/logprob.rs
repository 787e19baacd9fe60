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
    Ok(gather(hidden, head, targets, softcap, temperature, None)?.0)
}

/// [`gather_logprobs`] and, per row, the entropy `−Σ p log p` of the temperature-scaled
/// distribution, both `[n]`. The entropy carries a gradient with respect to `hidden` when
/// `entropy_grad` is set (an entropy bonus), and is detached otherwise (a mask or a metric).
pub fn gather_logprobs_entropy(
    hidden: &Tensor,
    head: &FrozenWeight,
    targets: &Tensor,
    softcap: Option<f64>,
    temperature: f64,
    entropy_grad: bool,
) -> Result<(Tensor, Tensor)> {
    let (lp, entropy) = gather(
        hidden,
        head,
        targets,
        softcap,
        temperature,
        Some(entropy_grad),
    )?;
    Ok((lp, entropy.expect("entropy asked for")))
}

/// Both of the above: `entropy` is `None` for log-probs alone, `Some(with_gradient)` for
/// entropies too.
fn gather(
    hidden: &Tensor,
    head: &FrozenWeight,
    targets: &Tensor,
    softcap: Option<f64>,
    temperature: f64,
    entropy: Option<bool>,
) -> Result<(Tensor, Option<Tensor>)> {
    let n = hidden.dim(0)?;
    let track = hidden.track_op();
    let entropy_grad = track && entropy == Some(true);
    let mut parts = Vec::with_capacity(n.div_ceil(CHUNK_ROWS));
    let mut entropies = Vec::with_capacity(n.div_ceil(CHUNK_ROWS));
    for start in (0..n).step_by(CHUNK_ROWS) {
        let len = CHUNK_ROWS.min(n - start);
        let h = hidden.narrow(0, start, len)?;
        let t = targets.narrow(0, start, len)?.contiguous()?;
        if fusable(&h, head, softcap) {
            let op = ChosenLogprob {
                head: head.clone(),
                temperature,
                row_grads: track.then(|| Mutex::new(None)),
                entropy: entropy.is_some(),
                entropy_grads: entropy_grad.then(|| Mutex::new(None)),
            };
            let h = h.contiguous()?;
            let out = match track {
                true => h.apply_op2(&t, op)?,
                false => h.apply_op2_no_bwd(&t, &op)?,
            };
            if entropy.is_some() {
                parts.push(out.narrow(1, 0, 1)?.squeeze(1)?);
                let e = out.narrow(1, 1, 1)?.squeeze(1)?;
                entropies.push(if entropy_grad { e } else { e.detach() });
            } else {
                parts.push(out);
            }
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
        let all = logits.broadcast_sub(&logz.unsqueeze(1)?)?;
        let probs = all.exp()?;
        let h_value = match entropy {
            Some(_) => Some((&probs * &all)?.sum(1)?.neg()?),
            None => None,
        };
        // d logit_v / d raw_v
        let dcap = match softcap {
            Some(cap) => Some((1.0 - (&raw / cap)?.tanh()?.sqr()?)?),
            None => None,
        };
        // a surrogate whose value is 0 and whose gradient with respect to h is `weights · W`
        let surrogate = |weights: Tensor| -> Result<Tensor> {
            let mut weights = (weights / temperature)?;
            if let Some(d) = &dcap {
                weights = (weights * d)?;
            }
            // in the head's dtype: a bf16 head is never copied to f32
            let grad = frozen::times_weight(&weights.to_dtype(head.dtype())?, head)?
                .to_dtype(h.dtype())?;
            let s = (&h * &grad)?.sum(1)?.to_dtype(value.dtype())?;
            &s - s.detach()
        };
        if let Some(hv) = h_value {
            entropies.push(if entropy_grad {
                // d H / d logit_v = −p_v (log p_v + H)
                let w = (&probs * all.broadcast_add(&hv.unsqueeze(1)?)?)?.neg()?;
                (&hv + surrogate(w)?)?
            } else {
                hv
            });
        }
        if !track {
            parts.push(value);
            continue;
        }
        // d logprob / d logit_v = 1[v = t] − p_v
        let onehot = probs.zeros_like()?.scatter_add(
            &t.unsqueeze(1)?,
            &Tensor::ones((len, 1), probs.dtype(), probs.device())?,
            1,
        )?;
        let zero = surrogate((onehot - probs)?)?;
        parts.push((value + zero)?);
    }
    let entropy = match entropy {
        Some(_) => Some(Tensor::cat(&entropies, 0)?),
        None => None,
    };
    Ok((Tensor::cat(&parts, 0)?, entropy))
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
    /// Output `[n, 2]`: each row's log-prob and its distribution's entropy.
    entropy: bool,
    /// `Some` when the entropy's gradient is wanted: filled like `row_grads`.
    entropy_grads: Option<Mutex<Option<Tensor>>>,
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
        let width = if self.entropy { 2 } else { 1 };
        let mut out = vec![0f32; n * width];
        let mut entropy_weights = vec![
            0f32;
            if self.entropy_grads.is_some() {
                n * vocab
            } else {
                0
            }
        ];
        // rows in parallel: each turns its logits into its log-prob (and entropy) and, for
        // backward, into `(onehot − p) / T` in place (and `−p (log p + H) / T` beside)
        let threads = candle_core::utils::get_num_threads().clamp(1, n.max(1));
        let rows_per = n.div_ceil(threads).max(1);
        let chunks = n.div_ceil(rows_per);
        let mut weight_chunks: Vec<Option<&mut [f32]>> = match entropy_weights.is_empty() {
            true => (0..chunks).map(|_| None).collect(),
            false => entropy_weights
                .chunks_mut(rows_per * vocab)
                .map(Some)
                .collect(),
        };
        let entropy = self.entropy;
        std::thread::scope(|scope| {
            for (((rows, outs), ids), ew) in logits
                .chunks_mut(rows_per * vocab)
                .zip(out.chunks_mut(rows_per * width))
                .zip(ids.chunks(rows_per))
                .zip(weight_chunks.iter_mut())
            {
                scope.spawn(move || {
                    let mut ew = ew.as_deref_mut().map(|w| w.chunks_exact_mut(vocab));
                    for ((row, out), &id) in rows
                        .chunks_exact_mut(vocab)
                        .zip(outs.chunks_exact_mut(width))
                        .zip(ids)
                    {
                        if entropy {
                            let w = ew.as_mut().and_then(Iterator::next);
                            let (lp, h) =
                                row_logprob_entropy(row, id as usize, inv_t, keep_grads, w);
                            out[0] = lp;
                            out[1] = h;
                        } else {
                            out[0] = row_logprob(row, id as usize, inv_t, keep_grads);
                        }
                    }
                });
            }
        });
        drop(weight_chunks);
        if let Some(slot) = &self.row_grads {
            let grads = frozen::cpu_times(&logits, n, &self.head)?;
            let grads = Tensor::from_vec(grads, (n, d), &candle_core::Device::Cpu)?;
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(grads);
        }
        if let Some(slot) = &self.entropy_grads {
            let grads = frozen::cpu_times(&entropy_weights, n, &self.head)?;
            let grads = Tensor::from_vec(grads, (n, d), &candle_core::Device::Cpu)?;
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(grads);
        }
        if self.entropy {
            return Ok((CpuStorage::F32(out), Shape::from((n, 2))));
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
        if !self.entropy {
            return Ok((Some(row_grads.broadcast_mul(&grad.unsqueeze(1)?)?), None));
        }
        let mut total = row_grads.broadcast_mul(&grad.narrow(1, 0, 1)?)?;
        if let Some(slot) = &self.entropy_grads {
            if let Some(e) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                total = (total + e.broadcast_mul(&grad.narrow(1, 1, 1)?)?)?;
            }
        }
        Ok((Some(total), None))
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

/// [`row_logprob`] and the entropy `H = −Σ p log p` of `softmax(row / T)`; with
/// `entropy_weights` that slice receives `−p (log p + H) / T`, the entropy's gradient with
/// respect to the logits.
fn row_logprob_entropy(
    row: &mut [f32],
    target: usize,
    inv_t: f32,
    into_weights: bool,
    entropy_weights: Option<&mut [f32]>,
) -> (f32, f32) {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) * inv_t;
    let log_z = max + super::exp::exp_sum(row, inv_t, max).ln() as f32;
    let logprob = row[target] * inv_t - log_z;
    let raw = row.to_vec();
    // row ← −p / T
    super::exp::exp_in_place(row, inv_t, log_z, -inv_t);
    // H = log Z − Σ p · z / T = log Z + Σ (−p / T) · z
    let dot: f64 = row.iter().zip(&raw).map(|(w, z)| (w * z) as f64).sum();
    let entropy = log_z + dot as f32;
    if let Some(weights) = entropy_weights {
        // −p / T · (log p + H), log p = z / T − log Z
        for ((w, r), z) in weights.iter_mut().zip(row.iter()).zip(&raw) {
            *w = r * (z * inv_t - log_z + entropy);
        }
    }
    if into_weights {
        row[target] += inv_t;
    }
    (logprob, entropy)
}

/// Logits `[n, vocab]` in f32 for `hidden: [n, d]`.
pub fn logits_of(hidden: &Tensor, head: &FrozenWeight, softcap: Option<f64>) -> Result<Tensor> {
    let logits = frozen::matmul_t(hidden, head)?.to_dtype(DType::F32)?;
    soft_capped(logits, softcap)
}

/// [`logits_of`] into `out` (`[n, vocab]` row by row), its values replaced: without a soft
/// cap, for f32 rows on the CPU the product writes straight into `out`'s allocation, so a
/// decoding step reuses the last step's buffer (16 rows of Gemma's logits are 16 MiB) instead
/// of zeroing and faulting in a new one and copying it out of a tensor.
pub fn logits_into(
    hidden: &Tensor,
    head: &FrozenWeight,
    softcap: Option<f64>,
    out: &mut Vec<f32>,
) -> Result<()> {
    let direct = softcap.is_none()
        && hidden.device().is_cpu()
        && head.device().is_cpu()
        && hidden.dtype() == DType::F32
        && head.dtype() == DType::F32;
    if direct {
        let (n, _) = hidden.dims2()?;
        let hidden = hidden.contiguous()?;
        let (storage, layout) = hidden.storage_and_layout();
        if let (candle_core::Storage::Cpu(CpuStorage::F32(xs)), Some((start, end))) =
            (&*storage, layout.contiguous_offsets())
        {
            return frozen::cpu_times_t_into(&xs[start..end], n, head, out);
        }
    }
    let logits = logits_of(hidden, head, softcap)?.flatten_all()?;
    out.clear();
    out.extend_from_slice(&logits.to_vec1::<f32>()?);
    Ok(())
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

    /// `[shape]` f32 values of mean 0 and variance 1 (uniform on `[-√3, √3)`) from a fixed
    /// seed, so that every run checks the same numbers.
    fn random(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let half_width = 3f32.sqrt();
        let values: Vec<f32> = (0..n)
            .map(|_| rng.random_range(-half_width..half_width))
            .collect();
        Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn the_fused_chunk_equals_the_composite_in_value_and_gradient() {
        let device = Device::Cpu;
        let head = FrozenWeight::from(random(&[50, 8], 1));
        let h = Var::from_tensor(&random(&[7, 8], 2)).unwrap();
        let targets = Tensor::new(&[3u32, 0, 49, 7, 7, 12, 30], &device).unwrap();
        let weights = random(&[7], 3);
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

    #[test]
    fn entropies_equal_the_softmax_definition_in_value_and_gradient() {
        let device = Device::Cpu;
        let head = FrozenWeight::from(random(&[50, 8], 4));
        let h = Var::from_tensor(&random(&[7, 8], 5)).unwrap();
        let targets = Tensor::new(&[3u32, 0, 49, 7, 7, 12, 30], &device).unwrap();
        let weights = random(&[7], 6);
        let max = |t: Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        // the definition, through candle's own autograd
        let w = head.to_tensor().unwrap();
        let logits = (h.as_tensor().matmul(&w.t().unwrap()).unwrap() / 0.7).unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, 1).unwrap();
        let direct = (logp.exp().unwrap() * &logp)
            .unwrap()
            .sum(1)
            .unwrap()
            .neg()
            .unwrap();
        let g_direct = (&direct * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        // fused (CPU f32) and composite (a soft cap too large to change anything)
        for cap in [None, Some(1e9)] {
            let (lp, entropy) =
                gather_logprobs_entropy(h.as_tensor(), &head, &targets, cap, 0.7, true).unwrap();
            let plain = gather_logprobs(h.as_tensor(), &head, &targets, cap, 0.7).unwrap();
            assert!(max((&lp - &plain).unwrap()) < 1e-6);
            // `log Z − Σ p z` in f32 loses about 1e-5 where the scaled logits reach ±15, so
            // the bound leaves room for rounding, not for a wrong formula
            let diff = max((&entropy - &direct).unwrap());
            assert!(diff < 5e-5, "{cap:?}: entropy differs by {diff}");
            let g = (entropy * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let diff = max((g.get(&h).unwrap() - g_direct.get(&h).unwrap()).unwrap());
            assert!(diff < 1e-4, "{cap:?}: entropy gradient differs by {diff}");
            // detached when its gradient is not asked for
            let (_, entropy) =
                gather_logprobs_entropy(h.as_tensor(), &head, &targets, cap, 0.7, false).unwrap();
            assert!(!entropy.track_op());
        }
    }
}
