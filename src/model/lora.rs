//! Attaching LoRA adapters to a model, and saving / loading them in PEFT's format
//! (`adapter_config.json` + `adapter_model.safetensors` with PEFT's tensor names), so an
//! adapter trained here loads in PEFT and vLLM, and one trained there loads here.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};

use super::linear::Lora;
use super::{Model, ModelError, Result};

/// The modules PEFT calls "all linear" for the implemented architectures.
pub const ALL_LINEAR: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// How to shape a new adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank `r`.
    pub rank: usize,
    /// `alpha`: the update is scaled by `alpha / r` (`alpha / √r` with rsLoRA).
    pub alpha: f64,
    /// Module names (the last part, e.g. `q_proj`) that get an adapter.
    pub targets: Vec<String>,
    /// Rank-stabilised scaling.
    pub rslora: bool,
    /// Seed of `A`'s initialisation.
    pub seed: u64,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            rank: 16,
            alpha: 32.0,
            targets: ALL_LINEAR.iter().map(|s| s.to_string()).collect(),
            rslora: false,
            seed: 0,
        }
    }
}

impl LoraConfig {
    /// The factor applied to `B A x`.
    pub fn scale(&self) -> f64 {
        if self.rslora {
            self.alpha / (self.rank as f64).sqrt()
        } else {
            self.alpha / self.rank as f64
        }
    }
}

fn targeted(name: &str, targets: &[String]) -> bool {
    let last = name.rsplit('.').next().unwrap_or(name);
    targets.iter().any(|t| t == last)
}

/// Attaches fresh adapters (A Kaiming-uniform from `config.seed`, B zero) to every targeted
/// linear layer, replacing any present. Fails when no layer matches.
pub fn attach(model: &mut Model, config: &LoraConfig) -> Result<()> {
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let device = model.device().clone();
    let mut attached = 0;
    for (name, linear) in model.linears_mut() {
        if targeted(&name, &config.targets) {
            linear.lora = Some(Lora::new(
                linear.in_dim(),
                linear.out_dim(),
                config.rank,
                config.scale(),
                &mut rng,
                &device,
            )?);
            attached += 1;
        }
    }
    if attached == 0 {
        return Err(ModelError::File {
            path: model.source.clone(),
            message: format!(
                "no linear layer matches the LoRA targets {:?}",
                config.targets
            ),
        });
    }
    Ok(())
}

/// Removes every adapter.
pub fn detach(model: &mut Model) {
    for (_, linear) in model.linears_mut() {
        linear.lora = None;
    }
}

/// Writes `value` into the adapter variable `var`: the one way adapter weights change in
/// place, so that the prefix cache never serves keys computed before the write.
#[allow(clippy::disallowed_methods)]
pub fn set(var: &Var, value: &Tensor) -> candle_core::Result<()> {
    super::prefix::adapter_written(var);
    var.set(value)
}

/// Every adapter variable with its PEFT tensor name
/// (`base_model.model.<module>.lora_A.weight` / `lora_B.weight`), in layer order.
pub fn variables(model: &mut Model) -> Vec<(String, Var)> {
    let mut out = Vec::new();
    for (name, linear) in model.linears_mut() {
        if let Some(lora) = &linear.lora {
            out.push((
                format!("base_model.model.{name}.lora_A.weight"),
                lora.a.clone(),
            ));
            out.push((
                format!("base_model.model.{name}.lora_B.weight"),
                lora.b.clone(),
            ));
        }
    }
    out
}

/// Writes the adapters in PEFT's format to `dir`.
pub fn save_peft(
    model: &mut Model,
    config: &LoraConfig,
    base_name: &str,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|source| ModelError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let tensors: HashMap<String, Tensor> = variables(model)
        .into_iter()
        .map(|(name, var)| (name, var.as_tensor().clone()))
        .collect();
    let weights = dir.join("adapter_model.safetensors");
    candle_core::safetensors::save(&tensors, &weights)?;
    let mut targets = config.targets.clone();
    targets.sort();
    let adapter_config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name,
        "r": config.rank,
        "lora_alpha": config.alpha,
        "lora_dropout": 0.0,
        "target_modules": targets,
        "use_rslora": config.rslora,
        "use_dora": false,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": null,
    });
    let path = dir.join("adapter_config.json");
    let text = serde_json::to_string_pretty(&adapter_config).expect("JSON serialises");
    std::fs::write(&path, text).map_err(|source| ModelError::Io { path, source })
}

