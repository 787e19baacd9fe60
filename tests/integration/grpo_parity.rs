//! GRPO against TRL 1.16 (`reference/make_grpo_fixtures.py`): the loss and its gradient for
//! every loss type and β, the advantages for every reward scaling, and the LoRA gradients of
//! the tiny Gemma 3 model through the whole loss; then, on padded batches of unequal lengths,
//! every loss type of TRL 1.16 with its knobs (importance-sampling level, δ, the entropy mask
//! and bonus, the off-policy mask, the mismatch correction), TRL's metrics, both
//! multi-objective aggregations, and the LoRA gradients of the new losses with prompts of
//! unequal lengths.

use std::collections::HashMap;

use candle_core::{Device, Tensor, Var};
use rlvr::grpo::loss::{
    self, Aggregation, Correction, CorrectionMode, ImportanceSampling, LossInputs, LossSettings,
    LossType, ScaleRewards, Vespo,
};
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
            ..LossSettings::default()
        };
        let logps = Var::from_tensor(&t["logps"]).unwrap();
        let (value, _) = loss::loss(
            &LossInputs {
                logps: logps.as_tensor(),
                old: &t["old"],
                ref_logps: Some(&t["ref"]),
                adv: &t["adv"],
                mask: &t["mask"],
                entropies: None,
                sampling_logps: None,
                is_ratio: None,
            },
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
        ..LossSettings::default()
    };
    let old = logps.detach();
    let (value, _) = loss::loss(
        &LossInputs {
            logps: &logps,
            old: &old,
            ref_logps: Some(&reference),
            adv: &adv,
            mask: &mask,
            entropies: None,
            sampling_logps: None,
            is_ratio: None,
        },
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

/// A case's settings: the fixture's defaults, then the GRPOConfig fields it names (TRL's
/// names and defaults).
fn settings_of(case: &Value, meta: &Value, width: usize, batch_tokens: f64) -> LossSettings {
    let f = |key: &str, default: f64| case.get(key).and_then(Value::as_f64).unwrap_or(default);
    let v = Vespo::default();
    LossSettings {
        loss_type: LossType::by_name(case["loss_type"].as_str().unwrap()).unwrap(),
        importance_sampling_level: ImportanceSampling::by_name(
            case.get("importance_sampling_level")
                .and_then(Value::as_str)
                .unwrap_or("token"),
        )
        .unwrap(),
        epsilon_low: f("epsilon_low", meta["epsilon_low"].as_f64().unwrap()),
        epsilon_high: f("epsilon_high", meta["epsilon_high"].as_f64().unwrap()),
        delta: case.get("delta").and_then(Value::as_f64),
        sapo_temperature_pos: f("sapo_temperature_pos", 1.0),
        sapo_temperature_neg: f("sapo_temperature_neg", 1.05),
        vespo: Vespo {
            k_pos: f("vespo_k_pos", v.k_pos),
            lambda_pos: f("vespo_lambda_pos", v.lambda_pos),
            k_neg: f("vespo_k_neg", v.k_neg),
            lambda_neg: f("vespo_lambda_neg", v.lambda_neg),
        },
        beta: f("beta", 0.0),
        use_bias_correction_kl: true,
        top_entropy_quantile: f("top_entropy_quantile", 1.0),
        entropy_coef: f("entropy_coef", 0.0),
        off_policy_mask_threshold: case
            .get("off_policy_mask_threshold")
            .and_then(Value::as_f64),
        grad_accum: meta.get("grad_accum").and_then(Value::as_u64).unwrap_or(1) as usize,
        max_completion_length: width,
        batch_tokens,
    }
}

fn close(got: f64, expected: f64, tol: f64, what: &str) {
    assert!(
        (got - expected).abs() <= tol,
        "{what}: {got} vs TRL {expected}"
    );
}

#[test]
fn every_trl_loss_and_knob_equals_trl_on_a_padded_batch_of_unequal_lengths() {
    let (t, meta) = fixture("loss_cases");
    let width = meta["max_completion_length"].as_u64().unwrap() as usize;
    let batch_tokens = meta["batch_tokens"].as_f64().unwrap();
    let cases = meta["cases"].as_array().unwrap();
    assert!(cases.len() >= 50);
    for case in cases {
        let i = case["index"].as_u64().unwrap();
        let s = settings_of(case, &meta, width, batch_tokens);
        let what = format!("case {i} ({case})");
        let logps = Var::from_tensor(&t["logps"]).unwrap();
        let entropies = Var::from_tensor(&t["entropies"]).unwrap();
        let ratio = case
            .get("vllm_importance_sampling_mode")
            .and_then(Value::as_str)
            .map(|mode| {
                let c = Correction {
                    mode: CorrectionMode::by_name(mode).unwrap(),
                    clip_min: case["vllm_importance_sampling_clip_min"].as_f64(),
                    clip_max: case["vllm_importance_sampling_clip_max"].as_f64(),
                };
                let (ratio, _) =
                    loss::sampling_correction(&t["old"], &t["sampling"], &t["mask"], &c).unwrap();
                let diff = max_abs_diff(&ratio, &t[&format!("ratio_{i}")]);
                assert!(diff < 1e-5, "{what}: correction ratio differs by {diff}");
                ratio
            });
        let off_policy_sampling =
            case["sampling"].as_bool().unwrap_or(true) && s.off_policy_mask_threshold.is_some();
        let (value, stats) = loss::loss(
            &LossInputs {
                logps: logps.as_tensor(),
                old: &t["old"],
                ref_logps: Some(&t["ref"]),
                adv: &t["adv"],
                mask: &t["mask"],
                entropies: Some(entropies.as_tensor()),
                sampling_logps: off_policy_sampling.then(|| &t["sampling"]),
                is_ratio: ratio.as_ref(),
            },
            &s,
        )
        .unwrap();
        close(
            value.to_scalar::<f32>().unwrap() as f64,
            case["loss"].as_f64().unwrap(),
            1e-5,
            &format!("{what}: loss"),
        );
        let m = &case["metrics"];
        let metric = |key: &str, got: f64| {
            if let Some(expected) = m.get(key).and_then(Value::as_f64) {
                close(got, expected, 1e-5, &format!("{what}: {key}"));
            }
        };
        metric("kl", stats.kl);
        metric("entropy", stats.entropy);
        metric("clip_ratio/low_mean", stats.clip_low);
        metric("clip_ratio/high_mean", stats.clip_high);
        metric("clip_ratio/region_mean", stats.clip_region);
        metric("cispo_clip_ratio", stats.clip_region);
        metric("vespo/phi_seq_mean", stats.phi_seq);
        metric("policy_loss", stats.loss);
        let grads = value.backward().unwrap();
        let diff = max_abs_diff(
            grads.get(logps.as_tensor()).unwrap(),
            &t[&format!("grad_{i}")],
        );
        assert!(diff < 1e-5, "{what}: gradient differs by {diff}");
        let key = format!("grad_entropy_{i}");
        match (grads.get(entropies.as_tensor()), t.get(&key)) {
            (Some(g), Some(expected)) => {
                let diff = max_abs_diff(g, expected);
                assert!(diff < 1e-6, "{what}: entropy gradient differs by {diff}");
            }
            (None, None) => {}
            (g, e) => panic!(
                "{what}: entropy gradient here {}, in TRL {}",
                g.is_some(),
                e.is_some()
            ),
        }
    }
}

#[test]
fn the_mismatch_correction_equals_trl_in_every_mode() {
    let (t, meta) = fixture("loss_cases");
    for c in meta["corrections"].as_array().unwrap() {
        let mode = c["mode"].as_str().unwrap();
        let settings = Correction {
            mode: CorrectionMode::by_name(mode).unwrap(),
            clip_min: c["clip_min"].as_f64(),
            clip_max: c["clip_max"].as_f64(),
        };
        let (ratio, mismatch) =
            loss::sampling_correction(&t["old"], &t["sampling"], &t["mask"], &settings).unwrap();
        let diff = max_abs_diff(&ratio, &t[&format!("correction_{mode}")]);
        assert!(diff < 1e-5, "{mode}: ratio differs by {diff}");
        let m = &c["metrics"];
        for (key, got) in [
            ("logp_diff_mean", mismatch.logp_diff_mean),
            ("logp_diff_max", mismatch.logp_diff_max),
            ("ratio_min", mismatch.ratio_min),
            ("ratio_mean", mismatch.ratio_mean),
            ("ratio_max", mismatch.ratio_max),
        ] {
            close(
                got,
                m[key].as_f64().unwrap(),
                1e-5,
                &format!("{mode}: {key}"),
            );
        }
    }
    // local rollouts: the sampler's log-probs are the trainer's, nothing is corrected
    let (ratio, mismatch) =
        loss::sampling_correction(&t["old"], &t["old"], &t["mask"], &Correction::default())
            .unwrap();
    assert_eq!(mismatch.logp_diff_mean, 0.0);
    assert_eq!(mismatch.logp_diff_max, 0.0);
    assert_eq!(
        ratio
            .flatten_all()
            .unwrap()
            .min(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
        1.0
    );
}

#[test]
fn both_multi_objective_aggregations_and_reward_moments_equal_trl() {
    let (t, meta) = fixture("loss_cases");
    let per_func: Vec<Vec<f64>> = t["rewards_per_func"]
        .to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(f64::from).collect())
        .collect();
    let weights: Vec<f64> = t["reward_weights"]
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect();
    let group = meta["group"].as_u64().unwrap() as usize;
    for a in meta["aggregations"].as_array().unwrap() {
        let aggregation = Aggregation::by_name(a["aggregation"].as_str().unwrap()).unwrap();
        let scale = ScaleRewards::by_name(a["scale_rewards"].as_str().unwrap()).unwrap();
        let (adv, zero) =
            loss::aggregate_advantages(&per_func, &weights, group, scale, 1e-4, aggregation);
        let key = a["key"].as_str().unwrap();
        let expected = t[key].to_vec1::<f32>().unwrap();
        for (got, e) in adv.iter().zip(&expected) {
            assert!(
                (*got as f32 - e).abs() < 1e-5,
                "{key}: {adv:?} vs {expected:?}"
            );
        }
        let zero_expected = t[&key.replace("adv_", "zero_")].to_vec1::<f32>().unwrap();
        let zero_got: Vec<f32> = zero.iter().map(|&z| f32::from(u8::from(z))).collect();
        assert_eq!(zero_got, zero_expected, "{key}: zero-std flags");
    }
    let moments = loss::reward_moments(&per_func, weights.len());
    for (k, (got, expected)) in moments
        .iter()
        .zip(meta["reward_moments"].as_array().unwrap())
        .enumerate()
    {
        close(
            got.0,
            expected[0].as_f64().unwrap(),
            1e-6,
            &format!("reward {k} mean"),
        );
        close(
            got.1,
            expected[1].as_f64().unwrap(),
            1e-6,
            &format!("reward {k} std"),
        );
    }
}

#[test]
fn lora_gradients_of_the_new_losses_with_unequal_prompts_equal_torch() {
    let (t, meta) = fixture("lora_cases");
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
    let reference = policy
        .model
        .pair_logprobs(&pairs, false, temperature)
        .unwrap()
        .detach();
    let tokens = mask.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    for case in meta["cases"].as_array().unwrap() {
        let i = case["index"].as_u64().unwrap();
        let s = settings_of(case, &meta, width, tokens);
        let (logps, entropies) = policy
            .model
            .pair_logprobs_entropy(&pairs, true, temperature, s.entropy_coef != 0.0)
            .unwrap();
        let diff = max_abs_diff(&logps, &t["logps"]);
        assert!(diff < 1e-4, "case {i}: log-probs differ by {diff}");
        let diff = max_abs_diff(&entropies, &t["entropies"]);
        assert!(diff < 1e-4, "case {i}: entropies differ by {diff}");
        let (value, _) = loss::loss(
            &LossInputs {
                logps: &logps,
                old: &t["old"],
                ref_logps: Some(&reference),
                adv: &adv,
                mask: &mask,
                entropies: Some(&entropies),
                sampling_logps: None,
                is_ratio: None,
            },
            &s,
        )
        .unwrap();
        close(
            value.to_scalar::<f32>().unwrap() as f64,
            case["loss"].as_f64().unwrap(),
            1e-4,
            &format!("case {i} ({case}): loss"),
        );
        let grads = value.backward().unwrap();
        for (name, var) in lora::variables(&mut policy.model) {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("case {i}: no gradient for {name}"));
            let expected = &t[&format!("{i}/{name}")];
            let scale = super::max_abs(expected).max(1e-6);
            let diff = max_abs_diff(g, expected);
            assert!(
                diff / scale < 1e-3 && diff < 1e-4,
                "case {i} ({case}): {name}: gradient differs by {diff} (scale {scale})"
            );
        }
    }
}
