//! Gemma 3 (text), written for training as well as inference, after Hugging Face
//! transformers' `modeling_gemma3.py`: scaled embeddings (`√hidden`), `(1 + w)` RMSNorm
//! (folded into the weights at load), q/k norms, attention scaled by
//! `query_pre_attn_scalar^-½`, per-layer-type RoPE (local base for sliding layers, linear
//! scaling on global ones), sliding windows as Hugging Face applies them, four norms per
//! block, GELU-tanh MLP, tied head.

use candle_core::{Device, Result, Tensor};
use serde_json::Value;

use super::attention::{apply_rope, rms_norm, KeyValues, KvCache, Padded, Rope};
use super::config::{self, ConfigError};
use super::frozen::FrozenWeight;
use super::linear::{block_linears, Linear};
use super::weights::Weights;
use super::Input;

/// The Gemma 3 text configuration (the keys of its `config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Vocabulary size (262,144 for the released models).
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Attention scores are scaled by `query_pre_attn_scalar^-½`.
    pub query_pre_attn_scalar: f64,
    /// Keys a sliding layer sees, the query's own included.
    pub sliding_window: usize,
    /// Per layer: true for sliding attention, false for full attention.
    pub sliding: Vec<bool>,
    /// RoPE base of full-attention layers.
    pub rope_theta: f64,
    /// Linear RoPE scaling factor of full-attention layers (1 when none).
    pub rope_linear_factor: f64,
    /// RoPE base of sliding layers.
    pub rope_local_base_freq: f64,
    /// Linear RoPE scaling factor of sliding layers (1 when none).
    pub rope_local_linear_factor: f64,
    /// `tanh` soft cap of attention scores, when set.
    pub attn_logit_softcapping: Option<f64>,
    /// `tanh` soft cap of the logits, when set.
    pub final_logit_softcapping: Option<f64>,
}

