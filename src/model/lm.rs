//! A language model as scripts use it: the network, its tokenizer and its adapter, with
//! text in and text out.

use std::path::Path;

use candle_core::Device;

use super::generate::{generate, stop_string_cut, stop_string_end, Completion, Finish, Sampling};
use super::lora::{self, LoraConfig};
use super::tokenizer::Tokenizer;
use super::{Model, ModelError, Placement, Result};

/// A model with its tokenizer and, once attached, its LoRA adapter.
#[derive(Clone)]
pub struct LanguageModel {
    /// The network.
    pub model: Model,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// A name for records and adapter configs (the path it was loaded from).
    pub name: String,
    /// The adapter's shape, when one is attached.
    pub lora: Option<LoraConfig>,
}

/// A generated completion as text.
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedText {
    /// The completion's text, without the stop token that ended it and cut before the
    /// stop string that ended it.
    pub text: String,
    /// Its token ids and log-probabilities, and why it ended.
    pub completion: Completion,
}

/// One candidate for the next token (see [`LanguageModel::next_tokens`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NextToken {
    /// The token id.
    pub id: u32,
    /// Its text.
    pub text: String,
    /// Its log-probability under the model (temperature 1, nothing cut).
    pub logprob: f64,
    /// Its probability at the asked temperature.
    pub prob: f64,
    /// The probability of this token and every more likely one, at that temperature.
    pub cumulative: f64,
    /// Whether top-p sampling keeps it: the more likely tokens sum to less than `top_p`.
    pub kept: bool,
}

