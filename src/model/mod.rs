//! Language models written for training as well as inference: Gemma 3 and the Llama
//! family, a LoRA-capable linear layer, an explicit KV cache, chunked log-probabilities,
//! and loading from Hugging Face directories and GGUF files.

pub mod attention;
pub mod batching;
pub mod chat;
pub mod config;
pub mod cpu_matmul;
pub mod decode_attention;
pub mod exp;
pub mod export;
pub mod frozen;
pub mod fused;
pub mod gemma3;
pub mod generate;
pub mod gguf;
pub mod gguf_tokenizer;
pub mod linear;
pub mod llama;
pub mod lm;
pub mod logprob;
pub mod lora;
pub mod memory;
pub mod padded;
pub mod placement;
pub mod prefix;
pub mod quant;
pub mod team;
pub mod tokenizer;
pub mod weights;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

pub use attention::KvCache;
use linear::Linear;
pub use padded::Input;
use padded::PaddedRows;
pub use placement::Placement;
use weights::Weights;

/// A failure to load or run a model, naming the file at fault where there is one.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A file could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is present but unusable.
    #[error("{}: {message}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A tensor operation failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Result of the model layer.
pub type Result<T> = std::result::Result<T, ModelError>;

/// The architectures the project implements.
#[derive(Debug, Clone)]
pub enum Architecture {
    /// Gemma 3 text.
    Gemma3(gemma3::Gemma3),
    /// Llama 3, Qwen2 / 2.5, SmolLM2.
    Llama(llama::Llama),
}

/// A loaded model.
#[derive(Debug, Clone)]
pub struct Model {
    /// The network.
    pub arch: Architecture,
    /// Where it was loaded from.
    pub source: PathBuf,
    /// The `config.json` it was built from (for a GGUF file, the one derived from its
    /// metadata).
    pub config: Value,
    /// The name of its weights in [`prefix`]'s keys: new at load and whenever
    /// [`Model::linears_mut`] may change a layer.
    weights: u64,
}

impl Model {
    /// A model of `arch`, loaded from `source` with `config`.
    pub fn new(arch: Architecture, source: PathBuf, config: Value) -> Self {
        Model {
            arch,
            source,
            config,
            weights: prefix::fresh_weights_id(),
        }
    }

    /// The name of its weights in the prefix cache's keys (see [`prefix::Namespace`]).
    pub fn weights_id(&self) -> u64 {
        self.weights
    }

