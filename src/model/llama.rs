//! The Llama family (Llama 3, Qwen2 / 2.5, SmolLM2), written for training as well as
//! inference, after Hugging Face transformers' `modeling_llama.py` and `modeling_qwen2.py`:
//! RMSNorm, grouped-query attention with RoPE (default, linear or Llama-3 scaling),
//! q/k/v biases for Qwen2, SiLU-gated MLP, tied or separate head.

use candle_core::{Device, Result, Tensor};
use serde_json::Value;

use super::attention::{apply_rope, rms_norm, KeyValues, KvCache, Padded, Rope};
use super::config::{self, ConfigError};
use super::frozen::FrozenWeight;
use super::linear::{block_linears, Linear};
use super::weights::Weights;
use super::Input;

/// How RoPE frequencies are scaled.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Unscaled.
    None,
    /// Every frequency divided by `factor`.
    Linear(f64),
    /// Llama 3.1's wavelength-dependent scaling.
    Llama3 {
        /// Scaling of low frequencies.
        factor: f64,
        /// Wavelength bound (as a fraction of the original context) below which scaling is full.
        low_freq_factor: f64,
        /// Wavelength bound above which frequencies stay unscaled.
        high_freq_factor: f64,
        /// The context length the model was trained at.
        original_max_position_embeddings: f64,
    },
}

impl RopeScaling {
    /// The scaled inverse frequency.
    pub fn apply(&self, inv_freq: f64) -> f64 {
        match *self {
            RopeScaling::None => inv_freq,
            RopeScaling::Linear(factor) => inv_freq / factor,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: original,
            } => {
                let wavelen = 2.0 * std::f64::consts::PI / inv_freq;
                let low_freq_wavelen = original / low_freq_factor;
                let high_freq_wavelen = original / high_freq_factor;
                if wavelen < high_freq_wavelen {
                    inv_freq
                } else if wavelen > low_freq_wavelen {
                    inv_freq / factor
                } else {
                    let smooth = (original / wavelen - low_freq_factor)
                        / (high_freq_factor - low_freq_factor);
                    (1.0 - smooth) * inv_freq / factor + smooth * inv_freq
                }
            }
        }
    }
}

/// A Llama-family configuration (the keys of its `config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Vocabulary size.
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
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// Biases on q, k and v (Qwen2, or `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (`attention_bias`).
    pub o_bias: bool,
    /// Biases in the MLP (`mlp_bias`).
    pub mlp_bias: bool,
    /// The head shares the embedding matrix.
    pub tie_word_embeddings: bool,
}

