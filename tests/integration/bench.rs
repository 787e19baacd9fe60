//! `rlvr bench grpo`: its report names the placement and preset it ran with; unknown presets
//! and devices are clear errors.

use std::process::{Command, Output};

use crate::repo;

fn bench_grpo(extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rlvr"))
        .args([
            "bench",
            "grpo",
            "--model",
            "tests/fixtures/tiny-gemma3",
            "--tokenizer",
            "tests/fixtures/tiny-tokenizer/tokenizer.json",
            "--group",
            "2",
            "--prompts",
            "1",
            "--max-tokens",
            "4",
        ])
        .args(extra)
        .current_dir(repo(""))
        .output()
        .expect("the rlvr binary runs")
}

#[test]
fn bench_grpo_reports_its_placement_and_preset() {
    let out = bench_grpo(&[
        "--preset",
        "open-medical-r1",
        "--device",
        "cpu",
        "--dtype",
        "f32",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: serde_json::Value =
        serde_json::from_str(stdout.lines().last().expect("a report line")).unwrap();
    assert_eq!(report["preset"], "open-medical-r1");
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["dtype"], "f32");
    assert_eq!(report["group"], 2);
    assert!(report["peak_gpu"].is_null(), "{report}");
    let steps = report["per_step"].as_array().unwrap();
    assert_eq!(steps.len(), 1);
    let len = steps[0]["completion_len"].as_f64().unwrap();
    assert!(len > 0.0 && len <= 4.0, "{report}");
}

#[test]
fn bench_grpo_refuses_an_unknown_preset_or_device() {
    let out = bench_grpo(&["--preset", "fastest"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("`fastest`") && stderr.contains("open-medical-r1"),
        "{stderr}"
    );
    let out = bench_grpo(&["--device", "cuda:0"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    if cfg!(feature = "cuda") {
        assert!(stderr.contains("cuda:0"), "{stderr}");
    } else {
        assert!(stderr.contains("built without CUDA support"), "{stderr}");
    }
    let out = bench_grpo(&["--device", "tpu"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("`tpu`"));
}
