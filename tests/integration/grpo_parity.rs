//! GRPO against TRL 1.16 (`reference/make_grpo_fixtures.py`): the loss and its gradient for
//! every loss type and β, the advantages for every reward scaling, and the LoRA gradients of
//! the tiny Gemma 3 model through the whole loss.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use rlvr::grpo::loss::{self, LossSettings, LossType, ScaleRewards};
use rlvr::model::lm::LanguageModel;
use rlvr::model::lora;
use serde_json::Value;

use super::{max_abs_diff, repo};

fn fixture(name: &str) -> (HashMap<String, Tensor>, Value) {
    let dir = repo("tests/fixtures/grpo");
    let tensors =
        candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)
            .unwrap();
    let meta =
        serde_json::from_str(&std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap())
            .unwrap();
    (tensors, meta)
}

/// The tiny Gemma 3 model with the fixtures' adapter attached.
fn tiny_policy() -> LanguageModel {
    let base = LanguageModel::load(
        &repo("tests/fixtures/tiny-gemma3"),
        Some(&repo("tests/fixtures/tiny-tokenizer/tokenizer.json")),
        &Device::Cpu,
    )
    .unwrap();
    base.load_adapter(&repo("tests/fixtures/tiny-gemma3/adapter"))
        .unwrap()
}

#[test]
fn advantages_equal_trl_for_every_scaling() {
    let (t, meta) = fixture("losses");
    let rewards: Vec<f64> = t["rewards"]
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&r| r as f64)
        .collect();
    let group = meta["group"].as_u64().unwrap() as usize;
    for scale in ["group", "batch", "none"] {
        let (adv, _) =
            loss::advantages(&rewards, group, ScaleRewards::by_name(scale).unwrap(), 1e-4);
        let expected = t[&format!("adv_{scale}")].to_vec1::<f32>().unwrap();
        for (a, e) in adv.iter().zip(&expected) {
            assert!(
                (*a as f32 - e).abs() < 1e-5,
                "{scale}: {adv:?} vs {expected:?}"
            );
        }
    }
}

#[test]
fn loss_and_its_gradient_equal_trl_for_every_loss_type_and_beta() {
    let (t, meta) = fixture("losses");
    for case in meta["cases"].as_array().unwrap() {
        let loss_type = LossType::by_name(case["loss_type"].as_str().unwrap()).unwrap();
        let beta = case["beta"].as_f64().unwrap();
        let settings = LossSettings {
            loss_type,
            epsilon_low: meta["epsilon_low"].as_f64().unwrap(),
            epsilon_high: meta["epsilon_high"].as_f64().unwrap(),
            beta,
            grad_accum: meta["grad_accum"].as_u64().unwrap() as usize,
            max_completion_length: meta["max_completion_length"].as_u64().unwrap() as usize,
            batch_tokens: meta["batch_tokens"].as_f64().unwrap(),
        };
        let logps = Var::from_tensor(&t["logps"]).unwrap();
        let (value, _) = loss::loss(
            logps.as_tensor(),
            &t["old"],
            Some(&t["ref"]),
            &t["adv"],
            &t["mask"],
            &settings,
        )
        .unwrap();
        let key = case["key"].as_str().unwrap();
        let expected = case["loss"].as_f64().unwrap();
        let got = value.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (got - expected).abs() < 1e-5,
            "{key}: loss {got} vs TRL {expected}"
        );
        let grads = value.backward().unwrap();
        let grad = grads.get(logps.as_tensor()).unwrap();
        let diff = max_abs_diff(grad, &t[&format!("grad_{key}")]);
        assert!(diff < 1e-5, "{key}: gradient differs by {diff}");
    }
}

