//! Pieces every architecture shares: rotary position embedding, grouped-query attention
//! (over a padded batch, with the causal and sliding-window masks of [`super::padded`]),
//! and the KV cache the caller owns.
//! All of it is built from differentiable candle ops, so gradients reach the adapters.

use candle_core::{DType, Device, Result, Tensor, D};

use super::padded::mask;

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

/// Scaled dot-product attention with an additive mask (none: every key visible), softmax
/// in f32, grouped-query: `q: [b, h, s, hd]`, `k, v: [b, kv, t, hd]` with `h` a multiple of
/// `kv` (query head `i` uses key/value head `i / (h / kv)`), `mask: [b, 1, s, t]` →
/// `[b, h, s, hd]`. The query heads of one key/value head are stacked into one matrix
/// instead of copying the keys and values once per query head. Keys and values may be
/// views whose rows are a stride apart (a slot's first `t` rows of a longer buffer).
pub fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
    softcap: Option<f64>,
) -> Result<Tensor> {
    let (b, h, s, hd) = q.dims4()?;
    let (kv, t) = (k.dim(1)?, k.dim(2)?);
    // [b, h, s, hd] → [b, kv, groups · s, hd]: heads of a group are adjacent
    let q = q.contiguous()?.reshape((b, kv, (h / kv) * s, hd))?;
    let scores = q
        .matmul(&rows_packed(k)?.t()?)?
        .reshape((b, h, s, t))?
        .to_dtype(DType::F32)?;
    let probs = match (softcap, mask) {
        (None, Some(mask)) => super::fused::masked_softmax(&scores, mask, scale)?,
        (None, None) => candle_nn::ops::softmax_last_dim(&(scores * scale)?)?,
        (Some(cap), mask) => {
            let scores = (((scores * scale)? / cap)?.tanh()? * cap)?;
            let scores = match mask {
                Some(mask) => scores.broadcast_add(mask)?,
                None => scores,
            };
            candle_nn::ops::softmax(&scores, D::Minus1)?
        }
    };
    probs
        .to_dtype(v.dtype())?
        .reshape((b, kv, (h / kv) * s, t))?
        .matmul(&rows_packed(v)?)?
        .reshape((b, h, s, hd))
}

/// `x: [b, kv, t, hd]` as it is where a matmul can read it in place (each row packed, the
/// heads of one batch row a constant stride apart), else a packed copy.
fn rows_packed(x: &Tensor) -> Result<Tensor> {
    let hd = x.dim(3)?;
    let stride = x.stride();
    let in_place = x.dim(0)? == 1 && stride[3] == 1 && stride[2] == hd;
    if in_place {
        Ok(x.clone())
    } else {
        x.contiguous()
    }
}

/// Where a forward pass's attention finds the keys and values it attends to: its own, a
/// [`KvCache`] of a padded batch, or the slots of [`super::batching::SlotCache`].
pub trait KeyValues {
    /// The attention output `[b, h, s, hd]` of layer `layer` for this pass's
    /// `q: [b, h, s, hd]` and `k, v: [b, kv, s, hd]` (rotated), over these keys and any
    /// kept before; a query sees only the `window` most recent keys of a sliding layer.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        window: Option<usize>,
        scale: f64,
        softcap: Option<f64>,
    ) -> Result<Tensor>;
}

/// Attention over a padded batch ([`super::Input::key_valid`]'s masks), appending
/// to a [`KvCache`] when one is given.
pub struct Padded<'a> {
    full: Tensor,
    windowed: Option<Tensor>,
    cache: Option<&'a mut KvCache>,
}

impl<'a> Padded<'a> {
    /// The masks of `input`'s queries after `cache`'s keys; `window`: the sliding layers'.
    pub fn new(
        input: &super::Input,
        cache: Option<&'a mut KvCache>,
        window: Option<usize>,
    ) -> Result<Self> {
        let s = input.ids.dim(1)?;
        let device = input.ids.device();
        let offset = cache.as_ref().map_or(0, |c| c.len());
        Ok(Padded {
            full: mask(&input.key_valid, offset, s, None, device)?,
            windowed: window
                .map(|w| mask(&input.key_valid, offset, s, Some(w), device))
                .transpose()?,
            cache,
        })
    }
}

impl KeyValues for Padded<'_> {
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        window: Option<usize>,
        scale: f64,
        softcap: Option<f64>,
    ) -> Result<Tensor> {
        let (k, v) = match self.cache.as_deref_mut() {
            Some(cache) => cache.append(layer, k, v)?,
            None => (k.clone(), v.clone()),
        };
        let mask = match (window, &self.windowed) {
            (Some(_), Some(windowed)) => windowed,
            _ => &self.full,
        };
        attend(q, &k, &v, Some(mask), scale, softcap)
    }
}

/// The keys and values seen so far in a padded batch, one entry per layer, kept in the graph
/// that computed them so that a loss on later tokens reaches the adapters through the
/// cached ones too: a prompt run once for the group of completions that follow it in
/// training. (Generation keeps its keys in [`super::batching::SlotCache`].)
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        KvCache {
            layers: vec![None; layers],
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

    /// Appends this step's keys and values of `layer` and returns all of them.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match &self.layers[layer] {
            Some((pk, pv)) => (Tensor::cat(&[pk, k], 2)?, Tensor::cat(&[pv, v], 2)?),
            None => (k.clone(), v.clone()),
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
