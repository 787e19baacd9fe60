//! The bf16 path (the one a GPU runs) exercised on the CPU: tiny models of the real
//! architectures loaded in bf16 against transformers' f32 references: logits within a bf16
//! tolerance, the same greedy tokens where the f32 margin between the two best tokens
//! exceeds twice the bf16 error, f32 log-probabilities, and f32 LoRA weights whose gradients
//! stay close to torch's.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rlvr::model::{lora, Model, Placement};

use crate::{max_abs, max_abs_diff, repo};

const MODELS: [&str; 2] = ["tiny-gemma3", "tiny-llama"];

/// A logit may differ from the f32 one by this fraction of the largest |logit|.
const LOGIT_TOLERANCE: f32 = 0.025;

/// A LoRA gradient may differ from torch's f32 one by this fraction of its largest entry.
const GRAD_TOLERANCE: f32 = 0.1;

fn bf16_cpu() -> Placement {
    Placement::parse("cpu", Some("bf16")).unwrap()
}

fn load(name: &str) -> (Model, HashMap<String, Tensor>) {
    let dir = repo(&format!("tests/fixtures/{name}"));
    let model = Model::load_on(&dir, &bf16_cpu()).unwrap();
    let expected =
        candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
    (model, expected)
}

fn ids(expected: &HashMap<String, Tensor>, key: &str) -> Vec<Vec<u32>> {
    let t = &expected[key];
    let t = if t.rank() == 1 {
        t.unsqueeze(0).unwrap()
    } else {
        t.clone()
    };
    t.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap()
}

#[test]
fn bf16_weights_give_f32_logits_near_transformers() {
    for name in MODELS {
        let (model, expected) = load(name);
        let mut copy = model.clone();
        let (_, first) = copy.linears_mut().remove(0);
        assert_eq!(first.weight.dtype(), DType::BF16, "{name}: frozen weights");
        let logits = model.logits(&ids(&expected, "input_ids"), false).unwrap();
        assert_eq!(logits.dtype(), DType::F32, "{name}: logits");
        let want = &expected["logits"];
        let diff = max_abs_diff(&logits, want);
        let scale = max_abs(want);
        println!("{name}: max |Δlogit| = {diff} of {scale}");
        assert!(diff > 0.0, "{name}: the bf16 logits equal the f32 ones");
        assert!(
            diff <= LOGIT_TOLERANCE * scale,
            "{name}: max |Δlogit| = {diff} (largest |logit| {scale})"
        );
    }
}

#[test]
fn bf16_greedy_tokens_follow_f32_where_the_margin_allows() {
    let mut compared = 0;
    for name in MODELS {
        let (model, expected) = load(name);
        let dir = repo(&format!("tests/fixtures/{name}"));
        let reference = Model::from_hf_dir(&dir, &Device::Cpu).unwrap();
        let prompt = &ids(&expected, "greedy_prompt")[0];
        let want = &ids(&expected, "greedy")[0];
        // along transformers' greedy path, each step whose f32 margin between the best two
        // tokens exceeds twice that row's bf16 error must pick the same token in bf16
        let path: Vec<u32> = prompt.iter().chain(want).copied().collect();
        let f32_logits = reference
            .logits(std::slice::from_ref(&path), false)
            .unwrap();
        let bf16_logits = model.logits(&[path], false).unwrap();
        for (t, token) in want.iter().enumerate() {
            let at = |l: &Tensor| l.get(0).unwrap().get(prompt.len() - 1 + t).unwrap();
            let (f, b) = (at(&f32_logits), at(&bf16_logits));
            let error = max_abs_diff(&f, &b);
            let mut row: Vec<f32> = f.to_vec1().unwrap();
            row.sort_by(|a, b| b.total_cmp(a));
            if row[0] - row[1] > 2.0 * error {
                let got = b.argmax(0).unwrap().to_scalar::<u32>().unwrap();
                assert_eq!(got, *token, "{name}: step {t}");
                compared += 1;
            }
        }
    }
    println!("{compared} steps compared");
    assert!(compared >= 4, "only {compared} steps have a clear margin");
}