impl Config {
    /// Reads a Gemma 3 `config.json` (top level or nested under `text_config`), accepting
    /// both the `rope_scaling` / `rope_local_base_freq` keys and the per-layer-type
    /// `rope_parameters` map, and `layer_types` or `sliding_window_pattern`.
    pub fn from_json(json: &Value) -> std::result::Result<Self, ConfigError> {
        let c = config::text_config(json);
        let layers = config::usize_key(c, "num_hidden_layers")?;
        let heads = config::usize_key(c, "num_attention_heads")?;
        let hidden = config::usize_key(c, "hidden_size")?;
        let head_dim = config::usize_or(c, "head_dim", hidden / heads)?;
        let sliding = match c.get("layer_types").and_then(Value::as_array) {
            Some(types) => types
                .iter()
                .map(|t| t.as_str() == Some("sliding_attention"))
                .collect(),
            None => {
                let pattern = config::usize_or(c, "sliding_window_pattern", 6)?;
                (0..layers).map(|i| (i + 1) % pattern != 0).collect()
            }
        };
        let (rope_theta, rope_linear_factor) = config::rope_of(c, "full_attention", 1_000_000.0)?;
        let (local_theta, rope_local_linear_factor) =
            config::rope_of(c, "sliding_attention", 10_000.0)?;
        let rope_local_base_freq = config::f64_or(c, "rope_local_base_freq", local_theta)?;
        Ok(Config {
            vocab_size: config::usize_key(c, "vocab_size")?,
            hidden_size: hidden,
            intermediate_size: config::usize_key(c, "intermediate_size")?,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: config::usize_or(c, "num_key_value_heads", heads)?,
            head_dim,
            rms_norm_eps: config::f64_or(c, "rms_norm_eps", 1e-6)?,
            query_pre_attn_scalar: config::f64_or(c, "query_pre_attn_scalar", head_dim as f64)?,
            sliding_window: config::usize_or(c, "sliding_window", 4096)?,
            sliding,
            rope_theta,
            rope_linear_factor,
            rope_local_base_freq,
            rope_local_linear_factor,
            attn_logit_softcapping: config::opt_f64(c, "attn_logit_softcapping"),
            final_logit_softcapping: config::opt_f64(c, "final_logit_softcapping"),
        })
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: Tensor,
    k_norm: Tensor,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    softcap: Option<f64>,
    eps: f64,
}

impl Attention {
    fn new(cfg: &Config, w: &Weights, p: &str) -> Result<Self> {
        let (d, q, kv) = (
            cfg.hidden_size,
            cfg.num_attention_heads * cfg.head_dim,
            cfg.num_key_value_heads * cfg.head_dim,
        );
        Ok(Attention {
            q_proj: w.linear(&format!("{p}.q_proj"), false, [q, d])?,
            k_proj: w.linear(&format!("{p}.k_proj"), false, [kv, d])?,
            v_proj: w.linear(&format!("{p}.v_proj"), false, [kv, d])?,
            o_proj: w.linear(&format!("{p}.o_proj"), false, [d, q])?,
            q_norm: w.gemma_norm(&format!("{p}.q_norm.weight"))?,
            k_norm: w.gemma_norm(&format!("{p}.k_norm.weight"))?,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            scale: cfg.query_pre_attn_scalar.powf(-0.5),
            softcap: cfg.attn_logit_softcapping,
            eps: cfg.rms_norm_eps,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        (cos, sin): (&Tensor, &Tensor),
        (kv, layer, window): (&mut dyn KeyValues, usize, Option<usize>),
        adapters_on: bool,
    ) -> Result<Tensor> {
        // x: [b, s, d]; q: [b, h, s, hd]; k, v: [b, kv, s, hd]
        let (b, s, _) = x.dims3()?;
        let heads = |y: Tensor, n: usize| y.reshape((b, s, n, self.head_dim));
        // the q/k norms act on each head's vector, before the heads move to dim 1
        let q = heads(self.q_proj.forward(x, adapters_on)?, self.heads)?;
        let k = heads(self.k_proj.forward(x, adapters_on)?, self.kv_heads)?;
        let v = heads(self.v_proj.forward(x, adapters_on)?, self.kv_heads)?.transpose(1, 2)?;
        let q = rms_norm(&q, &self.q_norm, self.eps)?.transpose(1, 2)?;
        let k = rms_norm(&k, &self.k_norm, self.eps)?.transpose(1, 2)?;
        let q = apply_rope(&q, cos, sin)?;
        let k = apply_rope(&k, cos, sin)?;
        let out = kv.attend(layer, &q, &k, &v, window, self.scale, self.softcap)?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, s, self.heads * self.head_dim))?;
        self.o_proj.forward(&out, adapters_on)
    }
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &Config, w: &Weights, p: &str) -> Result<Self> {
        let (d, ff) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate_proj: w.linear(&format!("{p}.gate_proj"), false, [ff, d])?,
            up_proj: w.linear(&format!("{p}.up_proj"), false, [ff, d])?,
            down_proj: w.linear(&format!("{p}.down_proj"), false, [d, ff])?,
        })
    }

    fn forward(&self, x: &Tensor, adapters_on: bool) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x, adapters_on)?;
        let up = self.up_proj.forward(x, adapters_on)?;
        let hidden = super::fused::gelu_tanh_mul(&gate, &up)?;
        self.down_proj.forward(&hidden, adapters_on)
    }
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    pre_feedforward_layernorm: Tensor,
    post_feedforward_layernorm: Tensor,
    sliding: bool,
}

/// A Gemma 3 text model.
#[derive(Debug, Clone)]
pub struct Gemma3 {
    /// Its configuration.
    pub config: Config,
    embed_tokens: FrozenWeight,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    rope_global: Rope,
    rope_local: Rope,
}

