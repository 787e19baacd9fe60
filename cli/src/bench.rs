//! Benchmarks behind `rlvr bench`: each measures one capability on real data and reports
//! figures as one JSON line, so a driver script (`benches/`) can set them beside a reference
//! implementation run on the same machine.

use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use rlvr::data::{self, LoadOptions, Result};
use rlvr::model::placement::{gpu_peak, GpuPeak};
use rlvr::model::Placement;

/// Figures of the loading benchmark.
#[derive(Debug, Serialize)]
pub struct LoadReport {
    /// What was measured.
    #[serde(rename = "impl")]
    pub implementation: String,
    /// Rows of the MMLU test split.
    pub mmlu_rows: usize,
    /// Rows of the CMMLU test split.
    pub cmmlu_rows: usize,
    /// Rows of the MMLU-Pro test split.
    pub mmlu_pro_rows: usize,
    /// Seconds to load all three into Items tables.
    pub wall_s: f64,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mib: f64,
}

/// Loads the full MMLU, CMMLU and MMLU-Pro test splits found under `data_dir` (the
/// published layouts: `mmlu/`, `cmmlu/`, `mmlu_pro/`) into Items tables.
pub fn load(data_dir: &Path) -> Result<LoadReport> {
    let options = LoadOptions::default();
    let start = Instant::now();
    let mmlu = data::load("mmlu", &data_dir.join("mmlu"), &options)?;
    let cmmlu = data::load("cmmlu", &data_dir.join("cmmlu"), &options)?;
    let mmlu_pro = data::load("mmlu_pro", &data_dir.join("mmlu_pro"), &options)?;
    let wall_s = start.elapsed().as_secs_f64();
    Ok(LoadReport {
        implementation: format!("rlvr {}", env!("CARGO_PKG_VERSION")),
        mmlu_rows: mmlu.height(),
        cmmlu_rows: cmmlu.height(),
        mmlu_pro_rows: mmlu_pro.height(),
        wall_s,
        peak_rss_mib: peak_rss_mib(),
    })
}

/// Peak resident memory of this process in MiB (Linux `VmHWM`; 0 where unavailable).
pub fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// What `rlvr bench model` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelTask {
    /// One forward pass over a 256-token prompt (the last position's logits).
    Prefill,
    /// Greedy generation of new tokens for a batch of copies of a short prompt.
    Decode,
    /// One LoRA forward and backward pass over a batch of 256-token rows.
    Lora,
}

/// Figures of one model benchmark task.
#[derive(Debug, Serialize)]
pub struct ModelReport {
    /// What was measured.
    #[serde(rename = "impl")]
    pub implementation: String,
    /// The task.
    pub task: String,
    /// Rows in the batch.
    pub batch: usize,
    /// Tokens per row (prompt tokens, or new tokens for decoding).
    pub tokens: usize,
    /// Seconds of the timed step (after one warm-up for prefill and LoRA).
    pub seconds: f64,
    /// Tokens processed per second.
    pub tokens_per_s: f64,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mib: f64,
    /// Peak GPU memory of the tensors (on a CUDA device; null on the CPU).
    pub peak_gpu: Option<GpuPeak>,
    /// For decoding on the CPU: the memory-bandwidth bound on its speed.
    pub roofline: Option<Roofline>,
}

/// The memory-bandwidth bound of a decoding step: every weight is read once per step, so a
/// step cannot take less than the weights' bytes over the machine's memory bandwidth.
#[derive(Debug, Serialize)]
pub struct Roofline {
    /// Bytes of weights one decoding step reads (the model file's tensors as stored: GGUF
    /// blocks, or the safetensors' dtype; a tied embedding counted once, as the head).
    pub weight_bytes: u64,
    /// Copy bandwidth of this process's threads over buffers far larger than the caches
    /// (STREAM's copy: bytes read plus bytes written, per second, the best of five), GB/s.
    pub copy_gb_s: f64,
    /// Read-only bandwidth (a sum over the same buffer, the best of five), GB/s.
    pub read_gb_s: f64,
    /// Tokens per second at the bound: `batch × copy_gb_s / weight_bytes`.
    pub bound_tokens_per_s: f64,
    /// The measured speed as a fraction of the bound.
    pub fraction: f64,
}

