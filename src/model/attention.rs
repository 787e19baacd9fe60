//! Pieces every architecture shares: rotary position embedding, causal (and sliding-window)
//! masks over a padded batch, grouped-query attention, and the KV cache the caller owns.
//! All of it is built from differentiable candle ops, so gradients reach the adapters.

use candle_core::{DType, Device, Result, Tensor, D};

/// Rotary position embedding of one layer type: inverse frequencies, already divided by a
/// linear scaling factor where the config asks for one.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Tensor,
}

impl Rope {
    /// `theta` base, `head_dim` width; `scaling` divides the frequencies (linear RoPE scaling).
    pub fn new(
        theta: f64,
        head_dim: usize,
        inv_freq_scale: &dyn Fn(f64) -> f64,
        device: &Device,
    ) -> Result<Self> {
        let inv_freq: Vec<f32> = (0..head_dim)
            .step_by(2)
            .map(|i| inv_freq_scale(1.0 / theta.powf(i as f64 / head_dim as f64)) as f32)
            .collect();
        let n = inv_freq.len();
        Ok(Rope {
            inv_freq: Tensor::from_vec(inv_freq, (1, 1, n), device)?,
        })
    }

    /// `(cos, sin)` for `positions: [b, s]`, each `[b, 1, s, head_dim]`.
    pub fn cos_sin(&self, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let pos = positions.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?; // [b, s, 1]
        let freqs = pos.broadcast_mul(&self.inv_freq)?; // [b, s, hd/2]
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?;
        Ok((emb.cos()?, emb.sin()?))
    }
}

/// `x · cos + rotate_half(x) · sin` for `x: [b, h, s, hd]` (the halves layout of Hugging Face).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    super::fused::rotary_embedding(x, cos, sin)
}

/// Additive attention mask `[b, 1, q, k]` (0, or the lowest f32 where hidden: finite, as
/// in transformers, so a padding query that sees no key yields numbers rather than NaN,
/// which would reach real tokens through the values) for queries at key slots
/// `offset .. offset + q` over `key_valid: [b][k]` (false at padding): a query sees valid
/// keys at or before its slot, and with `window`, only the `window` most recent ones
/// (`query - key < window`, as Hugging Face's sliding attention).
pub fn mask(
    key_valid: &[Vec<bool>],
    offset: usize,
    queries: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let batch = key_valid.len();
    let keys = key_valid.first().map_or(0, Vec::len);
    let mut values = Vec::with_capacity(batch * queries * keys);
    for valid in key_valid {
        for q in 0..queries {
            let slot = offset + q;
            for (k, &ok) in valid.iter().enumerate() {
                let visible = ok && k <= slot && window.is_none_or(|w| slot - k < w);
                values.push(if visible { 0f32 } else { f32::MIN });
            }
        }
    }
    Tensor::from_vec(values, (batch, 1, queries, keys), device)
}

/// Scaled dot-product attention with an additive mask, softmax in f32, grouped-query:
/// `q: [b, h, s, hd]`, `k, v: [b, kv, t, hd]` with `h` a multiple of `kv` (query head `i`
/// uses key/value head `i / (h / kv)`), `mask: [b, 1, s, t]` → `[b, h, s, hd]`. The query
/// heads of one key/value head are stacked into one matrix instead of copying the keys and
/// values once per query head.
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (b, h, s, hd) = q.dims4()?;
    let (kv, t) = (k.dim(1)?, k.dim(2)?);
    // [b, h, s, hd] → [b, kv, groups · s, hd]: heads of a group are adjacent
    let q = q.contiguous()?.reshape((b, kv, (h / kv) * s, hd))?;
    let scores = q
        .matmul(&k.contiguous()?.t()?)?
        .reshape((b, h, s, t))?
        .to_dtype(DType::F32)?;
    let probs = match softcap {
        None => super::fused::masked_softmax(&scores, mask, scale)?,
        Some(cap) => {
            let scores = (((scores * scale)? / cap)?.tanh()? * cap)?;
            candle_nn::ops::softmax(&scores.broadcast_add(mask)?, D::Minus1)?
        }
    };
    probs
        .to_dtype(v.dtype())?
        .reshape((b, kv, (h / kv) * s, t))?
        .matmul(&v.contiguous()?)?
        .reshape((b, h, s, hd))
}

/// The keys and values seen so far, one entry per layer; owned by the caller, so a batch of
/// sequences can be generated (or several batches interleaved) without touching the model.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Whether keys and values keep the graph that computed them (see [`KvCache::tracked`]).
    tracked: bool,
}

impl KvCache {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        KvCache {
            layers: vec![None; layers],
            tracked: false,
        }
    }

    /// An empty cache whose keys and values stay in the graph, so that a loss on later
    /// tokens reaches the adapters through the cached ones too: a prompt run once for the
    /// group of completions that follow it in training.
    pub fn tracked(layers: usize) -> Self {
        KvCache {
            layers: vec![None; layers],
            tracked: true,
        }
    }

    /// The number of key slots cached.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dims()[2])
    }

    /// True before the first forward.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends this step's keys and values of `layer` and returns all of them. Unless
    /// [`KvCache::tracked`], the cache keeps values only, detached from the graph that
    /// computed them: with adapters on, that graph would otherwise chain every decoding
    /// step's activations to the next and hold them all until generation ends.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = if self.tracked {
            (k.clone(), v.clone())
        } else {
            (k.detach(), v.detach())
        };
        let (k, v) = match &self.layers[layer] {
            Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
            None => (k, v),
        };
        self.layers[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    /// Keeps only the sequences at `rows` of the batch (finished ones dropped).
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        // the prefill's keys and values may be strided views; index_select needs them packed
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.contiguous()?.index_select(rows, 0)?;
            *v = v.contiguous()?.index_select(rows, 0)?;
        }
        Ok(())
    }
}

/// RMS normalisation over the last dimension in f32: `x / sqrt(mean(x²) + eps) · scale`.
/// Gemma's `(1 + w)` is folded into `scale` at load time.
pub fn rms_norm(x: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    super::fused::rms_norm(x, scale, eps)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_keeps_values_without_their_graph() {
        let device = Device::Cpu;
        let w = candle_core::Var::ones((1, 1, 2, 3), DType::F32, &device).unwrap();
        let k = (w.as_tensor() * 2.0).unwrap();
        let mut cache = KvCache::new(1);
        cache.append(0, &k, &k).unwrap();
        let (all_k, _) = cache.append(0, &k, &k).unwrap();
        assert_eq!(all_k.dims(), &[1, 1, 4, 3]);
        let grads = all_k.sum_all().unwrap().backward().unwrap();
        assert!(
            grads.get(w.as_tensor()).is_none(),
            "cached keys must not chain back to the adapters"
        );
    }
}
