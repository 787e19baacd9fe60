//! GRPO on the tiny Gemma 3 fixture: it learns a toy verifiable task, and a run interrupted
//! and resumed ends with exactly the adapter of an uninterrupted run.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use candle_core::Device;
use rlvr::data::question::Question;
use rlvr::grpo::optim::Schedule;
use rlvr::grpo::{self, GrpoConfig, GrpoError};
use rlvr::model::lm::LanguageModel;
use rlvr::model::lora;
use rlvr::progress::{Cancel, Job, Progress};
use rlvr::prompt::PromptTemplate;
use rlvr::reward::Reward;

use super::{max_abs_diff, repo, tiny_policy};

fn toy_items() -> Vec<Question> {
    [
        "Say something.",
        "Write a word.",
        "Count to three.",
        "Name a colour.",
    ]
    .iter()
    .enumerate()
    .map(|(i, q)| Question {
        id: format!("toy/{i}"),
        question: q.to_string(),
        answer: "x".into(),
        ..Question::default()
    })
    .collect()
}

/// The share of a completion's characters that are ASCII letters or digits.
fn alphanumeric_share(text: &str) -> f64 {
    let n = text.chars().count();
    if n == 0 {
        return 0.0;
    }
    text.chars().filter(char::is_ascii_alphanumeric).count() as f64 / n as f64
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("rlvr-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn toy_config(steps: usize, cache: &str) -> GrpoConfig {
    let mut c = GrpoConfig {
        group: 8,
        batch: 8,
        grad_accum: 1,
        steps,
        lr: 2e-2,
        schedule: Schedule::Constant,
        template: PromptTemplate {
            system: None,
            user: "{question}".into(),
        },
        checkpoint_every: 2,
        cache_dir: scratch(cache),
        ..GrpoConfig::default()
    };
    c.sampling.max_tokens = 8;
    c
}

#[test]
fn mean_reward_rises_on_a_toy_task() {
    let mut policy = tiny_policy(1);
    let items = toy_items();
    let rewards = [Reward::custom("alnum", 1.0, |s| {
        Ok(alphanumeric_share(s.completion))
    })];
    let config = toy_config(40, "learn");
    let run = grpo::train(&mut policy, &items, &rewards, &config, &Job::silent()).unwrap();
    let reward: Vec<f64> = run
        .metrics
        .column("reward")
        .unwrap()
        .f64()
        .unwrap()
        .into_no_null_iter()
        .collect();
    assert_eq!(reward.len(), 40);
    let first = reward[..8].iter().sum::<f64>() / 8.0;
    let last = reward[32..].iter().sum::<f64>() / 8.0;
    assert!(
        last > first + 0.2,
        "mean reward should rise: first 8 steps {first:.3}, last 8 steps {last:.3}: {reward:.3?}"
    );
    assert_eq!(run.completions.height(), 40 * 8);
    assert!(run.metrics.column("reward_alnum").is_ok());
}

/// Cancels the run once `after` steps are done.
struct CancelAfter {
    after: u64,
    cancel: Cancel,
    updates: AtomicUsize,
}

impl Progress for CancelAfter {
    fn start(&self, _: &str, _: u64) {}
    fn update(&self, done: u64, _: &str) {
        self.updates.fetch_add(1, Ordering::SeqCst);
        if done >= self.after {
            self.cancel.cancel();
        }
    }
    fn finish(&self, _: &str) {}
}

fn adapter_values(policy: &mut LanguageModel) -> Vec<Vec<f32>> {
    lora::variables(&mut policy.model)
        .iter()
        .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
        .collect()
}

#[test]
fn a_resumed_run_equals_an_uninterrupted_one() {
    let items = toy_items();
    let rewards = [Reward::custom("alnum", 1.0, |s| {
        Ok(alphanumeric_share(s.completion))
    })];

    let mut whole = tiny_policy(7);
    let config = toy_config(4, "resume-whole");
    let uninterrupted = grpo::train(&mut whole, &items, &rewards, &config, &Job::silent()).unwrap();

    let config = toy_config(4, "resume-split");
    let cancel = Cancel::new();
    let job = Job {
        progress: Arc::new(CancelAfter {
            after: 2,
            cancel: cancel.clone(),
            updates: AtomicUsize::new(0),
        }),
        cancel,
    };
    let mut first = tiny_policy(7);
    match grpo::train(&mut first, &items, &rewards, &config, &job) {
        Err(GrpoError::Interrupted { step, .. }) => assert_eq!(step, 2),
        other => panic!("expected an interruption, got {other:?}"),
    }
    // a fresh process: the same starting adapter, the same settings
    let mut second = tiny_policy(7);
    let resumed = grpo::train(&mut second, &items, &rewards, &config, &Job::silent()).unwrap();
    assert_eq!(resumed.resumed_from, 2);
    assert_eq!(adapter_values(&mut second), adapter_values(&mut whole));
    let col = |df: &polars::prelude::DataFrame, c: &str| -> Vec<f64> {
        df.column(c)
            .unwrap()
            .f64()
            .unwrap()
            .into_no_null_iter()
            .collect()
    };
    assert_eq!(
        col(&resumed.metrics, "reward"),
        col(&uninterrupted.metrics, "reward")
    );
    assert_eq!(
        col(&resumed.metrics, "loss"),
        col(&uninterrupted.metrics, "loss")
    );
    assert_eq!(resumed.completions.height(), 4 * 8);
}

/// Local rollouts are sampled by the policy being trained: a staleness bound is refused,
/// naming the setting, before anything is sampled.
#[test]
fn local_rollouts_refuse_max_staleness() {
    let mut config = toy_config(2, "stale-local");
    config.max_staleness = 1;
    let mut policy = tiny_policy(7);
    let rewards = [Reward::custom("alnum", 1.0, |s| {
        Ok(alphanumeric_share(s.completion))
    })];
    match grpo::train(&mut policy, &toy_items(), &rewards, &config, &Job::silent()) {
        Err(GrpoError::Setup(message)) => assert!(
            message.contains("max_staleness 1") && message.contains("rollout: endpoint"),
            "{message}"
        ),
        other => panic!("expected a setup error, got {other:?}"),
    }
}

/// TRL 1.16's knobs together, with a synced reference adapter mixed in after every update
/// and two updates per step: a run stopped after two steps and resumed in a fresh process
/// equals the uninterrupted one (the reference is checkpointed), the synced reference
/// changes the KL from the second step on, and the metrics carry entropy, per-reward
/// standard deviations and a zero mismatch for local rollouts.
#[test]
fn trl_knobs_and_a_synced_reference_resume_exactly() {
    let items = toy_items();
    let rewards = [
        Reward::custom("alnum", 1.0, |s| Ok(alphanumeric_share(s.completion))),
        Reward::custom("short", 1.0, |s| Ok(1.0 / (1.0 + s.tokens as f64))),
    ];
    let knobs = |cache: &str, sync: bool| {
        let mut c = toy_config(4, cache);
        c.loss_type = grpo::loss::LossType::Sapo;
        c.importance_sampling_level = grpo::loss::ImportanceSampling::Sequence;
        c.multi_objective_aggregation = grpo::loss::Aggregation::NormalizeThenSum;
        c.reward_weights = Some(vec![1.0, 0.5]);
        c.num_iterations = 2;
        c.beta = 0.04;
        c.top_entropy_quantile = 0.5;
        c.entropy_coef = 0.01;
        c.off_policy_mask_threshold = Some(0.5);
        c.sync_ref_model = sync;
        c.ref_model_sync_steps = 1;
        c
    };
    let col = |df: &polars::prelude::DataFrame, c: &str| -> Vec<f64> {
        df.column(c)
            .unwrap()
            .f64()
            .unwrap()
            .into_no_null_iter()
            .collect()
    };
    let mut whole = tiny_policy(7);
    let config = knobs("knobs-whole", true);
    let uninterrupted = grpo::train(&mut whole, &items, &rewards, &config, &Job::silent()).unwrap();

    let config = knobs("knobs-split", true);
    let cancel = Cancel::new();
    let job = Job {
        progress: Arc::new(CancelAfter {
            after: 2,
            cancel: cancel.clone(),
            updates: AtomicUsize::new(0),
        }),
        cancel,
    };
    let mut first = tiny_policy(7);
    match grpo::train(&mut first, &items, &rewards, &config, &job) {
        Err(GrpoError::Interrupted { step, .. }) => assert_eq!(step, 2),
        other => panic!("expected an interruption, got {other:?}"),
    }
    let mut second = tiny_policy(7);
    let resumed = grpo::train(&mut second, &items, &rewards, &config, &Job::silent()).unwrap();
    assert_eq!(resumed.resumed_from, 2);
    assert_eq!(adapter_values(&mut second), adapter_values(&mut whole));
    for c in ["loss", "kl", "entropy"] {
        assert_eq!(
            col(&resumed.metrics, c),
            col(&uninterrupted.metrics, c),
            "{c}"
        );
    }
    let entropy = col(&uninterrupted.metrics, "entropy");
    assert!(entropy.iter().all(|&h| h > 0.0), "{entropy:?}");
    assert!(col(&uninterrupted.metrics, "logp_mismatch")
        .iter()
        .all(|&m| m == 0.0));
    assert_eq!(col(&uninterrupted.metrics, "reward_short_std").len(), 4);

    // the adapters-off reference: the same first step, another KL after it
    let mut plain = tiny_policy(7);
    let off = grpo::train(
        &mut plain,
        &items,
        &rewards,
        &knobs("knobs-off", false),
        &Job::silent(),
    )
    .unwrap();
    let (kl_sync, kl_off) = (col(&uninterrupted.metrics, "kl"), col(&off.metrics, "kl"));
    // a fresh adapter's B is 0: its copy is the adapters-off model
    assert!(
        (kl_sync[0] - kl_off[0]).abs() < 1e-7,
        "{kl_sync:?} vs {kl_off:?}"
    );
    assert!(
        kl_sync[1..]
            .iter()
            .zip(&kl_off[1..])
            .any(|(a, b)| (a - b).abs() > 1e-6),
        "{kl_sync:?} vs {kl_off:?}"
    );
    assert_ne!(
        uninterrupted.dir, off.dir,
        "the setting is part of the run's key"
    );
}

/// Where the adapter check keeps its files: `$RLVR_PEFT_CHECK_DIR` when set (for
/// `reference/check_grpo_adapter.py`, which loads them in PEFT), else a scratch folder.
fn peft_check_dir() -> PathBuf {
    match std::env::var_os("RLVR_PEFT_CHECK_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => scratch("peft-check"),
    }
}

#[test]
fn an_adapter_saved_after_grpo_reloads_with_equal_logits() {
    let mut policy = tiny_policy(11);
    let rewards = [Reward::custom("alnum", 1.0, |s| {
        Ok(alphanumeric_share(s.completion))
    })];
    let config = toy_config(3, "peft-train");
    grpo::train(&mut policy, &toy_items(), &rewards, &config, &Job::silent()).unwrap();

    let dir = peft_check_dir();
    policy.save_adapter(&dir.join("adapter")).unwrap();
    let encode = |t: &str| policy.tokenizer.encode(t).unwrap();
    let (a, b) = (
        encode("The patient has a fever and a cough."),
        encode("Which drug is given first for anaphylaxis?"),
    );
    let n = a.len().min(b.len());
    let rows = vec![a[..n].to_vec(), b[..n].to_vec()];
    let trained = policy.model.logits(&rows, true).unwrap();
    let base = policy.model.logits(&rows, false).unwrap();
    assert!(
        max_abs_diff(&trained, &base) > 1e-3,
        "three GRPO steps should move the logits"
    );
    let reloaded = policy.load_adapter(&dir.join("adapter")).unwrap();
    let again = reloaded.model.logits(&rows, true).unwrap();
    assert_eq!(max_abs_diff(&again, &trained), 0.0);

    let ids: Vec<i64> = rows.iter().flatten().map(|&i| i64::from(i)).collect();
    let tensors = std::collections::HashMap::from([
        (
            "input_ids".to_string(),
            candle_core::Tensor::from_vec(ids, (2, n), &Device::Cpu).unwrap(),
        ),
        ("logits".to_string(), trained),
        ("base_logits".to_string(), base),
    ]);
    candle_core::safetensors::save(&tensors, dir.join("logits.safetensors")).unwrap();
}

/// Runs `rlvr run` on `script` with `RLVR_HOME=home` and `out` (plus `--set` pairs).
fn rlvr_run(script: &Path, home: &Path, out: &Path, set: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_rlvr"));
    command
        .current_dir(repo(""))
        .env("RLVR_HOME", home)
        .arg("run")
        .arg(script)
        .args(["--set", &format!("out={}", out.display())]);
    for pair in set {
        command.args(["--set", pair]);
    }
    command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    command
}

/// The output of a finished command, failing the test (with its output) when it failed.
fn succeeded(out: std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// The folder of the one training run under `home`.
fn run_folder(home: &Path) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(home.join("cache").join("grpo"))
        .ok()?
        .map(|e| e.unwrap().path())
        .collect();
    assert!(dirs.len() <= 1, "one run expected: {dirs:?}");
    dirs.pop()
}

/// Steps recorded in a run's `metrics.jsonl` (whole lines).
fn recorded_steps(home: &Path) -> usize {
    run_folder(home)
        .and_then(|d| std::fs::read_to_string(d.join("metrics.jsonl")).ok())
        .map_or(0, |t| t.lines().filter(|l| l.ends_with('}')).count())
}

/// The step of a run's checkpoint (0 without one).
fn checkpoint_step(dir: &Path) -> usize {
    ["checkpoint", "checkpoint.old"]
        .iter()
        .find_map(|c| std::fs::read_to_string(dir.join(c).join("state.json")).ok())
        .map_or(0, |t| {
            serde_json::from_str::<serde_json::Value>(&t).unwrap()["step"]
                .as_u64()
                .unwrap() as usize
        })
}

#[test]
fn a_run_killed_at_step_2_of_6_resumes_redoing_at_most_one_step() {
    let script = repo("tests/faults/grpo.rhai");
    let whole = scratch("kill-whole");
    succeeded(
        rlvr_run(&script, &whole, &whole.join("out"), &[])
            .output()
            .unwrap(),
    );

    let killed = scratch("kill-resumed");
    let mut child = rlvr_run(&script, &killed, &killed.join("out"), &[])
        .spawn()
        .unwrap();
    super::kill_when(&mut child, || recorded_steps(&killed) >= 2);
    let done = recorded_steps(&killed);
    let dir = run_folder(&killed).unwrap();
    let kept = checkpoint_step(&dir);
    assert!((2..6).contains(&done), "killed after {done} of 6 steps");
    assert!(
        done - kept <= 1,
        "killed after {done} finished steps, the checkpoint keeps {kept}: a resume would redo {}",
        done - kept
    );

    succeeded(
        rlvr_run(&script, &killed, &killed.join("out"), &[])
            .output()
            .unwrap(),
    );
    assert_eq!(recorded_steps(&killed), 6);
    for file in [
        "adapter/adapter_model.safetensors",
        "metrics.json",
        "completions.json",
    ] {
        assert!(
            std::fs::read(whole.join("out").join(file)).unwrap()
                == std::fs::read(killed.join("out").join(file)).unwrap(),
            "{file} differs from the uninterrupted run's"
        );
    }
    let _ = std::fs::remove_dir_all(&whole);
    let _ = std::fs::remove_dir_all(&killed);
}

#[test]
fn a_step_cancelled_between_its_updates_leaves_the_checkpoint_as_it_was() {
    let items = toy_items();
    let rewards = [Reward::custom("alnum", 1.0, |s| {
        Ok(alphanumeric_share(s.completion))
    })];
    // many updates per step: a cancellation lands between two of them
    let config = |cache: &str| {
        let mut c = toy_config(3, cache);
        c.num_iterations = 200;
        c.lr = 1e-3;
        c.checkpoint_every = 1;
        c
    };
    let mut whole = tiny_policy(5);
    grpo::train(
        &mut whole,
        &items,
        &rewards,
        &config("cancel-whole"),
        &Job::silent(),
    )
    .unwrap();

    let config = config("cancel-split");
    let cancel = Cancel::new();
    let job = Job {
        progress: Arc::new(rlvr::progress::Silent),
        cancel: cancel.clone(),
    };
    let mut policy = tiny_policy(5);
    let vars = lora::variables(&mut policy.model);
    let grpo_dir = config.cache_dir.join("grpo");
    // once step 2 is saved, cancel as soon as step 3's first update changes the adapters
    let watcher = {
        let (cancel, grpo_dir) = (cancel.clone(), grpo_dir.clone());
        std::thread::spawn(move || -> Vec<u8> {
            let saved = loop {
                let dir = std::fs::read_dir(&grpo_dir)
                    .ok()
                    .and_then(|mut d| d.next())
                    .map(|e| e.unwrap().path());
                if let Some(dir) = dir.filter(|d| checkpoint_step(d) == 2) {
                    break std::fs::read(dir.join("checkpoint/adapter_model.safetensors")).unwrap();
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            };
            let values = |vars: &[(String, candle_core::Var)]| -> Vec<Vec<f32>> {
                vars.iter()
                    .map(|(_, v)| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
                    .collect()
            };
            let at_step_2 = values(&vars);
            while values(&vars) == at_step_2 {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            cancel.cancel();
            saved
        })
    };
    match grpo::train(&mut policy, &items, &rewards, &config, &job) {
        Err(GrpoError::Interrupted { step, dir }) => {
            assert_eq!(step, 2);
            let saved = watcher.join().unwrap();
            assert_eq!(checkpoint_step(&dir), 2);
            assert!(
                std::fs::read(dir.join("checkpoint/adapter_model.safetensors")).unwrap() == saved,
                "the checkpoint of step 2 was overwritten by a half-done step 3"
            );
        }
        other => panic!("expected an interruption in step 3, got {other:?}"),
    }
    let mut resumed = tiny_policy(5);
    let run = grpo::train(&mut resumed, &items, &rewards, &config, &Job::silent()).unwrap();
    assert_eq!(run.resumed_from, 2);
    assert_eq!(adapter_values(&mut resumed), adapter_values(&mut whole));
}

#[test]
fn a_changed_item_prompt_or_reward_starts_a_new_run() {
    let alnum = |s: &rlvr::reward::Scored| Ok(alphanumeric_share(s.completion));
    let train = |items: &[Question], rewards: &[Reward], config: &GrpoConfig| {
        let mut policy = tiny_policy(3);
        grpo::train(&mut policy, items, rewards, config, &Job::silent()).unwrap()
    };
    let config = toy_config(1, "key");
    let items = toy_items();
    let first = train(&items, &[Reward::custom("r", 1.0, alnum)], &config);
    assert_eq!(first.resumed_from, 0);
    let same = train(&items, &[Reward::custom("r", 1.0, alnum)], &config);
    assert_eq!((same.resumed_from, &same.dir), (1, &first.dir));

    let mut answer = toy_items();
    answer[0].answer = "y".into();
    let mut question = toy_items();
    question[1].question = "Say something else.".into();
    let mut choices = toy_items();
    choices[2].choices = vec!["one".into(), "two".into()];
    let mut system = config.clone();
    system.template.system = Some("Be brief.".into());
    let mut user = config.clone();
    user.template.user = "Q: {question}".into();
    let edited = [Reward::custom("r", 1.0, alnum).identified_by("edited closure")];
    let plain = [Reward::custom("r", 1.0, alnum)];
    let mut dirs = vec![first.dir.clone()];
    for (what, items, rewards, config) in [
        ("an answer", &answer, &plain, &config),
        ("a question", &question, &plain, &config),
        ("the choices", &choices, &plain, &config),
        ("the system prompt", &items, &plain, &system),
        ("the user template", &items, &plain, &user),
        ("the reward's code", &items, &edited, &config),
    ] {
        let run = train(items, rewards, config);
        assert_eq!(run.resumed_from, 0, "{what} changed, yet the run resumed");
        assert!(
            !dirs.contains(&run.dir),
            "{what} changed, yet the run folder is the same"
        );
        dirs.push(run.dir);
    }
    // how often checkpoints are written changes nothing: the run resumes
    let mut rarely = config.clone();
    rarely.checkpoint_every = 5;
    let again = train(&items, &plain, &rarely);
    assert_eq!((again.resumed_from, &again.dir), (1, &first.dir));
}

/// A GRPO script whose closure reward is `reward`, after `preamble`.
fn closure_script(dir: &Path, name: &str, preamble: &str, reward: &str) -> PathBuf {
    let path = dir.join(format!("{name}.rhai"));
    std::fs::create_dir_all(dir).unwrap();
    let text = format!(
        r#"{preamble}
let base = model("tests/fixtures/tiny-gemma3", #{{ tokenizer: "tests/fixtures/tiny-tokenizer/tokenizer.json" }});
let items = load("medqa", "data/samples/medqa", #{{ split: "test" }})
    .sql("SELECT * FROM self ORDER BY length(question), id LIMIT 2");
let policy = base.with_lora(#{{ rank: 4, alpha: 8, seed: 1 }});
let run = grpo(policy, items, #{{ group: 2, steps: 1, max_tokens: 4, system: (), rewards: [{reward}] }});
print(`folder: ${{run.folder()}}`);
"#
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn an_edited_reward_closure_starts_a_new_run_and_a_moved_one_resumes() {
    let home = scratch("closure-key");
    let folder = |name: &str, preamble: &str, reward: &str| -> String {
        let script = closure_script(&home.join("scripts"), name, preamble, reward);
        let stdout = succeeded(rlvr_run(&script, &home, &home, &[]).output().unwrap());
        stdout
            .lines()
            .find_map(|l| l.strip_prefix("folder: "))
            .unwrap_or_else(|| panic!("no folder in {stdout}"))
            .to_string()
    };
    let helper = "fn score(c) { c.len() / 40.0 }";
    let first = folder("first", helper, "|c, item| score(c)");
    let edited = folder("edited", helper, "|c, item| score(c) + 1.0");
    assert_ne!(first, edited, "an edited closure resumed the old run");
    let helper_edited = folder(
        "helper",
        "fn score(c) { c.len() / 20.0 }",
        "|c, item| score(c)",
    );
    assert_ne!(
        first, helper_edited,
        "an edited helper function resumed the old run"
    );
    let captured = folder(
        "captured",
        &format!("{helper}\nlet k = 2.0;"),
        "|c, item| score(c) * k",
    );
    let captured_edited = folder(
        "captured-edited",
        &format!("{helper}\nlet k = 3.0;"),
        "|c, item| score(c) * k",
    );
    assert_ne!(
        captured, captured_edited,
        "a changed captured value resumed the old run"
    );
    let moved = folder(
        "moved",
        &format!("// the same reward, further down\n\n\n{helper}"),
        "|c, item|  score(c)",
    );
    assert_eq!(first, moved, "moving the closure should keep its run");
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
fn a_reward_closure_that_uses_the_policy_being_trained_fails_clearly() {
    let home = scratch("closure-policy");
    let script = closure_script(
        &home.join("scripts"),
        "policy",
        "",
        "|c, item| policy.generate(\"Hi\", #{ max_tokens: 1 }).len()",
    );
    let mut child = rlvr_run(&script, &home, &home, &[]).spawn().unwrap();
    // a deadlock fails the test instead of hanging it
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the run hung: a reward closure using the policy deadlocked");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("reward `custom1`")
            && stderr.contains("a `grpo` reward closure cannot use the policy being trained"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&home);
}

/// A GRPO script with a preset file and extra options, printing the Metrics columns and the
/// manifest's loss settings.
fn options_script(dir: &Path, name: &str, preset: &Path, options: &str) -> PathBuf {
    let path = dir.join(format!("{name}.rhai"));
    std::fs::create_dir_all(dir).unwrap();
    let text = format!(
        r#"
let base = model("tests/fixtures/tiny-gemma3", #{{ tokenizer: "tests/fixtures/tiny-tokenizer/tokenizer.json" }});
let items = load("medqa", "data/samples/medqa", #{{ split: "test" }})
    .sql("SELECT * FROM self ORDER BY length(question), id LIMIT 2");
let policy = base.with_lora(#{{ rank: 4, alpha: 8, seed: 1 }});
let run = grpo(policy, items, #{{ preset: "{}", system: (), rewards: [|c, item| c.len() / 10.0, "format"], {options} }});
print(`columns: ${{run.metrics().columns()}}`);
print(`folder: ${{run.folder()}}`);
"#,
        preset.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn grpo_options_take_trl_names_and_preset_files_and_refuse_unknown_ones() {
    let home = scratch("trl-options");
    let dir = home.join("scripts");
    std::fs::create_dir_all(&dir).unwrap();
    let preset = dir.join("recipe.json");
    std::fs::write(
        &preset,
        r#"{"name": "recipe", "about": "a test recipe", "settings": {
            "loss_type": "cispo", "epsilon_high": 5.0, "num_generations": 2,
            "max_completion_length": 4, "max_steps": 1}}"#,
    )
    .unwrap();
    let script = options_script(
        &dir,
        "ok",
        &preset,
        r#"importance_sampling_level: "sequence", top_entropy_quantile: 0.5, mask_truncated_completions: true, reward_weights: [1.0, 0.5], multi_objective_aggregation: "normalize_then_sum""#,
    );
    let stdout = succeeded(rlvr_run(&script, &home, &home, &[]).output().unwrap());
    for column in ["entropy", "logp_mismatch", "reward_format_std"] {
        assert!(stdout.contains(column), "no `{column}` in {stdout}");
    }
    let folder = stdout
        .lines()
        .find_map(|l| l.strip_prefix("folder: "))
        .unwrap();
    let manifest: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(folder).join("manifest.json")).unwrap(),
    )
    .unwrap();
    let settings = manifest.get("settings").unwrap_or(&manifest);
    assert_eq!(settings["preset"], "recipe", "{manifest}");
    assert_eq!(settings["loss_type"], "cispo");
    assert_eq!(settings["epsilon_high"], 5.0);
    assert_eq!(settings["importance_sampling_level"], "sequence");
    assert_eq!(settings["reward_weights"], serde_json::json!([1.0, 0.5]));

    let fails = |name: &str, preset: &Path, options: &str| -> String {
        let script = options_script(&dir, name, preset, options);
        let out = rlvr_run(&script, &home, &home, &[]).output().unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let stderr = fails("unknown", &preset, "entropy_cof: 0.1");
    assert!(
        stderr.contains("unknown option `entropy_cof`") && stderr.contains("entropy_coef"),
        "{stderr}"
    );
    let stderr = fails("twice", &preset, "group: 2, num_generations: 2");
    assert!(stderr.contains("given twice"), "{stderr}");
    let broken = dir.join("broken.json");
    std::fs::write(&broken, r#"{"name": "broken", "settings": {"lr": "fast"}}"#).unwrap();
    let stderr = fails("broken", &broken, "steps: 1");
    assert!(
        stderr.contains("broken.json") && stderr.contains("`lr` must be a number"),
        "{stderr}"
    );
}