/// Bytes of the weight tensors of `model_path` as stored: a GGUF's tensor data, or the
/// sizes of a Hugging Face directory's `*.safetensors` files.
fn stored_weight_bytes(model_path: &Path) -> anyhow::Result<u64> {
    if model_path.is_dir() {
        let mut total = 0;
        for entry in std::fs::read_dir(model_path)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "safetensors") {
                total += std::fs::metadata(&path)?.len();
            }
        }
        return Ok(total);
    }
    let content = rlvr::model::gguf::read_content(model_path)?;
    Ok(content
        .tensor_infos
        .values()
        .map(|t| {
            let dtype = t.ggml_dtype;
            (t.shape.elem_count() / dtype.block_size() * dtype.type_size()) as u64
        })
        .sum())
}

/// Measures the copy and read bandwidth of rayon's threads over two 512 MiB buffers.
fn memory_bandwidth() -> (f64, f64) {
    use rayon::prelude::*;
    const FLOATS: usize = 128 << 20;
    const CHUNK: usize = 1 << 16;
    let source: Vec<f32> = (0..FLOATS).map(|i| i as f32).collect();
    let mut target = vec![0f32; FLOATS];
    let bytes = (FLOATS * std::mem::size_of::<f32>()) as f64;
    let (mut copy, mut read) = (0f64, 0f64);
    for _ in 0..5 {
        let start = Instant::now();
        target
            .par_chunks_mut(CHUNK)
            .zip(source.par_chunks(CHUNK))
            .for_each(|(t, s)| t.copy_from_slice(s));
        copy = copy.max(2.0 * bytes / start.elapsed().as_secs_f64());
        let start = Instant::now();
        let sum: f32 = target
            .par_chunks(CHUNK)
            .map(|c| {
                // sixteen independent sums, so the loop vectorises and is bound by memory
                let lanes = c.chunks_exact(16).fold([0f32; 16], |mut acc, x| {
                    for (a, v) in acc.iter_mut().zip(x) {
                        *a += v;
                    }
                    acc
                });
                lanes.iter().sum::<f32>()
            })
            .sum();
        std::hint::black_box(sum);
        read = read.max(bytes / start.elapsed().as_secs_f64());
    }
    (copy / 1e9, read / 1e9)
}

/// Runs one model benchmark on `model` with the token ids of `ids` (a JSON file with
/// `prompt_256` and `prompt_16` arrays), the model on `placement`.
pub fn model(
    model_path: &Path,
    ids_path: &Path,
    task: ModelTask,
    batch: usize,
    new_tokens: usize,
    placement: &Placement,
) -> anyhow::Result<ModelReport> {
    use candle_core::Tensor;
    use rlvr::model::generate::{generate, Sampling};
    use rlvr::model::{logprob, lora, Input, Model};

    let ids: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(ids_path)?)?;
    let row = |key: &str| -> anyhow::Result<Vec<u32>> {
        Ok(ids[key]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("{}: no `{key}` array", ids_path.display()))?
            .iter()
            .filter_map(|v| v.as_u64().map(|i| i as u32))
            .collect())
    };
    let device = placement.device.clone();
    let mut m = Model::load_on(model_path, placement)?;
    let (batch, tokens, seconds) = match task {
        ModelTask::Prefill => {
            let prompt = row("prompt_256")?;
            let step = |m: &Model| -> anyhow::Result<()> {
                let input = Input::unpadded(std::slice::from_ref(&prompt), 0, &device)?;
                let hidden = m.forward(&input, None, false)?;
                let last = hidden.squeeze(0)?.narrow(0, prompt.len() - 1, 1)?;
                m.head_logits(&last)?;
                // a GPU runs asynchronously: the step ends when its work has
                device.synchronize()?;
                Ok(())
            };
            step(&m)?;
            let start = Instant::now();
            step(&m)?;
            (1, prompt.len(), start.elapsed().as_secs_f64())
        }
        ModelTask::Decode => {
            let prompt = row("prompt_16")?;
            let prompts = vec![prompt; batch];
            let requests = vec![
                Sampling {
                    max_tokens: new_tokens,
                    temperature: 0.0,
                    ..Sampling::default()
                };
                batch
            ];
            let start = Instant::now();
            generate(&m, &prompts, &requests, false, None, &mut |_| true)?;
            (batch, new_tokens, start.elapsed().as_secs_f64())
        }
        ModelTask::Lora => {
            let prompt = row("prompt_256")?;
            let config = lora::LoraConfig {
                rank: 16,
                alpha: 32.0,
                ..lora::LoraConfig::default()
            };
            lora::attach(&mut m, &config)?;
            let rows = vec![prompt.clone(); batch];
            let step = |m: &Model| -> anyhow::Result<()> {
                let input = Input::unpadded(&rows, 0, &device)?;
                let hidden = m.forward(&input, None, true)?;
                let (b, s, d) = hidden.dims3()?;
                let states = hidden.narrow(1, 0, s - 1)?.reshape((b * (s - 1), d))?;
                let targets: Vec<u32> = rows.iter().flat_map(|r| r[1..].iter().copied()).collect();
                let targets = Tensor::new(targets, &device)?;
                let logprobs = logprob::gather_logprobs(
                    &states,
                    m.lm_head(),
                    &targets,
                    m.logit_softcap(),
                    1.0,
                )?;
                logprobs.sum_all()?.neg()?.backward()?;
                device.synchronize()?;
                Ok(())
            };
            step(&m)?;
            let start = Instant::now();
            step(&m)?;
            (batch, prompt.len(), start.elapsed().as_secs_f64())
        }
    };
    let tokens_per_s = (batch * tokens) as f64 / seconds;
    // before the bandwidth measurement's buffers
    let peak_rss_mib = peak_rss_mib();
    let roofline = if task == ModelTask::Decode && device.is_cpu() {
        let weight_bytes = stored_weight_bytes(model_path)?;
        let (copy_gb_s, read_gb_s) = memory_bandwidth();
        let bound_tokens_per_s = batch as f64 * copy_gb_s * 1e9 / weight_bytes as f64;
        Some(Roofline {
            weight_bytes,
            copy_gb_s,
            read_gb_s,
            bound_tokens_per_s,
            fraction: tokens_per_s / bound_tokens_per_s,
        })
    } else {
        None
    };
    Ok(ModelReport {
        implementation: format!("rlvr {}", env!("CARGO_PKG_VERSION")),
        task: format!("{task:?}").to_lowercase(),
        batch,
        tokens,
        seconds,
        tokens_per_s,
        peak_rss_mib,
        peak_gpu: gpu_peak(&device),
        roofline,
    })
}

