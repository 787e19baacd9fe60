//! Merging an adapter and exporting a Hugging Face directory: the exported folder loads
//! back through `Model::load` and gives the logits of base + adapter, for each
//! architecture (Gemma's `1 + w` norms, Llama's separate head, Qwen2's biases) and for a
//! model loaded from GGUF (norms stored as `1 + w` there).

use candle_core::Device;
use rlvr::model::lm::LanguageModel;
use rlvr::model::{export, gguf, lora, Model};
use serde_json::Value;

use crate::{max_abs_diff, repo};

fn temp(tag: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("rlvr-export-{tag}-{}", std::process::id()))
}

fn rows() -> Vec<Vec<u32>> {
    vec![
        vec![2, 17, 301, 44, 9, 120, 77, 5],
        vec![2, 400, 3, 19, 88, 2, 250, 6],
    ]
}

fn check_round_trip(mut model: Model, adapter: &str, tag: &str) {
    lora::load_peft(&mut model, &repo(adapter)).unwrap();
    let tuned = model.logits(&rows(), true).unwrap();
    let base = model.logits(&rows(), false).unwrap();
    assert!(
        max_abs_diff(&tuned, &base) > 1e-3,
        "the adapter changes the output, so merging is tested"
    );
    let dir = temp(tag);
    export::save_hf(&model, None, &dir).unwrap();
    let merged = Model::load(&dir, &Device::Cpu).unwrap();
    let diff = max_abs_diff(&merged.logits(&rows(), false).unwrap(), &tuned);
    assert!(diff <= 1e-4, "{tag}: max |Δlogit| = {diff}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn merged_exports_give_base_plus_adapter_logits() {
    for arch in ["tiny-gemma3", "tiny-llama", "tiny-qwen2"] {
        let model =
            Model::from_hf_dir(&repo(&format!("tests/fixtures/{arch}")), &Device::Cpu).unwrap();
        check_round_trip(model, &format!("tests/fixtures/{arch}/adapter"), arch);
    }
}

#[test]
fn a_gguf_model_exports_with_hugging_face_norms() {
    let config: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("tests/fixtures/tiny-gemma3/config.json")).unwrap(),
    )
    .unwrap();
    let path = repo("tests/fixtures/tiny-gemma3-gguf/model-f32.gguf");
    let model = gguf::load(&path, Some(&config), &Device::Cpu).unwrap();
    check_round_trip(model, "tests/fixtures/tiny-gemma3/adapter", "gguf");
}

#[test]
fn the_exported_folder_is_what_transformers_reads() {
    let lm = LanguageModel::load(
        &repo("tests/fixtures/tiny-gemma3"),
        Some(&repo("tests/fixtures/tiny-tokenizer/tokenizer.json")),
        &Device::Cpu,
    )
    .unwrap()
    .load_adapter(&repo("tests/fixtures/tiny-gemma3/adapter"))
    .unwrap();
    let dir = temp("folder");
    lm.merge_and_save(&dir).unwrap();
    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        assert!(dir.join(file).is_file(), "{file}");
    }
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "Gemma3ForCausalLM");
    assert_eq!(config["layer_types"][2], "full_attention");
    let tensors =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let original = candle_core::safetensors::load(
        repo("tests/fixtures/tiny-gemma3/model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    let mut expected: Vec<&String> = original.keys().collect();
    names.sort();
    expected.sort();
    assert_eq!(names, expected, "the tensor names of save_pretrained");
    let norm = "model.layers.0.input_layernorm.weight";
    assert!(
        max_abs_diff(&tensors[norm], &original[norm]) < 1e-6,
        "norms as w, not 1 + w"
    );
    // the tokenizer came along: the folder loads as a language model
    let back = LanguageModel::load(&dir, None, &Device::Cpu).unwrap();
    let (a, b) = (
        back.logprob("The patient", " has").unwrap(),
        lm.logprob("The patient", " has").unwrap(),
    );
    assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    std::fs::remove_dir_all(&dir).unwrap();
}
