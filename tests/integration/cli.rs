//! The `rlvr` binary: `run` with `--set`, errors with file:line:col, `doc`, `--version`.

use std::process::{Command, Output};

use crate::repo;

fn rlvr(args: &[&str]) -> Output {
    crate::rlvr(args).output().expect("the rlvr binary runs")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn run_executes_a_script_with_params() {
    let out_dir = std::env::temp_dir().join(format!("rlvr-cli-{}", std::process::id()));
    let out_set = format!("out={}", out_dir.display());
    let out = rlvr(&[
        "run",
        "tests/scripts/tables.rhai",
        "--set",
        "n=32",
        "--set",
        "seed=7",
        "--set",
        &out_set,
        "--set",
        "label=plain text",
    ]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    assert!(stdout.contains("label=plain text"), "{stdout}");
    assert!(stdout.contains("professional_medicine"), "{stdout}");
    assert!(out_dir.join("both.parquet").is_file());
}

#[test]
fn run_drives_a_model_from_a_script() {
    let out_dir = std::env::temp_dir().join(format!("rlvr-cli-model-{}", std::process::id()));
    let out_set = format!("out={}", out_dir.display());
    let out = rlvr(&["run", "tests/scripts/model.rhai", "--set", &out_set]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    assert!(stdout.contains("greedy: "), "{stdout}");
    assert!(stdout.contains("LoRA r=4"), "{stdout}");
    assert!(out_dir.join("adapter/adapter_model.safetensors").is_file());
    assert!(out_dir.join("adapter/adapter_config.json").is_file());
    assert!(stdout.contains("stopped: "), "{stdout}");
    assert!(out_dir.join("merged/model.safetensors").is_file());
    // `--set out=` is the run folder; the saved adapter's files are hashed in its manifest.
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("manifest.json")).unwrap())
            .unwrap();
    let key = format!("adapter {}/adapter", out_dir.display());
    let files = manifest["notes"][&key]["files"].as_array().unwrap();
    assert_eq!(files.len(), 2, "{manifest}");
    assert!(files
        .iter()
        .all(|f| f["sha256"].as_str().unwrap().len() == 64));
}

#[test]
fn run_trains_with_grpo_from_a_script() {
    let scratch = std::env::temp_dir().join(format!("rlvr-cli-grpo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let out_set = format!("out={}", scratch.join("out").display());
    let out = Command::new(env!("CARGO_BIN_EXE_rlvr"))
        .args(["run", "tests/scripts/grpo.rhai", "--set", &out_set])
        .current_dir(repo(""))
        .env("RLVR_HOME", scratch.join("home"))
        .output()
        .expect("the rlvr binary runs");
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    assert!(stdout.contains("completions: 16"), "{stdout}");
    assert!(stdout.contains("reward_custom1"), "{stdout}");
    let adapter = scratch.join("out/adapter");
    assert!(adapter.join("adapter_model.safetensors").is_file());
    let config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(adapter.join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(config["peft_type"], "LORA");
    assert_eq!(config["r"], 4);
    let _ = std::fs::remove_dir_all(&scratch);
}

#[test]
fn script_errors_name_file_line_and_column_and_exit_non_zero() {
    let run_dir = std::env::temp_dir().join(format!("rlvr-cli-error-{}", std::process::id()));
    let out = rlvr(&[
        "run",
        "tests/scripts/error.rhai",
        "--out",
        run_dir.to_str().unwrap(),
    ]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("tests/scripts/error.rhai:4:12"), "{stderr}");
    assert!(
        stderr.contains("medqa_malformed.jsonl: line 2: malformed JSON"),
        "{stderr}"
    );
    assert!(stderr.contains("let pool = load("), "{stderr}");
}

#[test]
fn a_missing_folder_is_named_once_with_its_cause_once() {
    let out = rlvr(&["bench", "load", "--data", "/no/such/benchmarks"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(stderr.contains("/no/such/benchmarks/mmlu"), "{stderr}");
    assert_eq!(
        stderr.matches("no such file or directory").count(),
        1,
        "{stderr}"
    );
}

#[test]
fn a_missing_script_is_an_error() {
    let out = rlvr(&["run", "tests/scripts/no_such.rhai"]);
    assert!(!out.status.success());
    assert!(text(&out.stderr).contains("no_such.rhai"));
}

#[test]
fn doc_lists_every_registered_function_and_matches_the_checked_in_reference() {
    let out = rlvr(&["doc"]);
    assert!(out.status.success());
    let doc = text(&out.stdout);
    let session = rlvr::script::Session::new(
        std::sync::Arc::new(rlvr::script::StdOutput::default()),
        rhai::Map::new(),
    );
    let signatures = session.engine().gen_fn_signatures(false);
    assert!(signatures.len() > 15);
    for signature in signatures {
        let name = signature.split('(').next().unwrap();
        if name.starts_with("to_") {
            continue;
        }
        assert!(
            doc.contains(&format!("### `{name}(")),
            "{name} missing from rlvr doc"
        );
    }
    let checked_in = std::fs::read_to_string(repo("docs/reference.md")).unwrap();
    assert!(
        checked_in == doc,
        "docs/reference.md is stale: run `rlvr doc --out docs/reference.md`"
    );
}

#[test]
fn repl_keeps_one_scope_and_reads_multi_line_input() {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_rlvr"))
        .arg("repl")
        .current_dir(repo(""))
        .env(
            "RLVR_HOME",
            std::env::temp_dir().join(format!("rlvr-repl-{}", std::process::id())),
        )
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"let x = 40;\nfn add(a) {\n  a + 2\n}\nadd(x)\nload(\"mmlu\", \"data/samples/mmlu\").len()\nnope(\n)\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success());
    assert!(stdout.contains("42"), "{stdout}");
    assert!(stdout.contains("570"), "{stdout}");
    assert!(
        text(&out.stderr).contains("nope"),
        "errors go to stderr and the REPL goes on"
    );
}

#[test]
fn version_is_printed() {
    let out = rlvr(&["--version"]);
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("rlvr {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn run_evaluates_a_base_and_an_adapted_model_from_a_script() {
    let out = rlvr(&["run", "tests/scripts/eval.rhai"]);
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        text(&out.stderr)
    );
    assert!(
        stdout.contains("evaluated 30 questions twice; 10 compared rows"),
        "{stdout}"
    );
    assert!(stdout.contains("gsm8k_cot"), "{stdout}");
}

#[test]
fn the_quickstart_runs_end_to_end_on_the_tiny_model() {
    // the tiny Gemma 3 fixture with the tiny tokenizer beside it, as a model folder
    let dir = std::env::temp_dir().join(format!("rlvr-quickstart-{}", std::process::id()));
    let model = dir.join("model");
    std::fs::create_dir_all(&model).unwrap();
    for f in [
        "tests/fixtures/tiny-gemma3/config.json",
        "tests/fixtures/tiny-gemma3/model.safetensors",
        "tests/fixtures/tiny-tokenizer/tokenizer.json",
        "tests/fixtures/tiny-tokenizer/tokenizer_config.json",
    ] {
        let from = repo(f);
        std::fs::copy(&from, model.join(from.file_name().unwrap())).unwrap();
    }
    let out = dir.join("run");
    let output = Command::new(env!("CARGO_BIN_EXE_rlvr"))
        .current_dir(repo(""))
        .env("RLVR_HOME", dir.join("home"))
        .args(["run", "scripts/quickstart.rhai", "--quiet", "--out"])
        .arg(&out)
        .args(["--set", &format!("model={}", model.display())])
        .args([
            "--set",
            "pool=4",
            "--set",
            "train=2",
            "--set",
            "steps=1",
            "--set",
            "held_out=4",
            "--set",
            "warmup=4",
            "--set",
            "warmup_steps=2",
        ])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", text(&output.stderr));
    for chart in ["accuracy.png", "training.png", "pass_rates.png"] {
        let png = std::fs::read(out.join(chart)).unwrap();
        assert!(png.starts_with(b"\x89PNG") && png.len() > 10_000, "{chart}");
    }
    let stdout = text(&output.stdout);
    assert!(stdout.contains("Format warm-up: 2 steps"), "{stdout}");
    assert!(
        stdout.contains("Mean reward, random set: first pass"),
        "{stdout}"
    );
    assert!(out
        .join("adapter-warmup/adapter_model.safetensors")
        .is_file());
    assert!(out
        .join("adapter-filtered/adapter_model.safetensors")
        .is_file());
    let csv = std::fs::read_to_string(out.join("accuracy.csv")).unwrap();
    for label in ["base", "warm-up", "random", "filtered"] {
        assert!(csv.contains(label), "{csv}");
    }
}