/// What `rlvr bench grpo` runs: GRPO steps on the first `prompts` MedQA questions of `data`.
#[derive(Debug, Clone)]
pub struct GrpoBench {
    /// The preset the loss and sampling settings come from (`default`, `open-medical-r1`);
    /// the sizes below replace the preset's.
    pub preset: String,
    /// Where the model runs and in which dtype.
    pub placement: Placement,
    /// The model: a Hugging Face directory or a .gguf file.
    pub model: std::path::PathBuf,
    /// Its `tokenizer.json`, when not beside the model.
    pub tokenizer: Option<std::path::PathBuf>,
    /// A MedQA folder (its `test` split is used).
    pub data: std::path::PathBuf,
    /// Completions per prompt (G).
    pub group: usize,
    /// Prompts per step.
    pub prompts: usize,
    /// New tokens at most per completion.
    pub max_tokens: usize,
    /// LoRA rank (alpha is twice the rank, every linear layer adapted).
    pub rank: usize,
    /// Steps to run.
    pub steps: usize,
}

/// The time of one GRPO step and its parts.
#[derive(Debug, Serialize)]
pub struct StepTimes {
    /// Wall time of the whole step, seconds.
    pub step_s: f64,
    /// Sampling the completions.
    pub gen_s: f64,
    /// Scoring them.
    pub reward_s: f64,
    /// Log-probabilities, loss, backward and the optimizer update.
    pub train_s: f64,
    /// Mean completion length in tokens.
    pub completion_len: f64,
}

/// Figures of the GRPO benchmark.
#[derive(Debug, Serialize)]
pub struct GrpoReport {
    /// What was measured.
    #[serde(rename = "impl")]
    pub implementation: String,
    /// The preset of the loss and sampling settings.
    pub preset: String,
    /// Where the model ran (`cpu`, `cuda:N`).
    pub device: String,
    /// The dtype of the frozen weights and activations.
    pub dtype: String,
    /// Completions per prompt.
    pub group: usize,
    /// Prompts per step.
    pub prompts: usize,
    /// New tokens at most per completion.
    pub max_tokens: usize,
    /// LoRA rank.
    pub rank: usize,
    /// Steps run.
    pub steps: usize,
    /// Prompt length in tokens, per prompt.
    pub prompt_tokens: Vec<usize>,
    /// Seconds to load the model and attach the adapters.
    pub load_s: f64,
    /// Mean over the steps of the whole step's time.
    pub step_s: f64,
    /// Mean generation time per step.
    pub gen_s: f64,
    /// Mean scoring time per step.
    pub reward_s: f64,
    /// Mean training time per step (log-probs, loss, backward, update).
    pub train_s: f64,
    /// Each step's times.
    pub per_step: Vec<StepTimes>,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mib: f64,
    /// Peak GPU memory of the tensors (on a CUDA device; null on the CPU).
    pub peak_gpu: Option<GpuPeak>,
    /// Threads candle computes with.
    pub threads: usize,
}

