//! A Hugging Face tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*` metadata, for
//! GGUF models published without their `tokenizer.json`. Handles llama.cpp's `gpt2` model
//! (byte-level BPE with merges, as SmolLM2, Llama 3 and Qwen2 use) with the pre-tokenizers
//! whose Hugging Face equivalent is the GPT-2 split: `gpt2`/`default`, and `smollm` /
//! `starcoder` (digits split one by one first). Writes `tokenizer.json` and a
//! `tokenizer_config.json` (special tokens, chat template) that [`super::tokenizer::Tokenizer`]
//! reads.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value as GgufValue};
use serde_json::{json, Value};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, PreTokenizerWrapper, Tokenizer};

use super::{ModelError, Result};

/// llama.cpp's token type of control tokens (`<|im_start|>`, `<|endoftext|>`).
const CONTROL: i32 = 3;
/// llama.cpp's token type of user-defined added tokens.
const USER_DEFINED: i32 = 4;

/// A tokenizer and its `tokenizer_config.json`, as rebuilt from GGUF metadata.
pub struct GgufTokenizer {
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// `bos_token`, `eos_token`, `pad_token`, `unk_token` (where the metadata names them),
    /// `add_bos_token` and `chat_template`.
    pub config: Value,
}

impl GgufTokenizer {
    /// Rebuilds the tokenizer described by `content`'s metadata; `path` names the file in
    /// errors.
    pub fn from_content(path: &Path, content: &Content) -> Result<Self> {
        build(content).map_err(|message| ModelError::File {
            path: path.to_path_buf(),
            message,
        })
    }

    /// Writes `tokenizer.json` and `tokenizer_config.json` into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join("tokenizer.json");
        self.tokenizer
            .save(&path, false)
            .map_err(|e| ModelError::File {
                path: path.clone(),
                message: format!("cannot write the tokenizer: {e}"),
            })?;
        let path = dir.join("tokenizer_config.json");
        let text = serde_json::to_string_pretty(&self.config).expect("JSON serialises");
        std::fs::write(&path, text).map_err(|source| ModelError::Io { path, source })
    }
}

/// The GGUF metadata, by key.
type Metadata = HashMap<String, GgufValue>;

/// The tokenizer and its config rebuilt from `content`'s metadata; an error names the key
/// at fault.
fn build(content: &Content) -> std::result::Result<GgufTokenizer, String> {
    let md = &content.metadata;
    let model = string(md, "tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(format!(
            "its tokenizer is llama.cpp's `{model}` model; only byte-level BPE (`gpt2`) can be \
             rebuilt from the metadata: put the model's tokenizer.json beside the file"
        ));
    }
    let split_digits = splits_digits(md)?;
    let tokens = strings(md, "tokenizer.ggml.tokens")?;
    let merges = merges(md)?;
    let types = token_types(md, tokens.len())?;
    let mut tokenizer = byte_level_bpe(&tokens, merges, &types, split_digits)?;
    let token_of = |key: &str| -> Option<String> {
        let id = md.get(key)?.to_u32().ok()? as usize;
        tokens.get(id).cloned()
    };
    let bos = token_of("tokenizer.ggml.bos_token_id");
    let add_bos = md
        .get("tokenizer.ggml.add_bos_token")
        .and_then(|v| v.to_bool().ok())
        .unwrap_or(false);
    match (&bos, add_bos) {
        (Some(bos), true) => {
            let id = tokens
                .iter()
                .position(|t| t == bos)
                .expect("bos is a token") as u32;
            tokenizer.with_post_processor(Some(bos_template(bos, id)?));
        }
        _ => {
            tokenizer.with_post_processor(Some(ByteLevel::new(false, true, true)));
        }
    }

    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "model_max_length": md
            .get(&format!("{}.context_length", string(md, "general.architecture")?))
            .and_then(|v| v.to_u32().ok()),
    });
    for (name, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
    ] {
        if let Some(token) = token_of(key) {
            config[name] = json!(token);
        }
    }
    if let Ok(template) = string(md, "tokenizer.chat_template") {
        config["chat_template"] = json!(template);
    }
    Ok(GgufTokenizer { tokenizer, config })
}