    /// Loads a model from a Hugging Face directory or a `.gguf` file (kept in blocks on the
    /// CPU, see [`gguf::load`]), in f32 on `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        Model::load_on(
            path,
            &Placement {
                device: device.clone(),
                dtype: DType::F32,
            },
        )
    }

    /// Loads a model from a Hugging Face directory or a `.gguf` file (kept in blocks on the
    /// CPU in f32, dequantized elsewhere) on
    /// `placement`'s device, its weights in `placement`'s dtype.
    pub fn load_on(path: &Path, placement: &Placement) -> Result<Self> {
        if path.is_file() && path.extension().is_some_and(|e| e == "gguf") {
            gguf::load_on(path, None, placement)
        } else {
            Model::hf_dir(path, placement)
        }
    }

    /// Loads a Hugging Face model directory: `config.json` and `model.safetensors` (or the
    /// shards listed in `model.safetensors.index.json`), in f32 on `device`.
    pub fn from_hf_dir(dir: &Path, device: &Device) -> Result<Self> {
        Model::hf_dir(
            dir,
            &Placement {
                device: device.clone(),
                dtype: DType::F32,
            },
        )
    }

    fn hf_dir(dir: &Path, placement: &Placement) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io {
            path: config_path.clone(),
            source,
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|e| ModelError::File {
            path: config_path.clone(),
            message: format!("not valid JSON: {e}"),
        })?;
        let files = safetensors_files(dir)?;
        if placement.device.is_cpu() {
            memory::check_fits(dir, memory::safetensors_parameters(&files)?)?;
        }
        let weights = Weights::from_safetensors(&files, &placement.device, placement.dtype)?;
        let arch = build(&json, &weights).map_err(|message| ModelError::File {
            path: config_path.clone(),
            message,
        })??;
        Ok(Model::new(arch, dir.to_path_buf(), json))
    }

    /// The context length its config states (`max_position_embeddings`; for a GGUF file,
    /// its `context_length`), if it states one.
    pub fn context_length(&self) -> Option<usize> {
        config::text_config(&self.config)
            .get("max_position_embeddings")
            .and_then(Value::as_u64)
            .map(|n| n as usize)
    }

    /// Final hidden states `[b, s, hidden]` for `input`, appending to `cache` when given;
    /// the adapters take part when `adapters_on`.
    pub fn forward(
        &self,
        input: &Input,
        cache: Option<&mut KvCache>,
        adapters_on: bool,
    ) -> Result<Tensor> {
        Ok(match &self.arch {
            Architecture::Gemma3(m) => m.forward(input, cache, adapters_on)?,
            Architecture::Llama(m) => m.forward(input, cache, adapters_on)?,
        })
    }

    /// Final hidden states `[b, s, hidden]` for tokens `ids: [b, s]` at `positions`, the
    /// attention's keys and values read and written through `kv` (see
    /// [`batching::SlotCache::forward`]).
    pub fn forward_with(
        &self,
        ids: &Tensor,
        positions: &Tensor,
        kv: &mut dyn attention::KeyValues,
        adapters_on: bool,
    ) -> Result<Tensor> {
        Ok(match &self.arch {
            Architecture::Gemma3(m) => m.forward_with(ids, positions, kv, adapters_on)?,
            Architecture::Llama(m) => m.forward_with(ids, positions, kv, adapters_on)?,
        })
    }

    /// The output projection `[vocab, hidden]`.
    pub fn lm_head(&self) -> &frozen::FrozenWeight {
        match &self.arch {
            Architecture::Gemma3(m) => m.lm_head(),
            Architecture::Llama(m) => m.lm_head(),
        }
    }

    /// Logits `[n, vocab]` (f32) for `hidden: [n, d]`. A few rows on the CPU (a decoding
    /// step, the last positions of a scoring batch) read each of the head's weights once,
    /// from its GGUF blocks where it is kept so (as the default model's Q8_0 head).
    pub fn head_logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(logprob::logits_of(
            hidden,
            self.lm_head(),
            self.logit_softcap(),
        )?)
    }

    /// [`Model::head_logits`] into `out` (`[n, vocab]` row by row), its values replaced and
    /// its allocation reused: a decoding step's logits go to the last step's buffer.
    pub fn head_logits_into(&self, hidden: &Tensor, out: &mut Vec<f32>) -> Result<()> {
        Ok(logprob::logits_into(
            hidden,
            self.lm_head(),
            self.logit_softcap(),
            out,
        )?)
    }

    /// The logits' soft cap, when the architecture has one.
    pub fn logit_softcap(&self) -> Option<f64> {
        match &self.arch {
            Architecture::Gemma3(m) => m.config.final_logit_softcapping,
            Architecture::Llama(_) => None,
        }
    }

    /// Decoder blocks (the length of a [`KvCache`]).
    pub fn num_layers(&self) -> usize {
        match &self.arch {
            Architecture::Gemma3(m) => m.config.num_hidden_layers,
            Architecture::Llama(m) => m.config.num_hidden_layers,
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        match &self.arch {
            Architecture::Gemma3(m) => m.device(),
            Architecture::Llama(m) => m.device(),
        }
    }

    /// Every weight under its Hugging Face name, adapters merged (see [`export`]).
    pub fn hf_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(match &self.arch {
            Architecture::Gemma3(m) => m.hf_tensors()?,
            Architecture::Llama(m) => m.hf_tensors()?,
        })
    }

    /// Every linear layer with its Hugging Face module name.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        // a layer may change: keys cached for these weights no longer apply
        self.weights = prefix::fresh_weights_id();
        match &mut self.arch {
            Architecture::Gemma3(m) => m.linears_mut(),
            Architecture::Llama(m) => m.linears_mut(),
        }
    }

    /// Logits `[b, s, vocab]` (f32) for rows of equal length. Materialises the whole block:
    /// for small vocabularies and tests; use [`Model::completion_logprobs`] for scoring.
    pub fn logits(&self, rows: &[Vec<u32>], adapters_on: bool) -> Result<Tensor> {
        let input = Input::unpadded(rows, 0, self.device())?;
        let hidden = self.forward(&input, None, adapters_on)?;
        let (b, s, d) = hidden.dims3()?;
        let logits = logprob::logits_of(
            &hidden.reshape((b * s, d))?,
            self.lm_head(),
            self.logit_softcap(),
        )?;
        Ok(logits.reshape((b, s, ()))?)
    }

    /// The logits `[vocab]` (f32) of the token after `ids`: the output head runs on the last
    /// position only.
    pub fn next_logits(&self, ids: &[u32], adapters_on: bool) -> Result<Tensor> {
        let input = Input::unpadded(&[ids.to_vec()], 0, self.device())?;
        let hidden = self.forward(&input, None, adapters_on)?.squeeze(0)?;
        let last = hidden.narrow(0, ids.len() - 1, 1)?;
        Ok(self.head_logits(&last)?.squeeze(0)?)
    }

    /// `log p(completion_t | prompt, completion_<t)` for each completion token, `[n]` f32.
    /// Differentiable with respect to the adapters.
    pub fn completion_logprobs(
        &self,
        prompt: &[u32],
        completion: &[u32],
        adapters_on: bool,
    ) -> Result<Tensor> {
        let ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
        let input = Input::unpadded(&[ids], 0, self.device())?;
        let hidden = self.forward(&input, None, adapters_on)?.squeeze(0)?;
        // the state at position t predicts token t + 1
        let scoring = hidden.narrow(0, prompt.len() - 1, completion.len())?;
        let targets = Tensor::new(completion, self.device())?;
        Ok(logprob::gather_logprobs(
            &scoring,
            self.lm_head(),
            &targets,
            self.logit_softcap(),
            1.0,
        )?)
    }

    /// Per-token log-probabilities of many (prompt, completion) pairs in one forward pass,
    /// `[b, t]` f32 with `t` the longest completion (positions past a completion's end hold
    /// 0), the logits divided by `temperature`. Prompts are left-padded and completions
    /// right-padded ([`PaddedRows`]); padding is masked out. Differentiable with respect to
    /// the adapters.
    pub fn pair_logprobs(
        &self,
        pairs: &[(&[u32], &[u32])],
        adapters_on: bool,
        temperature: f64,
    ) -> Result<Tensor> {
        Ok(self.pair_scores(pairs, adapters_on, temperature, None)?.0)
    }

    /// [`Model::pair_logprobs`] and the entropy of each position's temperature-scaled
    /// distribution, both `[b, t]` (0 past each completion's end). The entropies carry a
    /// gradient when `entropy_grad` is set and are detached otherwise.
    pub fn pair_logprobs_entropy(
        &self,
        pairs: &[(&[u32], &[u32])],
        adapters_on: bool,
        temperature: f64,
        entropy_grad: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (lp, entropy) =
            self.pair_scores(pairs, adapters_on, temperature, Some(entropy_grad))?;
        Ok((lp, entropy.expect("entropy asked for")))
    }

    /// Log-probs, and entropies when `entropy` is `Some(with_gradient)`.
    fn pair_scores(
        &self,
        pairs: &[(&[u32], &[u32])],
        adapters_on: bool,
        temperature: f64,
        entropy: Option<bool>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let device = self.device();
        let b = pairs.len();
        let c_max = pairs.iter().map(|(_, c)| c.len()).max().unwrap_or(0);
        assert!(
            pairs.iter().all(|(p, _)| !p.is_empty()),
            "every prompt needs at least one token"
        );
        let mut distinct: Vec<&[u32]> = Vec::new();
        let source: Vec<u32> = pairs
            .iter()
            .map(|(prompt, _)| {
                let at = distinct
                    .iter()
                    .position(|d| d == prompt)
                    .unwrap_or_else(|| {
                        distinct.push(prompt);
                        distinct.len() - 1
                    });
                at as u32
            })
            .collect();
        if distinct.len() < b && c_max > 0 {
            return self.shared_prompt_logprobs(
                pairs,
                &distinct,
                source,
                adapters_on,
                temperature,
                entropy,
            );
        }
        let (prompts, completions): (Vec<&[u32]>, Vec<&[u32]>) = pairs.iter().copied().unzip();
        let prompts = PaddedRows::left(&prompts);
        let p_max = prompts.width();
        let completions = PaddedRows::right_after(&completions, prompts.key_valid().to_vec());
        let input = prompts.then(completions).input(device)?;
        if c_max == 0 {
            let empty = Tensor::zeros((b, 0), candle_core::DType::F32, device)?;
            return Ok((empty.clone(), entropy.map(|_| empty)));
        }
        let hidden = self.forward(&input, None, adapters_on)?;
        let d = hidden.dim(2)?;
        // the state before completion token t sits at p_max - 1 + t
        let scoring = hidden
            .narrow(1, p_max - 1, c_max)?
            .reshape((b * c_max, d))?;
        self.completion_tokens_logprobs(&scoring, pairs, c_max, temperature, entropy)
    }

    /// [`Model::pair_logprobs`] where prompts repeat (a GRPO group): each distinct prompt
    /// runs once into a cache that keeps its graph, is copied to the rows that share it, and
    /// the completions run after it. The keys sit in the same slots as in one padded
    /// forward (left-padded prompts, then right-padded completions), so masks, windows and
    /// positions are the same; a group of four 260-token prompts with 64-token completions
    /// runs 324 positions' worth of layers where the padded forward ran 1,296.
    fn shared_prompt_logprobs(
        &self,
        pairs: &[(&[u32], &[u32])],
        distinct: &[&[u32]],
        source: Vec<u32>,
        adapters_on: bool,
        temperature: f64,
        entropy: Option<bool>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let device = self.device();
        let b = pairs.len();
        let c_max = pairs.iter().map(|(_, c)| c.len()).max().unwrap_or(0);
        let mut cache = KvCache::new(self.num_layers());
        let prompts = PaddedRows::left(distinct);
        let hidden = self.forward(&prompts.input(device)?, Some(&mut cache), adapters_on)?;
        let rows = Tensor::from_vec(source.clone(), b, device)?;
        cache.select_rows(&rows)?;
        // the prompt's last state predicts the first completion token
        let first = hidden
            .narrow(1, prompts.width() - 1, 1)?
            .contiguous()?
            .index_select(&rows, 0)?;
        let completions: Vec<&[u32]> = pairs.iter().map(|(_, c)| *c).collect();
        let cached = source
            .iter()
            .map(|&u| prompts.key_valid()[u as usize].clone())
            .collect();
        let completions = PaddedRows::right_after(&completions, cached);
        let hidden = self.forward(&completions.input(device)?, Some(&mut cache), adapters_on)?;
        let d = hidden.dim(2)?;
        let scoring =
            Tensor::cat(&[&first, &hidden.narrow(1, 0, c_max - 1)?], 1)?.reshape((b * c_max, d))?;
        self.completion_tokens_logprobs(&scoring, pairs, c_max, temperature, entropy)
    }

    /// `[b, c_max]`: the log-probability of each pair's completion tokens from `scoring:
    /// [b · c_max, d]`, the states that predict them (row `i · c_max + t` predicts token `t`
    /// of pair `i`), 0 past each completion's end; with `entropy`, the entropies too.
    fn completion_tokens_logprobs(
        &self,
        scoring: &Tensor,
        pairs: &[(&[u32], &[u32])],
        c_max: usize,
        temperature: f64,
        entropy: Option<bool>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let device = self.device();
        let b = pairs.len();
        let completions: Vec<&[u32]> = pairs.iter().map(|(_, c)| *c).collect();
        let lens: Vec<usize> = completions.iter().map(|c| c.len()).collect();
        let targets = padded::right_padded(&completions, c_max, device)?.flatten_all()?;
        let mask = padded::length_mask(&lens, c_max, device)?;
        let (logprobs, entropies) = match entropy {
            None => (
                logprob::gather_logprobs(
                    scoring,
                    self.lm_head(),
                    &targets,
                    self.logit_softcap(),
                    temperature,
                )?,
                None,
            ),
            Some(grad) => {
                let (lp, h) = logprob::gather_logprobs_entropy(
                    scoring,
                    self.lm_head(),
                    &targets,
                    self.logit_softcap(),
                    temperature,
                    grad,
                )?;
                (lp, Some(h))
            }
        };
        let logprobs = (logprobs.reshape((b, c_max))? * &mask)?;
        let entropies = match entropies {
            Some(h) => Some((h.reshape((b, c_max))? * &mask)?),
            None => None,
        };
        Ok((logprobs, entropies))
    }

    /// The `n` most likely next tokens one at a time from `prompt` (greedy decoding; no
    /// stop tokens).
    pub fn greedy(&self, prompt: &[u32], n: usize, adapters_on: bool) -> Result<Vec<u32>> {
        let request = generate::Sampling {
            max_tokens: n,
            temperature: 0.0,
            ..generate::Sampling::default()
        };
        let mut completions = generate::generate(
            self,
            &[prompt.to_vec()],
            &[request],
            adapters_on,
            None,
            &mut |_| true,
        )?;
        Ok(completions.remove(0).ids)
    }
}