impl LanguageModel {
    /// A short hash of the adapter's weights (`None` without one): what tells one trained
    /// adapter from another in Results and cache keys.
    pub fn adapter_fingerprint(&self) -> Option<String> {
        use sha2::{Digest, Sha256};
        self.lora.as_ref()?;
        let mut model = self.model.clone();
        let mut hasher = Sha256::new();
        for (name, var) in lora::variables(&mut model) {
            hasher.update(name.as_bytes());
            let values = var
                .as_tensor()
                .flatten_all()
                .and_then(|t| t.to_dtype(candle_core::DType::F32))
                .and_then(|t| t.to_vec1::<f32>())
                .unwrap_or_default();
            for v in values {
                hasher.update(v.to_le_bytes());
            }
        }
        let digest = hasher.finalize();
        Some(digest[..8].iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Loads a Hugging Face model directory or a `.gguf` file; the tokenizer is `tokenizer`
    /// when given, else the `tokenizer.json` in the directory (beside the GGUF file). Fails
    /// when the tokenizer's vocabulary does not fit the model's.
    pub fn load(path: &Path, tokenizer: Option<&Path>, device: &Device) -> Result<Self> {
        let placement = Placement {
            device: device.clone(),
            dtype: candle_core::DType::F32,
        };
        LanguageModel::load_on(path, tokenizer, &placement)
    }

    /// As [`LanguageModel::load`], on `placement`'s device with the weights in its dtype.
    pub fn load_on(path: &Path, tokenizer: Option<&Path>, placement: &Placement) -> Result<Self> {
        let model = Model::load_on(path, placement)?;
        let dir = if path.is_file() {
            path.parent().unwrap_or(Path::new("."))
        } else {
            path
        };
        let tokenizer_path =
            tokenizer.map_or_else(|| dir.join("tokenizer.json"), Path::to_path_buf);
        let tokenizer = Tokenizer::from_file(&tokenizer_path)?;
        let vocab = model.lm_head().dim(0)?;
        if tokenizer.base_vocab_size() > vocab {
            return Err(ModelError::File {
                path: tokenizer_path,
                message: format!(
                    "the tokenizer has {} tokens but the model only {vocab}",
                    tokenizer.base_vocab_size()
                ),
            });
        }
        Ok(LanguageModel {
            model,
            tokenizer,
            name: path.display().to_string(),
            lora: None,
        })
    }

    /// Completes every prompt in one batch; prompt `i` is sampled with seed
    /// `sampling.seed + i`. Stops at the tokenizer's stop tokens as well as `sampling`'s
    /// stop tokens and stop strings.
    pub fn generate(
        &self,
        prompts: &[String],
        sampling: &Sampling,
        on_step: &mut dyn FnMut(usize) -> bool,
    ) -> Result<Vec<GeneratedText>> {
        let ids = prompts
            .iter()
            .map(|p| self.tokenizer.encode(p))
            .collect::<Result<Vec<_>>>()?;
        let mut stop_ids = sampling.stop_ids.clone();
        stop_ids.extend(self.tokenizer.stop_ids());
        let requests: Vec<Sampling> = (0..prompts.len())
            .map(|i| Sampling {
                seed: sampling.seed.wrapping_add(i as u64),
                stop_ids: stop_ids.clone(),
                ..sampling.clone()
            })
            .collect();
        let adapters_on = self.lora.is_some();
        let decode = |ids: &[u32]| self.tokenizer.decode(ids);
        generate(
            &self.model,
            &ids,
            &requests,
            adapters_on,
            Some(&decode),
            on_step,
        )?
        .into_iter()
        .map(|completion| {
            let text = self.text_of(&completion, &stop_ids, sampling)?;
            Ok(GeneratedText { text, completion })
        })
        .collect()
    }

    /// A completion's text: without the stop token that ended it, cut before the first of
    /// `sampling`'s stop strings (after it with `include_stop`).
    pub fn text_of(
        &self,
        completion: &Completion,
        stop_ids: &[u32],
        sampling: &Sampling,
    ) -> Result<String> {
        let ended_by_token = completion.finish == Finish::Stop
            && completion.ids.last().is_some_and(|t| stop_ids.contains(t));
        let shown = if ended_by_token {
            &completion.ids[..completion.ids.len() - 1]
        } else {
            &completion.ids[..]
        };
        let mut text = self.tokenizer.decode(shown)?;
        let cut = if sampling.include_stop {
            stop_string_end(&text, &sampling.stop_strings)
        } else {
            stop_string_cut(&text, &sampling.stop_strings)
        };
        if let Some(cut) = cut {
            text.truncate(cut);
        }
        Ok(text)
    }

    /// The total log-probability of `completion` after `prompt` (the prompt tokenized as
    /// [`Tokenizer::encode`], the completion without special tokens).
    pub fn logprob(&self, prompt: &str, completion: &str) -> Result<f32> {
        let p = self.tokenizer.encode(prompt)?;
        let c = self.tokenizer.encode_plain(completion)?;
        let adapters_on = self.lora.is_some();
        let per_token =
            super::linear::no_grad(|| self.model.completion_logprobs(&p, &c, adapters_on))?;
        Ok(per_token.sum_all()?.to_scalar::<f32>()?)
    }

    /// The `k` most likely next tokens after `prompt` (tokenized as [`Tokenizer::encode`]),
    /// most likely first, with their probabilities as the sampler sees them at
    /// `temperature` and whether nucleus sampling with `top_p` keeps them.
    pub fn next_tokens(
        &self,
        prompt: &str,
        k: usize,
        temperature: f64,
        top_p: f64,
    ) -> Result<Vec<NextToken>> {
        let ids = self.tokenizer.encode(prompt)?;
        let adapters_on = self.lora.is_some();
        let logits: Vec<f32> =
            super::linear::no_grad(|| self.model.next_logits(&ids, adapters_on))?.to_vec1()?;
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
        let max = logits[order[0]] as f64;
        let log_z = max
            + logits
                .iter()
                .map(|&l| (l as f64 - max).exp())
                .sum::<f64>()
                .ln();
        // the tempered distribution the sampler draws from (greedy: all mass on the top)
        let tempered: Vec<f64> = if temperature <= 0.0 {
            (0..order.len())
                .map(|n| if n == 0 { 1.0 } else { 0.0 })
                .collect()
        } else {
            let top = max / temperature;
            let total: f64 = logits
                .iter()
                .map(|&l| (l as f64 / temperature - top).exp())
                .sum();
            order
                .iter()
                .map(|&i| (logits[i] as f64 / temperature - top).exp() / total)
                .collect()
        };
        let mut cumulative = 0.0;
        let mut out = Vec::with_capacity(k.min(order.len()));
        for (rank, &id) in order.iter().enumerate().take(k) {
            let before = cumulative;
            cumulative += tempered[rank];
            out.push(NextToken {
                id: id as u32,
                text: self.tokenizer.decode(&[id as u32])?,
                logprob: logits[id] as f64 - log_z,
                prob: tempered[rank],
                cumulative,
                kept: rank == 0 || top_p >= 1.0 || before < top_p,
            });
        }
        Ok(out)
    }

    /// A copy sharing the base weights, with fresh adapters of shape `config`.
    pub fn with_lora(&self, config: &LoraConfig) -> Result<Self> {
        let mut policy = self.clone();
        lora::attach(&mut policy.model, config)?;
        policy.lora = Some(config.clone());
        Ok(policy)
    }

    /// Writes the adapter in PEFT's format.
    pub fn save_adapter(&mut self, dir: &Path) -> Result<()> {
        let config = self.lora.clone().ok_or_else(|| ModelError::File {
            path: dir.to_path_buf(),
            message: "this model has no adapter to save; use with_lora first".into(),
        })?;
        lora::save_peft(&mut self.model, &config, &self.name, dir)
    }

    /// Writes the model with its adapter merged into the weights as a Hugging Face
    /// directory (`config.json`, `model.safetensors`, the tokenizer files), for serving
    /// elsewhere.
    pub fn merge_and_save(&self, dir: &Path) -> Result<()> {
        super::export::save_hf(&self.model, self.tokenizer.path().parent(), dir)
    }

    /// A copy sharing the base weights, with the PEFT adapter of `dir` attached.
    pub fn load_adapter(&self, dir: &Path) -> Result<Self> {
        let mut tuned = self.clone();
        lora::detach(&mut tuned.model);
        tuned.lora = Some(lora::load_peft(&mut tuned.model, dir)?);
        Ok(tuned)
    }
}
