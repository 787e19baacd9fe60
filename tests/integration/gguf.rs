//! GGUF loading on the tiny Gemma 3 model written as llama.cpp's converter writes it
//! (`reference/make_gguf_tiny_fixture.py`): names, the `1 + w` norms and dequantization
//! give the safetensors model's logits; the config derived from the metadata follows
//! transformers where the metadata is silent.

use candle_core::{Device, Tensor};
use rlvr::model::{gguf, Model};
use serde_json::Value;

use crate::{max_abs_diff, repo};

fn setup() -> (
    Value,
    std::collections::HashMap<String, Tensor>,
    Vec<Vec<u32>>,
) {
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("tests/fixtures/tiny-gemma3/config.json")).unwrap(),
    )
    .unwrap();
    let expected = candle_core::safetensors::load(
        repo("tests/fixtures/tiny-gemma3-gguf/expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let ids = expected["input_ids"]
        .to_dtype(candle_core::DType::U32)
        .unwrap()
        .to_vec2::<u32>()
        .unwrap();
    (config, expected, ids)
}

#[test]
fn f32_gguf_weights_give_the_safetensors_logits() {
    let (config, expected, ids) = setup();
    let path = repo("tests/fixtures/tiny-gemma3-gguf/model-f32.gguf");
    let model = gguf::load(&path, Some(&config), &Device::Cpu).unwrap();
    let diff = max_abs_diff(
        &model.logits(&ids, false).unwrap(),
        &expected["reference_logits"],
    );
    assert!(diff <= 1e-4, "max |Δlogit| = {diff}");
}

#[test]
fn q8_0_gguf_dequantizes_as_gguf_py_does() {
    let (config, expected, ids) = setup();
    let path = repo("tests/fixtures/tiny-gemma3-gguf/model-q8_0.gguf");
    let model = gguf::load(&path, Some(&config), &Device::Cpu).unwrap();
    let diff = max_abs_diff(
        &model.logits(&ids, false).unwrap(),
        &expected["q8_0_true_config_logits"],
    );
    assert!(diff <= 1e-4, "max |Δlogit| = {diff}");
}

#[test]
fn config_from_metadata_reads_what_is_there_and_defaults_the_rest() {
    let path = repo("tests/fixtures/tiny-gemma3-gguf/model-f32.gguf");
    let content = gguf::read_content(&path).unwrap();
    let (arch, config) = gguf::config_of(&content).unwrap();
    assert_eq!(arch, "gemma3");
    assert_eq!(config["vocab_size"], 512);
    assert_eq!(config["hidden_size"], 64);
    assert_eq!(config["num_key_value_heads"], 2);
    assert_eq!(config["head_dim"], 16);
    assert_eq!(config["sliding_window"], 4);
    assert_eq!(config["rope_theta"], 1e6);
    assert_eq!(config["rope_local_base_freq"], 1e4);
    assert_eq!(config["rope_scaling"]["factor"], 8.0);
    assert_eq!(
        config["sliding_window_pattern"], 6,
        "not in the metadata: transformers' default"
    );
    // the metadata alone loads and runs
    let model = Model::load(&path, &Device::Cpu).unwrap();
    assert_eq!(
        model.logits(&[vec![2, 7, 9]], false).unwrap().dims(),
        [1, 3, 512]
    );
}

#[test]
fn a_truncated_gguf_names_the_file() {
    let bytes = std::fs::read(repo("tests/fixtures/tiny-gemma3-gguf/model-q8_0.gguf")).unwrap();
    let path = std::env::temp_dir().join(format!("rlvr-truncated-{}.gguf", std::process::id()));
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let err = Model::load(&path, &Device::Cpu).unwrap_err().to_string();
    assert!(err.contains(&path.display().to_string()), "{err}");
}

#[test]
fn a_q8_0_gguf_keeps_its_blocks_and_trains_as_its_dequantized_weights() {
    use rlvr::model::frozen::FrozenWeight;
    use rlvr::model::lora::{self, LoraConfig};
    let (config, _, ids) = setup();
    let path = repo("tests/fixtures/tiny-gemma3-gguf/model-q8_0.gguf");
    let mut blocks = gguf::load(&path, Some(&config), &Device::Cpu).unwrap();
    assert!(matches!(blocks.lm_head(), FrozenWeight::Blocks(_)));
    // the same model with every linear layer's weight dequantized to an f32 tensor
    let mut dense = blocks.clone();
    for (name, linear) in dense.linears_mut() {
        assert!(matches!(linear.weight, FrozenWeight::Blocks(_)), "{name}");
        linear.weight = FrozenWeight::Tensor(linear.weight.to_tensor().unwrap());
    }
    let diff = max_abs_diff(
        &blocks.logits(&ids, false).unwrap(),
        &dense.logits(&ids, false).unwrap(),
    );
    assert!(diff <= 1e-4, "max |Δlogit| = {diff}");
    let adapters = LoraConfig {
        rank: 4,
        alpha: 8.0,
        seed: 3,
        ..LoraConfig::default()
    };
    let mut grads = Vec::new();
    for model in [&mut blocks, &mut dense] {
        lora::attach(model, &adapters).unwrap();
        for (_, var) in lora::variables(model) {
            // B non-zero, so that A's gradient is too
            if var.dims()[1] == 4 {
                lora::set(&var, &(var.ones_like().unwrap() * 0.01).unwrap()).unwrap();
            }
        }
        let loss = model
            .completion_logprobs(&ids[0][..6], &ids[0][6..], true)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap();
        let g = loss.backward().unwrap();
        let vars = lora::variables(model);
        grads.push(
            vars.iter()
                .map(|(name, v)| (name.clone(), g.get(v).expect("a gradient").clone()))
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(grads[0].len(), 56);
    for ((name, a), (_, b)) in grads[0].iter().zip(&grads[1]) {
        let scale = b
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = max_abs_diff(a, b);
        assert!(
            diff <= 1e-4 * (1.0 + scale),
            "{name}: {diff} (scale {scale})"
        );
    }
}
