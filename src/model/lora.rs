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

/// Reads a PEFT LoRA adapter from `dir` and attaches it, returning its configuration.
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
        return Err(bad("`peft_type` is not LORA".into()));
    }
    let rank = json
        .get("r")
        .and_then(Value::as_u64)
        .ok_or_else(|| bad("missing `r`".into()))? as usize;
    let alpha = json
        .get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| bad("missing `lora_alpha`".into()))?;
    let targets: Vec<String> = match json.get("target_modules") {
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect(),
        Some(Value::String(s)) if s == "all-linear" => {
            ALL_LINEAR.iter().map(|s| s.to_string()).collect()
        }
        _ => return Err(bad("missing `target_modules`".into())),
    };
    let config = LoraConfig {
        rank,
        alpha,
        targets,
        rslora: json
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        seed: 0,
    };
    let weights_path = dir.join("adapter_model.safetensors");
    let device = model.device().clone();
    let tensors =
        candle_core::safetensors::load(&weights_path, &device).map_err(|e| ModelError::File {
            path: weights_path.clone(),
            message: e.to_string(),
        })?;
    let scale = config.scale();
    for (name, linear) in model.linears_mut() {
        if !targeted(&name, &config.targets) {
            continue;
        }
        let get = |part: &str| {
            let key = format!("base_model.model.{name}.{part}.weight");
            tensors
                .get(&key)
                .ok_or_else(|| ModelError::File {
                    path: weights_path.clone(),
                    message: format!("tensor `{key}` is missing"),
                })
                .and_then(|t| Ok(Var::from_tensor(&t.to_dtype(candle_core::DType::F32)?)?))
        };
        linear.lora = Some(Lora {
            a: get("lora_A")?,
            b: get("lora_B")?,
            scale,
        });
    }
    Ok(config)
}