/// Runs `settings.steps` GRPO steps with the study's prompt and rewards (accuracy, format,
/// xmlcount) and the loss and sampling settings of `settings.preset` (`default`: TRL's, dapo,
/// β 0, temperature 1; `open-medical-r1`: the study's, with β 0.04 a reference pass with the
/// adapters off), one micro-batch per prompt group, and reports where the time went. The run's files go to
/// a scratch folder that is removed afterwards; nothing is resumed.
pub fn grpo(settings: &GrpoBench) -> anyhow::Result<GrpoReport> {
    use rlvr::grpo::{self as trainer, GrpoConfig};
    use rlvr::model::lm::LanguageModel;
    use rlvr::model::lora::LoraConfig;
    use rlvr::progress::Job;
    use rlvr::reward::{Reward, STUDY_REWARDS};

    let items = data::load(
        "medqa",
        &settings.data,
        &LoadOptions {
            split: Some("test".into()),
            ..LoadOptions::default()
        },
    )?;
    let questions = data::question::questions(&items.head(Some(settings.prompts)))?;
    anyhow::ensure!(
        questions.len() == settings.prompts,
        "{} has {} questions, fewer than --prompts {}",
        settings.data.display(),
        questions.len(),
        settings.prompts
    );
    let preset = GrpoConfig::preset(&settings.preset)?;
    let started = Instant::now();
    let base = LanguageModel::load_on(
        &settings.model,
        settings.tokenizer.as_deref(),
        &settings.placement,
    )?;
    let mut policy = base.with_lora(&LoraConfig {
        rank: settings.rank,
        alpha: 2.0 * settings.rank as f64,
        ..LoraConfig::default()
    })?;
    drop(base);
    let load_s = started.elapsed().as_secs_f64();

    let scratch = std::env::temp_dir().join(format!("rlvr-bench-grpo-{}", std::process::id()));
    let mut config = GrpoConfig {
        group: settings.group,
        batch: settings.group,
        grad_accum: settings.prompts,
        steps: settings.steps,
        resume: false,
        checkpoint_every: settings.steps.max(1),
        cache_dir: scratch.clone(),
        ..preset
    };
    config.sampling.max_tokens = settings.max_tokens;
    let prompt_tokens = questions
        .iter()
        .map(|q| {
            let text = policy.tokenizer.chat(&config.template.messages(q), true)?;
            Ok(policy.tokenizer.encode(&text)?.len())
        })
        .collect::<rlvr::model::Result<Vec<usize>>>()?;
    let rewards = Reward::named(&STUDY_REWARDS).map_err(anyhow::Error::msg)?;
    let run = trainer::train(&mut policy, &questions, &rewards, &config, &Job::silent());
    let _ = std::fs::remove_dir_all(&scratch);
    let run = run?;

    let column = |name: &str| -> anyhow::Result<Vec<f64>> {
        Ok(run
            .metrics
            .column(name)?
            .f64()?
            .into_no_null_iter()
            .collect())
    };
    let (step_s, gen_s, reward_s, train_s, lens) = (
        column("step_s")?,
        column("gen_s")?,
        column("reward_s")?,
        column("train_s")?,
        column("completion_len")?,
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let device = &settings.placement.device;
    Ok(GrpoReport {
        implementation: format!("rlvr {}", env!("CARGO_PKG_VERSION")),
        preset: settings.preset.clone(),
        device: match device.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            _ => "cpu".into(),
        },
        dtype: settings.placement.dtype.as_str().into(),
        group: settings.group,
        prompts: settings.prompts,
        max_tokens: settings.max_tokens,
        rank: settings.rank,
        steps: settings.steps,
        prompt_tokens,
        load_s,
        step_s: mean(&step_s),
        gen_s: mean(&gen_s),
        reward_s: mean(&reward_s),
        train_s: mean(&train_s),
        per_step: (0..step_s.len())
            .map(|i| StepTimes {
                step_s: step_s[i],
                gen_s: gen_s[i],
                reward_s: reward_s[i],
                train_s: train_s[i],
                completion_len: lens[i],
            })
            .collect(),
        peak_rss_mib: peak_rss_mib(),
        peak_gpu: gpu_peak(device),
        threads: candle_core::utils::get_num_threads(),
    })
}
