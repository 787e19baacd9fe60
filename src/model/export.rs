//! A model written back as a Hugging Face directory, its LoRA adapter merged into the
//! weights: `config.json`, `model.safetensors` with Hugging Face tensor names (f32), and
//! the tokenizer files, ready for transformers, vLLM or llama.cpp's converter. A model
//! loaded from a GGUF file is written dequantized, with the config derived from its
//! metadata.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde_json::{json, Value};

use super::{config, Architecture, Model, ModelError, Result};

/// Files of a tokenizer's folder that travel with an exported model when present.
pub const TOKENIZER_FILES: [&str; 4] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Writes `model` (adapters merged) to `dir` as a Hugging Face directory, copying the
/// tokenizer files present in `tokenizer_dir`.
pub fn save_hf(model: &Model, tokenizer_dir: Option<&Path>, dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let tensors: HashMap<String, Tensor> = model.hf_tensors()?.into_iter().collect();
    let weights = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &weights).map_err(|e| ModelError::File {
        path: weights.clone(),
        message: format!("cannot write the weights: {e}"),
    })?;
    write_json(&dir.join("config.json"), &hf_config(model))?;
    if let Some(from) = tokenizer_dir {
        for name in TOKENIZER_FILES {
            let source = from.join(name);
            if source.is_file() && from != dir {
                let dest = dir.join(name);
                std::fs::copy(&source, &dest).map_err(|source| ModelError::Io {
                    path: dest.clone(),
                    source,
                })?;
            }
        }
    }
    Ok(())
}

/// The text model's config as transformers reads it: the architecture class, f32, and for
/// Gemma 3 the layer types spelled out; quantization settings dropped.
pub fn hf_config(model: &Model) -> Value {
    let mut c = config::text_config(&model.config).clone();
    let Some(fields) = c.as_object_mut() else {
        return c;
    };
    fields.remove("quantization_config");
    let class = match &model.arch {
        Architecture::Gemma3(m) => {
            fields.insert("model_type".into(), json!("gemma3_text"));
            let types: Vec<&str> = m
                .config
                .sliding
                .iter()
                .map(|&s| {
                    if s {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                })
                .collect();
            fields.insert("layer_types".into(), json!(types));
            "Gemma3ForCausalLM"
        }
        Architecture::Llama(_) => match fields.get("model_type").and_then(Value::as_str) {
            Some("qwen2") => "Qwen2ForCausalLM",
            Some("mistral") => "MistralForCausalLM",
            _ => "LlamaForCausalLM",
        },
    };
    fields.insert("architectures".into(), json!([class]));
    fields.insert("torch_dtype".into(), json!("float32"));
    c
}

fn write_json(path: &PathBuf, value: &Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).expect("JSON serialises");
    std::fs::write(path, text).map_err(|source| ModelError::Io {
        path: path.clone(),
        source,
    })
}