/// Whether the pre-tokenizer (`tokenizer.ggml.pre`) splits digits one by one before the
/// GPT-2 split; an error for pre-tokenizers without a Hugging Face equivalent here.
fn splits_digits(md: &Metadata) -> std::result::Result<bool, String> {
    let pre = md
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok())
        .map_or("default", String::as_str);
    match pre {
        "gpt2" | "default" => Ok(false),
        "smollm" | "starcoder" => Ok(true),
        other => Err(format!(
            "tokenizer.ggml.pre `{other}` is not supported (known: gpt2, default, smollm, \
             starcoder): put the model's tokenizer.json beside the file"
        )),
    }
}

/// The BPE merges, each a pair of tokens.
fn merges(md: &Metadata) -> std::result::Result<Vec<(String, String)>, String> {
    strings(md, "tokenizer.ggml.merges")?
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("tokenizer.ggml.merges[{i}] `{m}` is not two tokens"))
        })
        .collect()
}

/// llama.cpp's type of each of the `n` tokens (all normal when the metadata has none).
fn token_types(md: &Metadata, n: usize) -> std::result::Result<Vec<i32>, String> {
    let types = match md.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|e| format!("tokenizer.ggml.token_type: {e}"))?
            .iter()
            .map(|t| {
                t.to_i32()
                    .map_err(|e| format!("tokenizer.ggml.token_type: {e}"))
            })
            .collect::<std::result::Result<Vec<i32>, String>>()?,
        None => vec![1; n],
    };
    if types.len() != n {
        return Err(format!(
            "tokenizer.ggml.token_type has {} entries for {} tokens",
            types.len(),
            n
        ));
    }
    Ok(types)
}

/// The byte-level BPE tokenizer of `tokens` and `merges`, digits split first if asked, with
/// the control and user-defined tokens (by `types`) added as special tokens.
fn byte_level_bpe(
    tokens: &[String],
    merges: Vec<(String, String)>,
    types: &[i32],
    split_digits: bool,
) -> std::result::Result<Tokenizer, String> {
    let vocab: Vocab = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.clone(), id as u32))
        .collect();
    if vocab.len() != tokens.len() {
        return Err("tokenizer.ggml.tokens holds the same token twice".into());
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| format!("tokenizer.ggml.merges: {e}"))?;
    let mut tokenizer = Tokenizer::new(bpe);

    let byte_level = ByteLevel::new(false, true, true);
    let pre_tokenizer: PreTokenizerWrapper = if split_digits {
        Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
    } else {
        byte_level.into()
    };
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    let added: Vec<AddedToken> = tokens
        .iter()
        .zip(types)
        .filter(|(_, &t)| t == CONTROL || t == USER_DEFINED)
        .map(|(token, &t)| AddedToken::from(token.clone(), t == CONTROL).normalized(false))
        .collect();
    tokenizer
        .add_special_tokens(added)
        .map_err(|e| format!("special tokens: {e}"))?;
    Ok(tokenizer)
}

/// The post-processor that puts `bos` (token `id`) before each sequence.
fn bos_template(bos: &str, id: u32) -> std::result::Result<TemplateProcessing, String> {
    TemplateProcessing::builder()
        .try_single(format!("{bos} $A"))
        .and_then(|b| b.try_pair(format!("{bos} $A {bos} $B")))
        .map_err(|e| format!("BOS template: {e}"))?
        .special_tokens(vec![(bos.to_string(), id)])
        .build()
        .map_err(|e| format!("BOS template: {e}"))
}

fn string(md: &Metadata, key: &str) -> std::result::Result<String, String> {
    md.get(key)
        .ok_or_else(|| format!("metadata key `{key}` is missing"))?
        .to_string()
        .cloned()
        .map_err(|e| format!("metadata key `{key}`: {e}"))
}

fn strings(md: &Metadata, key: &str) -> std::result::Result<Vec<String>, String> {
    md.get(key)
        .ok_or_else(|| format!("metadata key `{key}` is missing"))?
        .to_vec()
        .map_err(|e| format!("metadata key `{key}`: {e}"))?
        .iter()
        .map(|v| {
            v.to_string()
                .cloned()
                .map_err(|e| format!("metadata key `{key}`: {e}"))
        })
        .collect()
}
