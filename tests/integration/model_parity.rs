//! The models against Hugging Face transformers and PEFT on tiny random-weight models of
//! the real architectures (fixtures made by `reference/make_model_fixtures.py`, versions in
//! each `expected.json`): logits, greedy tokens, completion log-probs, LoRA-applied logits
//! (plain and rsLoRA), LoRA gradients, and the PEFT round trip.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use rlvr::model::{lora, Model};

use crate::{max_abs, max_abs_diff, repo};

const MODELS: [&str; 3] = ["tiny-gemma3", "tiny-llama", "tiny-qwen2"];

struct Fixture {
    model: Model,
    expected: HashMap<String, Tensor>,
}

fn fixture(name: &str) -> Fixture {
    let dir = repo(&format!("tests/fixtures/{name}"));
    let model = Model::from_hf_dir(&dir, &Device::Cpu).unwrap();
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    Fixture { model, expected }
}

impl Fixture {
    fn ids(&self, key: &str) -> Vec<Vec<u32>> {
        let t = &self.expected[key];
        let t = if t.rank() == 1 {
            t.unsqueeze(0).unwrap()
        } else {
            t.clone()
        };
        t.to_dtype(candle_core::DType::U32)
            .unwrap()
            .to_vec2::<u32>()
            .unwrap()
    }
}

#[test]
fn logits_equal_transformers() {
    for name in MODELS {
        let f = fixture(name);
        let logits = f.model.logits(&f.ids("input_ids"), false).unwrap();
        let diff = max_abs_diff(&logits, &f.expected["logits"]);
        assert!(diff <= 1e-4, "{name}: max |Δlogit| = {diff}");
    }
}

#[test]
fn greedy_tokens_equal_transformers() {
    for name in MODELS {
        let f = fixture(name);
        let prompt = &f.ids("greedy_prompt")[0];
        let want = &f.ids("greedy")[0];
        let got = f.model.greedy(prompt, want.len(), false).unwrap();
        assert_eq!(&got, want, "{name}");
    }
}

#[test]
fn completion_logprobs_equal_transformers() {
    for name in MODELS {
        let f = fixture(name);
        let got = f
            .model
            .completion_logprobs(&f.ids("prompt_ids")[0], &f.ids("completion_ids")[0], false)
            .unwrap();
        let diff = max_abs_diff(&got, &f.expected["completion_logprobs"]);
        assert!(diff <= 1e-4, "{name}: max |Δlogprob| = {diff}");
    }
}

#[test]
fn peft_adapters_load_and_change_logits_as_in_peft() {
    for name in MODELS {
        for (adapter, key) in [
            ("adapter", "lora_logits"),
            ("adapter-rslora", "rslora_logits"),
        ] {
            let mut f = fixture(name);
            let dir = repo(&format!("tests/fixtures/{name}/{adapter}"));
            lora::load_peft(&mut f.model, &dir).unwrap();
            let ids = f.ids("input_ids");
            let with = f.model.logits(&ids, true).unwrap();
            let diff = max_abs_diff(&with, &f.expected[key]);
            assert!(diff <= 1e-4, "{name}/{adapter}: max |Δlogit| = {diff}");
            let off = f.model.logits(&ids, false).unwrap();
            let base = max_abs_diff(&off, &f.expected["logits"]);
            assert!(
                base <= 1e-4,
                "{name}: adapters off must give the base model ({base})"
            );
        }
    }
}

#[test]
fn lora_gradients_equal_torch_autograd() {
    for name in MODELS {
        let mut f = fixture(name);
        lora::load_peft(
            &mut f.model,
            &repo(&format!("tests/fixtures/{name}/adapter")),
        )
        .unwrap();
        let logprobs = f
            .model
            .completion_logprobs(&f.ids("prompt_ids")[0], &f.ids("completion_ids")[0], true)
            .unwrap();
        let loss = logprobs.sum_all().unwrap().neg().unwrap();
        let want_loss = f.expected["lora_loss"].to_scalar::<f32>().unwrap();
        let got_loss = loss.to_scalar::<f32>().unwrap();
        assert!(
            (got_loss - want_loss).abs() < 1e-4,
            "{name}: loss {got_loss} vs {want_loss}"
        );
        let grads = loss.backward().unwrap();
        let vars = lora::variables(&mut f.model);
        assert_eq!(vars.len(), 56, "{name}");
        for (key, var) in vars {
            let got = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {key}"));
            let want = &f.expected[&format!("grad.{key}")];
            let scale = max_abs(want);
            assert!(scale > 0.0, "{name}: {key} has a zero reference gradient");
            let diff = max_abs_diff(got, want);
            assert!(
                diff <= 1e-4 * scale.max(1.0),
                "{name}: {key}: max |Δgrad| = {diff} (scale {scale})"
            );
        }
    }
}

#[test]
fn fresh_adapters_start_as_the_base_model_and_round_trip_through_peft_files() {
    let mut f = fixture("tiny-gemma3");
    let config = lora::LoraConfig {
        rank: 4,
        alpha: 8.0,
        seed: 3,
        ..lora::LoraConfig::default()
    };
    lora::attach(&mut f.model, &config).unwrap();
    let ids = f.ids("input_ids");
    let base = f.model.logits(&ids, false).unwrap();
    let fresh = f.model.logits(&ids, true).unwrap();
    assert_eq!(
        max_abs_diff(&base, &fresh),
        0.0,
        "B = 0 leaves the output unchanged"
    );
    // give B values so the round trip is meaningful
    for (key, var) in lora::variables(&mut f.model) {
        if key.ends_with("lora_B.weight") {
            let noise = Tensor::randn(0f32, 0.02, var.shape(), &Device::Cpu).unwrap();
            rlvr::model::lora::set(&var, &noise).unwrap();
        }
    }
    let trained = f.model.logits(&ids, true).unwrap();
    let dir = std::env::temp_dir().join(format!("rlvr-peft-{}", std::process::id()));
    lora::save_peft(&mut f.model, &config, "tiny-gemma3", &dir).unwrap();
    let mut again = fixture("tiny-gemma3");
    let loaded = lora::load_peft(&mut again.model, &dir).unwrap();
    assert_eq!((loaded.rank, loaded.alpha), (4, 8.0));
    let reloaded = again.model.logits(&ids, true).unwrap();
    assert_eq!(max_abs_diff(&trained, &reloaded), 0.0);
}

#[test]
fn model_errors_name_the_file() {
    let dir = std::env::temp_dir().join(format!("rlvr-badmodel-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let err = Model::from_hf_dir(&dir, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
    std::fs::write(dir.join("config.json"), r#"{"model_type": "gpt9"}"#).unwrap();
    std::fs::copy(
        repo("tests/fixtures/tiny-llama/model.safetensors"),
        dir.join("model.safetensors"),
    )
    .unwrap();
    let err = Model::from_hf_dir(&dir, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("unknown architecture `gpt9`"),
        "{err}"
    );
    let cfg = std::fs::read_to_string(repo("tests/fixtures/tiny-llama/config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("\"hidden_size\"", "\"hidden_sizeX\""),
    )
    .unwrap();
    let err = Model::from_hf_dir(&dir, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing key `hidden_size`"), "{err}");
    std::fs::write(dir.join("model.safetensors"), b"truncated").unwrap();
    std::fs::write(dir.join("config.json"), &cfg).unwrap();
    let err = Model::from_hf_dir(&dir, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}
