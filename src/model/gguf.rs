//! Loading a GGUF file (llama.cpp's format): the configuration from its metadata, as
//! transformers derives it, and the weights: on the CPU in f32 the matrices stay in their
//! blocks (see [`super::quant`]), elsewhere they are dequantized.

use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value as GgufValue};
use candle_core::{DType, Device};
use serde_json::{json, Value};

use super::weights::Weights;
use super::{build, Model, ModelError, Placement, Result};

/// Reads the header of a GGUF file, checking that every tensor it lists fits in the file.
pub fn read_content(path: &Path) -> Result<gguf_file::Content> {
    let bad = |message: String| ModelError::File {
        path: path.to_path_buf(),
        message,
    };
    let mut file = std::fs::File::open(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // candle's reader panics on some corrupt headers (an alignment of 0 divides by zero):
    // such a panic is caught, silenced and reported as an error.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        gguf_file::Content::read(&mut file)
    }));
    std::panic::set_hook(hook);
    let content = match read {
        Ok(Ok(content)) => content,
        Ok(Err(e)) => return Err(bad(format!("not a readable GGUF file: {e}"))),
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            return Err(bad(format!(
                "not a readable GGUF file: the header is corrupt ({why})"
            )));
        }
    };
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    for (name, info) in &content.tensor_infos {
        let (block, bytes) = (
            info.ggml_dtype.block_size() as u64,
            info.ggml_dtype.type_size() as u64,
        );
        let end = info
            .shape
            .dims()
            .iter()
            .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
            .filter(|n| n % block == 0)
            .and_then(|n| (n / block).checked_mul(bytes))
            .and_then(|n| {
                n.checked_add(content.tensor_data_offset)?
                    .checked_add(info.offset)
            });
        if end.is_none_or(|end| end > size) {
            return Err(bad(format!(
                "tensor `{name}` of shape {:?} ({:?}) does not fit in the file's {size} bytes",
                info.shape.dims(),
                info.ggml_dtype
            )));
        }
    }
    Ok(content)
}

/// Loads a GGUF model in f32 on `device` (on the CPU its matrices kept in their blocks,
/// products computed in f32 from the decoded values). The configuration
/// comes from the metadata unless `config` (a Hugging Face `config.json`) is given: GGUF
/// metadata does not say everything (Gemma 3's layer pattern, for one).
pub fn load(path: &Path, config: Option<&Value>, device: &Device) -> Result<Model> {
    let placement = Placement {
        device: device.clone(),
        dtype: DType::F32,
    };
    load_on(path, config, &placement)
}

/// As [`load`], on `placement`'s device with the weights in its dtype.
pub fn load_on(path: &Path, config: Option<&Value>, placement: &Placement) -> Result<Model> {
    let content = read_content(path)?;
    let (architecture, derived) = config_of(&content).map_err(|message| ModelError::File {
        path: path.to_path_buf(),
        message,
    })?;
    let config = config.cloned().unwrap_or(derived);
    let parameters = content
        .tensor_infos
        .values()
        .map(|t| t.shape.elem_count() as u64)
        .sum();
    if placement.device.is_cpu() {
        super::memory::check_fits(path, parameters)?;
    }
    let qk_heads = (architecture == "llama").then(|| {
        let n = |k: &str| config[k].as_u64().unwrap_or(0) as usize;
        (n("num_attention_heads"), n("num_key_value_heads"))
    });
    let weights = Weights::from_gguf(
        path,
        &content,
        &architecture,
        qk_heads,
        &placement.device,
        placement.dtype,
    )?;
    let arch = build(&config, &weights).map_err(|message| ModelError::File {
        path: path.to_path_buf(),
        message,
    })??;
    Ok(Model::new(arch, path.to_path_buf(), config))
}

/// The architecture name and a Hugging Face-style `config.json` built from the metadata.
/// Where the metadata is silent, transformers' defaults apply: Gemma 3's local RoPE base
/// 10,000 (`rope.freq_base_swa` when present) and one global layer in six;
/// `query_pre_attn_scalar` is the head width, except for the 62-layer 27b model
/// (`hidden / heads`), as llama.cpp computes it. Linear RoPE scaling is read when present.
pub fn config_of(content: &gguf_file::Content) -> std::result::Result<(String, Value), String> {
    let md = &content.metadata;
    let arch = text(md, "general.architecture")?;
    let key = |k: &str| format!("{arch}.{k}");
    let int = |k: &str| uint(md, &key(k));
    let vocab = content
        .tensor_infos
        .get("token_embd.weight")
        .map(|t| t.shape.dims()[0])
        .ok_or("no token_embd.weight tensor")?;
    let hidden = int("embedding_length")?;
    let heads = int("attention.head_count")?;
    let layers = int("block_count")?;
    let head_dim = int("attention.key_length").unwrap_or(hidden / heads);
    let eps = float(md, &key("attention.layer_norm_rms_epsilon")).unwrap_or(1e-6);
    let theta = float(md, &key("rope.freq_base")).unwrap_or(10_000.0);
    let mut config = json!({
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int("feed_forward_length")?,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int("attention.head_count_kv").unwrap_or(heads),
        "head_dim": head_dim,
        "rms_norm_eps": eps,
        "rope_theta": theta,
        "tie_word_embeddings": !content.tensor_infos.contains_key("output.weight"),
    });
    if let Ok(context) = int("context_length") {
        config["max_position_embeddings"] = json!(context);
    }
    let scaling_type = text(md, &key("rope.scaling.type")).ok();
    let scaling_factor = float(md, &key("rope.scaling.factor")).ok();
    if let (Some("linear"), Some(factor)) = (scaling_type.as_deref(), scaling_factor) {
        config["rope_scaling"] = json!({ "rope_type": "linear", "factor": factor });
    }
    match arch.as_str() {
        "gemma3" => {
            config["model_type"] = json!("gemma3_text");
            config["sliding_window"] = json!(int("attention.sliding_window").unwrap_or(512));
            config["sliding_window_pattern"] = json!(6);
            let local = float(md, &key("rope.freq_base_swa")).unwrap_or(10_000.0);
            config["rope_local_base_freq"] = json!(local);
            let scalar = if layers == 62 {
                hidden / heads
            } else {
                head_dim
            };
            config["query_pre_attn_scalar"] = json!(scalar);
        }
        "llama" | "qwen2" => config["model_type"] = json!(arch),
        other => return Err(format!("unsupported GGUF architecture `{other}`")),
    }
    Ok((arch, config))
}

fn text(
    md: &std::collections::HashMap<String, GgufValue>,
    key: &str,
) -> std::result::Result<String, String> {
    md.get(key)
        .ok_or_else(|| format!("metadata key `{key}` is missing"))?
        .to_string()
        .cloned()
        .map_err(|e| format!("metadata key `{key}`: {e}"))
}

fn uint(
    md: &std::collections::HashMap<String, GgufValue>,
    key: &str,
) -> std::result::Result<usize, String> {
    let v = md
        .get(key)
        .ok_or_else(|| format!("metadata key `{key}` is missing"))?;
    v.to_u32()
        .map(|n| n as usize)
        .or_else(|_| v.to_u64().map(|n| n as usize))
        .map_err(|e| format!("metadata key `{key}`: {e}"))
}

fn float(
    md: &std::collections::HashMap<String, GgufValue>,
    key: &str,
) -> std::result::Result<f64, String> {
    let v = md
        .get(key)
        .ok_or_else(|| format!("metadata key `{key}` is missing"))?;
    v.to_f32()
        .map(f64::from)
        .or_else(|_| v.to_f64())
        .map_err(|e| format!("metadata key `{key}`: {e}"))
}