impl Gemma3 {
    /// Builds the model from Hugging Face-named weights (`model.layers.N.…`).
    pub fn new(config: Config, w: &Weights) -> Result<Self> {
        let device = w.device().clone();
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(DecoderLayer {
                self_attn: Attention::new(&config, w, &format!("{p}.self_attn"))?,
                mlp: Mlp::new(&config, w, &format!("{p}.mlp"))?,
                input_layernorm: w.gemma_norm(&format!("{p}.input_layernorm.weight"))?,
                post_attention_layernorm: w
                    .gemma_norm(&format!("{p}.post_attention_layernorm.weight"))?,
                pre_feedforward_layernorm: w
                    .gemma_norm(&format!("{p}.pre_feedforward_layernorm.weight"))?,
                post_feedforward_layernorm: w
                    .gemma_norm(&format!("{p}.post_feedforward_layernorm.weight"))?,
                sliding: config.sliding.get(i).copied().unwrap_or(false),
            });
        }
        let global_factor = config.rope_linear_factor;
        let local_factor = config.rope_local_linear_factor;
        Ok(Gemma3 {
            embed_tokens: w.frozen("model.embed_tokens.weight")?,
            norm: w.gemma_norm("model.norm.weight")?,
            rope_global: Rope::new(
                config.rope_theta,
                config.head_dim,
                &|f| f / global_factor,
                &device,
            )?,
            rope_local: Rope::new(
                config.rope_local_base_freq,
                config.head_dim,
                &|f| f / local_factor,
                &device,
            )?,
            layers,
            config,
        })
    }

    /// The final hidden states `[b, s, hidden]` (after the last norm) for `input`,
    /// appending to `cache` when given.
    pub fn forward(
        &self,
        input: &Input,
        cache: Option<&mut KvCache>,
        adapters_on: bool,
    ) -> Result<Tensor> {
        let mut kv = Padded::new(input, cache, Some(self.config.sliding_window))?;
        self.forward_with(&input.ids, &input.positions, &mut kv, adapters_on)
    }

    /// The final hidden states `[b, s, hidden]` for tokens `ids: [b, s]` at `positions`,
    /// attention reading and writing its keys and values through `kv`.
    pub fn forward_with(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        kv: &mut dyn KeyValues,
        adapters_on: bool,
    ) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let device = ids.device();
        let hidden = self
            .embed_tokens
            .rows(ids)?
            .reshape((b, s, self.config.hidden_size))?;
        // transformers rounds the scale to the activations' dtype
        let normalizer = Tensor::new((self.config.hidden_size as f32).sqrt(), device)?
            .to_dtype(hidden.dtype())?;
        let mut x = hidden.broadcast_mul(&normalizer)?;
        let global = self.rope_global.cos_sin(positions)?;
        let local = self.rope_local.cos_sin(positions)?;
        let eps = self.config.rms_norm_eps;
        for (i, layer) in self.layers.iter().enumerate() {
            let (rope, window) = if layer.sliding {
                ((&local.0, &local.1), Some(self.config.sliding_window))
            } else {
                ((&global.0, &global.1), None)
            };
            let h = rms_norm(&x, &layer.input_layernorm, eps)?;
            let h = layer
                .self_attn
                .forward(&h, rope, (&mut *kv, i, window), adapters_on)?;
            x = (x + rms_norm(&h, &layer.post_attention_layernorm, eps)?)?;
            let h = rms_norm(&x, &layer.pre_feedforward_layernorm, eps)?;
            let h = layer.mlp.forward(&h, adapters_on)?;
            x = (x + rms_norm(&h, &layer.post_feedforward_layernorm, eps)?)?;
        }
        rms_norm(&x, &self.norm, eps)
    }

    /// The output projection `[vocab, hidden]` (tied to the embeddings).
    pub fn lm_head(&self) -> &FrozenWeight {
        &self.embed_tokens
    }

    /// Every linear layer with its Hugging Face module name, for attaching adapters.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let (a, m) = (&mut layer.self_attn, &mut layer.mlp);
            out.extend(block_linears(
                &format!("model.layers.{i}"),
                [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj],
                [&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj],
            ));
        }
        out
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embed_tokens.device()
    }

    /// Every weight under its Hugging Face name as `save_pretrained` writes it: adapters
    /// merged into the linear layers, norms as `w` (the forward pass scales by `1 + w`), no
    /// `lm_head` (tied to the embeddings).
    pub fn hf_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let norm =
            |name: String, scale: &Tensor| Ok::<_, candle_core::Error>((name, (scale - 1.0)?));
        let mut out = vec![
            (
                "model.embed_tokens.weight".to_string(),
                self.embed_tokens.to_tensor()?,
            ),
            norm("model.norm.weight".into(), &self.norm)?,
        ];
        for (i, layer) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let (a, m) = (&layer.self_attn, &layer.mlp);
            for (name, linear) in [
                ("self_attn.q_proj", &a.q_proj),
                ("self_attn.k_proj", &a.k_proj),
                ("self_attn.v_proj", &a.v_proj),
                ("self_attn.o_proj", &a.o_proj),
                ("mlp.gate_proj", &m.gate_proj),
                ("mlp.up_proj", &m.up_proj),
                ("mlp.down_proj", &m.down_proj),
            ] {
                out.extend(linear.hf_tensors(&format!("{p}.{name}"))?);
            }
            for (name, scale) in [
                ("self_attn.q_norm", &a.q_norm),
                ("self_attn.k_norm", &a.k_norm),
                ("input_layernorm", &layer.input_layernorm),
                ("post_attention_layernorm", &layer.post_attention_layernorm),
                (
                    "pre_feedforward_layernorm",
                    &layer.pre_feedforward_layernorm,
                ),
                (
                    "post_feedforward_layernorm",
                    &layer.post_feedforward_layernorm,
                ),
            ] {
                out.push(norm(format!("{p}.{name}.weight"), scale)?);
            }
        }
        Ok(out)
    }
}