#[test]
fn lora_gradients_through_the_tiny_model_equal_torch() {
    let (t, meta) = fixture("lora_grads");
    let mut policy = tiny_policy();
    let ids = |key: &str| -> Vec<Vec<u32>> {
        meta[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_u64().unwrap() as u32)
                    .collect()
            })
            .collect()
    };
    let prompts = ids("prompts");
    let completions = ids("completions");
    let pairs: Vec<(&[u32], &[u32])> = prompts
        .iter()
        .zip(&completions)
        .map(|(p, c)| (p.as_slice(), c.as_slice()))
        .collect();
    let temperature = meta["temperature"].as_f64().unwrap();
    let logps = policy
        .model
        .pair_logprobs(&pairs, true, temperature)
        .unwrap();
    let diff = max_abs_diff(&logps, &t["logps"]);
    assert!(diff < 1e-4, "per-token log-probs differ by {diff}");
    let reference = policy
        .model
        .pair_logprobs(&pairs, false, temperature)
        .unwrap()
        .detach();
    let width = completions.iter().map(Vec::len).max().unwrap();
    let mask: Vec<f32> = completions
        .iter()
        .flat_map(|c| (0..width).map(move |i| if i < c.len() { 1.0 } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (completions.len(), width), &Device::Cpu).unwrap();
    let adv: Vec<f32> = meta["advantages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let adv = Tensor::new(adv.as_slice(), &Device::Cpu).unwrap();
    let settings = LossSettings {
        loss_type: LossType::Dapo,
        epsilon_low: meta["epsilon_low"].as_f64().unwrap(),
        epsilon_high: meta["epsilon_high"].as_f64().unwrap(),
        beta: meta["beta"].as_f64().unwrap(),
        grad_accum: 1,
        max_completion_length: width,
        batch_tokens: mask.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64,
    };
    let (value, _) = loss::loss(
        &logps,
        &logps.detach(),
        Some(&reference),
        &adv,
        &mask,
        &settings,
    )
    .unwrap();
    let expected = meta["loss"].as_f64().unwrap();
    let got = value.to_scalar::<f32>().unwrap() as f64;
    assert!(
        (got - expected).abs() < 1e-4,
        "loss {got} vs torch {expected}"
    );
    let grads = value.backward().unwrap();
    let vars = lora::variables(&mut policy.model);
    assert_eq!(vars.len(), t.len() - 1, "one gradient per LoRA tensor");
    for (name, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        let expected = &t[&name];
        let scale = super::max_abs(expected).max(1e-6);
        let diff = max_abs_diff(g, expected);
        assert!(
            diff / scale < 1e-3 && diff < 1e-4,
            "{name}: gradient differs by {diff} (scale {scale})"
        );
    }
}

#[test]
fn prompts_shared_by_a_group_run_once_with_the_same_logprobs_and_gradients() {
    let mut policy = tiny_policy();
    // two prompts of different lengths, longer than the sliding window (4), and groups of
    // completions of different lengths
    let (a, b): (Vec<u32>, Vec<u32>) = ((5..14).collect(), (20..25).collect());
    let completions: Vec<Vec<u32>> = vec![
        (30..36).collect(),
        vec![40, 41],
        (50..54).collect(),
        (60..63).collect(),
        vec![70],
    ];
    let prompts = [&a, &a, &a, &b, &b];
    let pairs: Vec<(&[u32], &[u32])> = prompts
        .iter()
        .zip(&completions)
        .map(|(p, c)| (p.as_slice(), c.as_slice()))
        .collect();
    let width = 6;
    let shared = policy.model.pair_logprobs(&pairs, true, 0.9).unwrap();
    assert_eq!(shared.dims(), &[5, width]);
    // each pair alone: no prompt repeats, one padded forward
    let alone: Vec<Tensor> = pairs
        .iter()
        .map(|pair| {
            let row = policy
                .model
                .pair_logprobs(std::slice::from_ref(pair), true, 0.9)
                .unwrap();
            row.pad_with_zeros(1, 0, width - pair.1.len()).unwrap()
        })
        .collect();
    let alone = Tensor::cat(&alone, 0).unwrap();
    let diff = max_abs_diff(&shared, &alone);
    assert!(diff < 1e-5, "log-probs differ by {diff}");
    let weights = Tensor::arange(0f32, (5 * width) as f32, &Device::Cpu)
        .unwrap()
        .reshape((5, width))
        .unwrap()
        .cos()
        .unwrap();
    let g_shared = (shared * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g_alone = (alone * &weights)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (name, var) in lora::variables(&mut policy.model) {
        let (s, a) = (
            g_shared.get(var.as_tensor()).unwrap(),
            g_alone.get(var.as_tensor()).unwrap(),
        );
        let scale = super::max_abs(a).max(1e-6);
        let diff = max_abs_diff(s, a);
        assert!(
            diff / scale < 1e-4,
            "{name}: gradient differs by {diff} (scale {scale})"
        );
    }
}