impl Config {
    /// Reads a Llama / Qwen2 / SmolLM2 `config.json`.
    pub fn from_json(json: &Value) -> std::result::Result<Self, ConfigError> {
        let c = config::text_config(json);
        let heads = config::usize_key(c, "num_attention_heads")?;
        let hidden = config::usize_key(c, "hidden_size")?;
        let qwen2 = c.get("model_type").and_then(Value::as_str) == Some("qwen2");
        let attention_bias = c
            .get("attention_bias")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let (rope_theta, _) = config::rope_of(c, "full_attention", 10_000.0)?;
        Ok(Config {
            vocab_size: config::usize_key(c, "vocab_size")?,
            hidden_size: hidden,
            intermediate_size: config::usize_key(c, "intermediate_size")?,
            num_hidden_layers: config::usize_key(c, "num_hidden_layers")?,
            num_attention_heads: heads,
            num_key_value_heads: config::usize_or(c, "num_key_value_heads", heads)?,
            head_dim: config::usize_or(c, "head_dim", hidden / heads)?,
            rms_norm_eps: config::f64_or(c, "rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling: rope_scaling(c),
            qkv_bias: qwen2 || attention_bias,
            o_bias: attention_bias,
            mlp_bias: c.get("mlp_bias").and_then(Value::as_bool).unwrap_or(false),
            tie_word_embeddings: c
                .get("tie_word_embeddings")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }
}

fn rope_scaling(c: &Value) -> RopeScaling {
    let section = c
        .get("rope_parameters")
        .filter(|p| p.is_object())
        .or_else(|| c.get("rope_scaling").filter(|p| p.is_object()));
    let Some(s) = section else {
        return RopeScaling::None;
    };
    let num = |k: &str, d: f64| s.get(k).and_then(Value::as_f64).unwrap_or(d);
    match s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
    {
        Some("linear") => RopeScaling::Linear(num("factor", 1.0)),
        Some("llama3") => RopeScaling::Llama3 {
            factor: num("factor", 8.0),
            low_freq_factor: num("low_freq_factor", 1.0),
            high_freq_factor: num("high_freq_factor", 4.0),
            original_max_position_embeddings: num("original_max_position_embeddings", 8192.0),
        },
        _ => RopeScaling::None,
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
}

/// A Llama-family model.
#[derive(Debug, Clone)]
pub struct Llama {
    /// Its configuration.
    pub config: Config,
    embed_tokens: FrozenWeight,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: FrozenWeight,
    rope: Rope,
}

impl Llama {
    /// Builds the model from Hugging Face-named weights.
    pub fn new(config: Config, w: &Weights) -> Result<Self> {
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let a = format!("{p}.self_attn");
            let m = format!("{p}.mlp");
            let (d, q, kv) = (
                config.hidden_size,
                config.num_attention_heads * config.head_dim,
                config.num_key_value_heads * config.head_dim,
            );
            let ff = config.intermediate_size;
            layers.push(DecoderLayer {
                self_attn: Attention {
                    q_proj: w.linear(&format!("{a}.q_proj"), config.qkv_bias, [q, d])?,
                    k_proj: w.linear(&format!("{a}.k_proj"), config.qkv_bias, [kv, d])?,
                    v_proj: w.linear(&format!("{a}.v_proj"), config.qkv_bias, [kv, d])?,
                    o_proj: w.linear(&format!("{a}.o_proj"), config.o_bias, [d, q])?,
                    heads: config.num_attention_heads,
                    kv_heads: config.num_key_value_heads,
                    head_dim: config.head_dim,
                },
                mlp: Mlp {
                    gate_proj: w.linear(&format!("{m}.gate_proj"), config.mlp_bias, [ff, d])?,
                    up_proj: w.linear(&format!("{m}.up_proj"), config.mlp_bias, [ff, d])?,
                    down_proj: w.linear(&format!("{m}.down_proj"), config.mlp_bias, [d, ff])?,
                },
                input_layernorm: w.norm(&format!("{p}.input_layernorm.weight"))?,
                post_attention_layernorm: w
                    .norm(&format!("{p}.post_attention_layernorm.weight"))?,
            });
        }
        let embed_tokens = w.frozen("model.embed_tokens.weight")?;
        let lm_head = if config.tie_word_embeddings || !w.contains("lm_head.weight") {
            embed_tokens.clone()
        } else {
            w.frozen("lm_head.weight")?
        };
        let scaling = config.rope_scaling.clone();
        Ok(Llama {
            rope: Rope::new(
                config.rope_theta,
                config.head_dim,
                &|f| scaling.apply(f),
                w.device(),
            )?,
            embed_tokens,
            norm: w.norm("model.norm.weight")?,
            lm_head,
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
        let mut kv = Padded::new(input, cache, None)?;
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
        let mut x = self
            .embed_tokens
            .rows(ids)?
            .reshape((b, s, self.config.hidden_size))?;
        let (cos, sin) = self.rope.cos_sin(positions)?;
        let eps = self.config.rms_norm_eps;
        for (i, layer) in self.layers.iter().enumerate() {
            // q: [b, h, s, hd]; k, v: [b, kv, s, hd]
            let h = rms_norm(&x, &layer.input_layernorm, eps)?;
            let a = &layer.self_attn;
            let split =
                |y: Tensor, heads: usize| y.reshape((b, s, heads, a.head_dim))?.transpose(1, 2);
            let q = split(a.q_proj.forward(&h, adapters_on)?, a.heads)?;
            let k = split(a.k_proj.forward(&h, adapters_on)?, a.kv_heads)?;
            let v = split(a.v_proj.forward(&h, adapters_on)?, a.kv_heads)?;
            let q = apply_rope(&q, &cos, &sin)?;
            let k = apply_rope(&k, &cos, &sin)?;
            let scale = (a.head_dim as f64).powf(-0.5);
            let out = kv.attend(i, &q, &k, &v, None, scale, None)?;
            let out = out.transpose(1, 2)?.reshape((b, s, a.heads * a.head_dim))?;
            x = (x + a.o_proj.forward(&out, adapters_on)?)?;
            let h = rms_norm(&x, &layer.post_attention_layernorm, eps)?;
            let gate = layer.mlp.gate_proj.forward(&h, adapters_on)?.silu()?;
            let up = layer.mlp.up_proj.forward(&h, adapters_on)?;
            x = (x + layer.mlp.down_proj.forward(&(gate * up)?, adapters_on)?)?;
        }
        rms_norm(&x, &self.norm, eps)
    }

    /// The output projection `[vocab, hidden]`.
    pub fn lm_head(&self) -> &FrozenWeight {
        &self.lm_head
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
    /// merged into the linear layers, `lm_head.weight` unless the head is tied.
    pub fn hf_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![
            (
                "model.embed_tokens.weight".to_string(),
                self.embed_tokens.to_tensor()?,
            ),
            ("model.norm.weight".to_string(), self.norm.clone()),
        ];
        if !self.config.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), self.lm_head.to_tensor()?));
        }
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
            out.push((
                format!("{p}.input_layernorm.weight"),
                layer.input_layernorm.clone(),
            ));
            out.push((
                format!("{p}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.clone(),
            ));
        }
        Ok(out)
    }
}