/// The safetensors files of a model directory: the shards of `model.safetensors.index.json`,
/// else `model.safetensors`.
fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|source| ModelError::Io {
            path: index.clone(),
            source,
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|e| ModelError::File {
            path: index.clone(),
            message: format!("not valid JSON: {e}"),
        })?;
        let mut files: Vec<String> = json
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| ModelError::File {
                path: index.clone(),
                message: "no `weight_map`".into(),
            })?
            .values()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files.into_iter().map(|f| dir.join(f)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        Ok(vec![single])
    } else {
        Err(ModelError::File {
            path: dir.to_path_buf(),
            message: "no model.safetensors or model.safetensors.index.json".into(),
        })
    }
}

/// Builds the architecture a config names from `weights`; the outer error is a config
/// problem (as text), the inner one a weight problem.
fn build(json: &Value, weights: &Weights) -> std::result::Result<Result<Architecture>, String> {
    let c = config::text_config(json);
    let model_type = c
        .get("model_type")
        .and_then(Value::as_str)
        .or_else(|| json.get("model_type").and_then(Value::as_str))
        .unwrap_or("");
    match model_type {
        "gemma3" | "gemma3_text" => {
            let cfg = gemma3::Config::from_json(json).map_err(|e| e.to_string())?;
            Ok(gemma3::Gemma3::new(cfg, weights)
                .map(Architecture::Gemma3)
                .map_err(ModelError::from))
        }
        "llama" | "qwen2" | "mistral" => {
            let cfg = llama::Config::from_json(json).map_err(|e| e.to_string())?;
            Ok(llama::Llama::new(cfg, weights)
                .map(Architecture::Llama)
                .map_err(ModelError::from))
        }
        other => Err(format!(
            "unknown architecture `{other}`; known: gemma3, gemma3_text, llama, qwen2, mistral"
        )),
    }
}