/// The first `adapter_config.json` setting of PEFT's LoRA that this implementation does
/// not apply (DoRA, per-module ranks or alphas, full modules saved beside the adapter,
/// biases, layer selection, targets other than the linear layers), described.
fn unsupported_setting(json: &Value) -> Option<String> {
    let set = |key: &str| match json.get(key) {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Object(m)) => !m.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    };
    let shown = |key: &str| json.get(key).map_or(String::new(), Value::to_string);
    let not_implemented = [
        ("use_dora", "DoRA"),
        ("rank_pattern", "a rank per module"),
        ("alpha_pattern", "an alpha per module"),
        ("modules_to_save", "full modules saved beside the adapter"),
        ("lora_bias", "a bias on lora_B"),
        ("layers_to_transform", "adapters on some layers only"),
        ("exclude_modules", "excluded modules"),
        ("target_parameters", "LoRA on parameters"),
    ];
    if let Some(&(key, what)) = not_implemented.iter().find(|&&(key, _)| set(key)) {
        return Some(format!(
            "`{key}: {}` ({what}) is not implemented; only plain LoRA on linear layers",
            shown(key)
        ));
    }
    match json.get("bias") {
        None | Some(Value::Null) => {}
        Some(Value::String(b)) if b == "none" => {}
        Some(other) => return Some(format!("`bias: {other}` is not implemented; only \"none\"")),
    }
    None
}

/// The modules an adapter's `target_modules` names: a list of the known linear layers, or
/// `"all-linear"`.
fn target_modules(json: &Value) -> std::result::Result<Vec<String>, String> {
    match json.get("target_modules") {
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v.as_str() {
                Some(name) if ALL_LINEAR.contains(&name) => Ok(name.to_string()),
                _ => Err(format!(
                    "`target_modules` names {v}, which is no layer this implementation adapts \
                     (known: {})",
                    ALL_LINEAR.join(", ")
                )),
            })
            .collect(),
        Some(Value::String(s)) if s == "all-linear" => {
            Ok(ALL_LINEAR.iter().map(|s| s.to_string()).collect())
        }
        Some(Value::String(s)) => Err(format!(
            "`target_modules` as a pattern (\"{s}\") is not implemented; list the modules or \
             use \"all-linear\""
        )),
        _ => Err("missing `target_modules`".into()),
    }
}

