//! Reading `config.json` robustly: the text part of multimodal configs (`text_config`),
//! defaults where Hugging Face has them, and errors that name the missing key.

use serde_json::Value;

/// A `config.json` that cannot describe a model.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required key is absent.
    #[error("config.json: missing key `{0}`")]
    Missing(String),
    /// A key holds a value of the wrong kind.
    #[error("config.json: key `{key}` must be {expected}")]
    Type {
        /// The key.
        key: String,
        /// What it must hold.
        expected: &'static str,
    },
}

type Result<T> = std::result::Result<T, ConfigError>;

/// The text model's part of a config: `text_config` when present (Gemma 3 4b and larger
/// are multimodal), else the whole object.
pub fn text_config(json: &Value) -> &Value {
    json.get("text_config")
        .filter(|v| v.is_object())
        .unwrap_or(json)
}

/// A required non-negative integer.
pub fn usize_key(c: &Value, key: &str) -> Result<usize> {
    match c.get(key) {
        None | Some(Value::Null) => Err(ConfigError::Missing(key.to_string())),
        Some(v) => v.as_u64().map(|n| n as usize).ok_or(ConfigError::Type {
            key: key.to_string(),
            expected: "a non-negative integer",
        }),
    }
}

/// An optional non-negative integer with a default.
pub fn usize_or(c: &Value, key: &str, default: usize) -> Result<usize> {
    match c.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(_) => usize_key(c, key),
    }
}

/// An optional number with a default.
pub fn f64_or(c: &Value, key: &str, default: f64) -> Result<f64> {
    match c.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_f64().ok_or(ConfigError::Type {
            key: key.to_string(),
            expected: "a number",
        }),
    }
}

/// An optional number (`None` when absent or null).
pub fn opt_f64(c: &Value, key: &str) -> Option<f64> {
    c.get(key).and_then(Value::as_f64)
}

/// RoPE base and linear scaling factor of one layer type. Reads the per-layer-type
/// `rope_parameters` map of newer configs (`{"full_attention": {"rope_theta", "rope_type",
/// "factor"}}`), a flat `rope_parameters`, or the older `rope_theta` + `rope_scaling`
/// (which applies to full-attention layers only). `default_theta` applies when nothing is set.
pub fn rope_of(c: &Value, layer_type: &str, default_theta: f64) -> Result<(f64, f64)> {
    let params = c.get("rope_parameters").filter(|p| p.is_object());
    let per_type = params
        .and_then(|p| p.get(layer_type))
        .filter(|p| p.is_object());
    let (section, scaling) = match (per_type, params) {
        (Some(p), _) => (p, Some(p)),
        (None, Some(p)) if p.get("rope_theta").is_some() => (p, Some(p)),
        _ => (
            c,
            c.get("rope_scaling")
                .filter(|s| s.is_object() && layer_type != "sliding_attention"),
        ),
    };
    let theta = match section.get("rope_theta") {
        Some(v) => v.as_f64().ok_or(ConfigError::Type {
            key: "rope_theta".into(),
            expected: "a number",
        })?,
        None if layer_type == "sliding_attention" => default_theta,
        None => f64_or(c, "rope_theta", default_theta)?,
    };
    let linear = scaling
        .filter(|s| {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(Value::as_str);
            kind == Some("linear")
        })
        .and_then(|s| s.get("factor"))
        .and_then(Value::as_f64)
        .unwrap_or(1.0);
    Ok((theta, linear))
}
