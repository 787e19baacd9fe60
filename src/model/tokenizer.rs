//! Text to token ids and back with the model's own `tokenizer.json` (the `tokenizers`
//! crate), its special tokens from `tokenizer_config.json`, and its chat template.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::chat::{self, Message};
use super::{ModelError, Result};

/// A model's tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<String>,
    eos: Option<String>,
    chat_template: Option<String>,
    source: PathBuf,
}

impl Tokenizer {
    /// Reads `tokenizer.json`, and `tokenizer_config.json` beside it when present (special
    /// tokens, chat template).
    pub fn from_file(path: &Path) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| ModelError::File {
            path: path.to_path_buf(),
            message: format!("not a tokenizer: {e}"),
        })?;
        let config_path = path.with_file_name("tokenizer_config.json");
        let config: Value = match std::fs::read_to_string(&config_path) {
            Ok(text) => serde_json::from_str(&text).map_err(|e| ModelError::File {
                path: config_path.clone(),
                message: format!("not valid JSON: {e}"),
            })?,
            Err(_) => Value::Null,
        };
        let token = |key: &str| match config.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
            _ => None,
        };
        Ok(Tokenizer {
            inner,
            bos: token("bos_token"),
            eos: token("eos_token"),
            chat_template: config
                .get("chat_template")
                .and_then(Value::as_str)
                .map(str::to_string),
            source: path.to_path_buf(),
        })
    }

    /// Token ids as the model sees a prompt: special tokens added as the Hugging Face
    /// tokenizer adds them (Gemma: a leading `<bos>`), unless the text already starts with
    /// the BOS token (as rendered chat templates do).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let has_bos = self.bos.as_deref().is_some_and(|b| text.starts_with(b));
        self.encode_with(text, !has_bos)
    }

    /// Token ids of text without any special tokens added (a completion).
    pub fn encode_plain(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_with(text, false)
    }

    fn encode_with(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, special)
            .map_err(|e| self.error(e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The text of `ids`, special tokens kept.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, false).map_err(|e| self.error(e))
    }

    /// The `tokenizer.json` it was read from.
    pub fn path(&self) -> &Path {
        &self.source
    }

    /// The id of a token, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Ids that end a completion: the EOS token and, where the vocabulary has them,
    /// `<end_of_turn>` and `<eos>`.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids: Vec<u32> = [self.eos.as_deref(), Some("<end_of_turn>"), Some("<eos>")]
            .into_iter()
            .flatten()
            .filter_map(|t| self.token_id(t))
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Size of the vocabulary, without the added tokens some tokenizers append past the
    /// model's embedding table (Gemma 3's `<image_soft_token>`).
    pub fn base_vocab_size(&self) -> usize {
        self.inner.get_vocab_size(false)
    }

    /// The bytes of the longest token of the vocabulary, added tokens included, counted in
    /// its own spelling (`▁` for a space, `<0x41>` for a byte): no token stands for more
    /// bytes of text.
    pub fn longest_token_bytes(&self) -> usize {
        let vocab = self.inner.get_vocab(true);
        vocab.keys().map(String::len).max().unwrap_or(0)
    }

    /// The conversation rendered with the model's chat template, ready for generation
    /// when `add_generation_prompt`.
    pub fn chat(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let template = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::File {
                path: self.source.with_file_name("tokenizer_config.json"),
                message: "no chat_template".into(),
            })?;
        chat::render(
            template,
            messages,
            self.bos.as_deref().unwrap_or(""),
            self.eos.as_deref().unwrap_or(""),
            add_generation_prompt,
        )
        .map_err(|e| ModelError::File {
            path: self.source.with_file_name("tokenizer_config.json"),
            message: format!("chat template: {e}"),
        })
    }

    fn error(&self, e: impl std::fmt::Display) -> ModelError {
        ModelError::File {
            path: self.source.clone(),
            message: e.to_string(),
        }
    }
}