/// Reads a PEFT LoRA adapter from `dir` and attaches it, returning its configuration.
/// Fails, naming the setting or tensor and the file, on a setting this implementation does
/// not apply, on a tensor that matches no adapted layer of the model, and on a missing
/// tensor or one of the wrong shape or dtype.
pub fn load_peft(model: &mut Model, dir: &Path) -> Result<LoraConfig> {
    let config_path = dir.join("adapter_config.json");
    let bad = |message: String| ModelError::File {
        path: config_path.clone(),
        message,
    };
    let text = std::fs::read_to_string(&config_path).map_err(|source| ModelError::Io {
        path: config_path.clone(),
        source,
    })?;
    let json: Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    if json.get("peft_type").and_then(Value::as_str) != Some("LORA") {
        return Err(bad(format!(
            "`peft_type` is {}, not \"LORA\"",
            json.get("peft_type").unwrap_or(&Value::Null)
        )));
    }
    let rank = json
        .get("r")
        .and_then(Value::as_u64)
        .filter(|&r| r > 0)
        .ok_or_else(|| bad("`r` must be a positive integer".into()))? as usize;
    let alpha = json
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("missing `lora_alpha`".into()))?;
    if let Some(message) = unsupported_setting(&json) {
        return Err(bad(message));
    }
    let config = LoraConfig {
        rank,
        alpha,
        targets: target_modules(&json).map_err(bad)?,
        rslora: json
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        seed: 0,
    };
    let weights_path = dir.join("adapter_model.safetensors");
    let bad_tensor = |message: String| ModelError::File {
        path: weights_path.clone(),
        message,
    };
    let device = model.device().clone();
    let tensors = candle_core::safetensors::load(&weights_path, &device)
        .map_err(|e| bad_tensor(e.to_string()))?;
    let key = |module: &str, part: &str| format!("base_model.model.{module}.{part}.weight");
    let mut layers = model.linears_mut();
    layers.retain(|(name, _)| targeted(name, &config.targets));
    let expected: std::collections::BTreeSet<String> = layers
        .iter()
        .flat_map(|(name, _)| [key(name, "lora_A"), key(name, "lora_B")])
        .collect();
    let mut stray: Vec<&String> = tensors.keys().filter(|k| !expected.contains(*k)).collect();
    stray.sort();
    if let Some(first) = stray.first() {
        return Err(bad_tensor(format!(
            "tensor `{first}` matches no adapted layer of the model ({} of the file's tensors \
             match none; the names expected look like `{}`)",
            stray.len(),
            expected.first().map_or("", String::as_str)
        )));
    }
    let scale = config.scale();
    for (name, linear) in layers {
        let get = |part: &str, shape: [usize; 2]| -> Result<Var> {
            let key = key(&name, part);
            let t = tensors
                .get(&key)
                .ok_or_else(|| bad_tensor(format!("tensor `{key}` is missing")))?;
            if !t.dtype().is_float() {
                return Err(bad_tensor(format!(
                    "tensor `{key}` holds {:?}, not floating-point numbers",
                    t.dtype()
                )));
            }
            if t.dims() != shape {
                return Err(bad_tensor(format!(
                    "tensor `{key}` has shape {:?}; this model and r = {rank} need {shape:?}",
                    t.dims()
                )));
            }
            Ok(Var::from_tensor(&t.to_dtype(candle_core::DType::F32)?)?)
        };
        let a = get("lora_A", [rank, linear.in_dim()])?;
        let b = get("lora_B", [linear.out_dim(), rank])?;
        linear.lora = Some(Lora { a, b, scale });
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_peft_config_passes_and_each_unimplemented_setting_is_named() {
        let plain = json!({
            "use_dora": false, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": null,
            "bias": "none", "lora_bias": false, "layers_to_transform": null,
            "exclude_modules": null, "target_parameters": null, "loftq_config": {},
            "megatron_core": "megatron.core",
        });
        assert_eq!(unsupported_setting(&plain), None);
        for (key, value) in [
            ("use_dora", json!(true)),
            ("rank_pattern", json!({ "q_proj": 8 })),
            ("alpha_pattern", json!({ "v_proj": 16 })),
            ("modules_to_save", json!(["lm_head"])),
            ("bias", json!("all")),
            ("bias", json!("lora_only")),
            ("lora_bias", json!(true)),
            ("layers_to_transform", json!([0])),
            ("exclude_modules", json!(["q_proj"])),
            ("target_parameters", json!(["experts.gate_up_proj"])),
        ] {
            let mut config = plain.clone();
            config[key] = value.clone();
            let message = unsupported_setting(&config).expect(key);
            assert!(message.contains(&format!("`{key}: {value}`")), "{message}");
        }
    }

    #[test]
    fn target_modules_name_linear_layers_only() {
        let targets = |v: Value| target_modules(&json!({ "target_modules": v }));
        assert_eq!(
            targets(json!(["v_proj", "q_proj"])).unwrap(),
            ["v_proj", "q_proj"]
        );
        assert_eq!(
            targets(json!("all-linear")).unwrap().len(),
            ALL_LINEAR.len()
        );
        let err = targets(json!(["q_proj", "lm_head"])).unwrap_err();
        assert!(err.contains("\"lm_head\""), "{err}");
        let err = targets(json!(".*q_proj")).unwrap_err();
        assert!(err.contains("pattern"), "{err}");
        assert!(target_modules(&json!({})).unwrap_err().contains("missing"));
    }
}