#[test]
fn bf16_lora_weights_stay_f32_and_their_gradients_match_torch() {
    for name in MODELS {
        let (mut model, expected) = load(name);
        lora::load_peft(&mut model, &repo(&format!("tests/fixtures/{name}/adapter"))).unwrap();
        let logprobs = model
            .completion_logprobs(
                &ids(&expected, "prompt_ids")[0],
                &ids(&expected, "completion_ids")[0],
                true,
            )
            .unwrap();
        assert_eq!(logprobs.dtype(), DType::F32, "{name}: log-probs");
        let loss = logprobs.sum_all().unwrap().neg().unwrap();
        let want_loss = expected["lora_loss"].to_scalar::<f32>().unwrap();
        let got_loss = loss.to_scalar::<f32>().unwrap();
        println!("{name}: loss {got_loss} vs f32 {want_loss}");
        assert!(
            (got_loss - want_loss).abs() <= LOGIT_TOLERANCE * want_loss.abs(),
            "{name}: loss {got_loss} vs {want_loss}"
        );
        let grads = loss.backward().unwrap();
        let vars = lora::variables(&mut model);
        assert_eq!(vars.len(), 56, "{name}");
        let mut worst = 0f32;
        for (key, var) in vars {
            assert_eq!(var.dtype(), DType::F32, "{name}: {key}");
            let got = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {key}"));
            assert_eq!(got.dtype(), DType::F32, "{name}: gradient of {key}");
            let want = &expected[&format!("grad.{key}")];
            let scale = max_abs(want);
            let diff = max_abs_diff(got, want);
            worst = worst.max(diff / scale);
            assert!(
                diff <= GRAD_TOLERANCE * scale,
                "{name}: {key}: max |Δgrad| = {diff} (scale {scale})"
            );
        }
        println!("{name}: worst relative |Δgrad| {worst}");
    }
}

#[test]
fn a_script_loads_a_model_in_bf16_and_a_gpu_needs_the_cuda_build() {
    let dir = std::env::temp_dir().join(format!("rlvr-bf16-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let script = dir.join("bf16.rhai");
    std::fs::write(
        &script,
        format!(
            r#"let m = model("{}", #{{ tokenizer: "{}", dtype: "bf16" }});
print(m.generate(["hello"], #{{ max_tokens: 3 }}).len());
"#,
            repo("tests/fixtures/tiny-llama").display(),
            repo("tests/fixtures/tiny-tokenizer/tokenizer.json").display()
        ),
    )
    .unwrap();
    let rlvr = |args: &[&str]| crate::rlvr(args).output().unwrap();
    let path = script.to_str().unwrap();
    let out = rlvr(&["run", path]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains('1'));
    let out = rlvr(&["run", path, "--device", "cuda:0"]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success());
    if cfg!(feature = "cuda") {
        assert!(stderr.contains("cuda:0"), "{stderr}");
    } else {
        assert!(stderr.contains("built without CUDA support"), "{stderr}");
    }
    let out = rlvr(&["run", path, "--dtype", "f8"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("`f8`"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn bf16_safetensors_stay_bf16_on_the_cpu_and_give_their_f32_values_logits() {
    use rlvr::model::frozen::FrozenWeight;
    let src = repo("tests/fixtures/tiny-gemma3");
    let tensors =
        candle_core::safetensors::load(src.join("model.safetensors"), &Device::Cpu).unwrap();
    let base = std::env::temp_dir().join(format!("rlvr-bf16-weights-{}", std::process::id()));
    let (as_bf16, as_f32) = (base.join("bf16"), base.join("f32"));
    for (dir, dtype) in [(&as_bf16, DType::BF16), (&as_f32, DType::F32)] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::copy(src.join("config.json"), dir.join("config.json")).unwrap();
        // the matrices rounded to bf16, stored as bf16 or as their f32 values
        let stored: HashMap<String, Tensor> = tensors
            .iter()
            .map(|(name, t)| {
                let t = match t.rank() {
                    2 => t.to_dtype(DType::BF16).unwrap().to_dtype(dtype).unwrap(),
                    _ => t.clone(),
                };
                (name.clone(), t)
            })
            .collect();
        candle_core::safetensors::save(&stored, dir.join("model.safetensors")).unwrap();
    }
    let kept = Model::load(&as_bf16, &Device::Cpu).unwrap();
    let widened = Model::load(&as_f32, &Device::Cpu).unwrap();
    std::fs::remove_dir_all(&base).unwrap();
    assert!(matches!(kept.lm_head(), FrozenWeight::Blocks(_)));
    assert!(matches!(widened.lm_head(), FrozenWeight::Tensor(_)));
    let ids = [vec![2u32, 7, 9, 100, 3], vec![5, 6, 7, 8, 9]];
    let diff = max_abs_diff(
        &kept.logits(&ids, false).unwrap(),
        &widened.logits(&ids, false).unwrap(),
    );
    assert!(diff <= 1e-4, "max |Δlogit| = {diff}");
}
