//! Script binding for supervised fine-tuning: `sft`, the format warm-up before GRPO.

use std::sync::Arc;

use polars::prelude::DataFrame;
use rhai::{Engine, FuncRegistration, Map};

use super::convert::{check_keys, error, text, RhaiResult};
use super::model_api::ModelHandle;
use super::train_api::{apply_template, float, int, job_of};
use super::Output;
use crate::data::question::questions;
use crate::grpo::optim::Schedule;
use crate::sft::{self, SftConfig};

const SFT_OPTIONS: [&str; 10] = [
    "steps",
    "batch",
    "lr",
    "schedule",
    "max_grad_norm",
    "seed",
    "system",
    "user",
    "target",
    "cache",
];

fn config(opts: &Map) -> RhaiResult<SftConfig> {
    check_keys(opts, &SFT_OPTIONS, "sft")?;
    let mut c = SftConfig::default();
    for (key, slot) in [("steps", &mut c.steps), ("batch", &mut c.batch)] {
        if let Some(v) = opts.get(key) {
            *slot = int(v, key)?;
        }
    }
    for (key, slot) in [("lr", &mut c.lr), ("max_grad_norm", &mut c.max_grad_norm)] {
        if let Some(v) = opts.get(key) {
            *slot = float(v, key)?;
        }
    }
    if let Some(v) = opts.get("seed") {
        c.seed = int(v, "seed")? as u64;
    }
    if let Some(name) = text(opts, "schedule")? {
        c.schedule = Schedule::by_name(&name).ok_or_else(|| {
            error(format!(
                "sft: unknown schedule `{name}`; schedules: constant, linear, cosine"
            ))
        })?;
    }
    if let Some(target) = text(opts, "target")? {
        c.target = target;
    }
    if let Some(v) = opts.get("cache") {
        c.cache = v
            .as_bool()
            .map_err(|t| error(format!("option `cache` must be true or false, not {t}")))?;
    }
    apply_template(opts, &mut c.template)?;
    Ok(c)
}

/// Registers `sft`.
pub(super) fn register(engine: &mut Engine, output: &Arc<dyn Output>) {
    let out = output.clone();
    FuncRegistration::new("sft")
        .in_global_namespace()
        .with_params_info([
            "policy: Model",
            "items: DataFrame",
            "options: Map",
            "DataFrame",
        ])
        .with_comments([
            "/// Fine-tunes `policy`'s LoRA adapters in place on written answers to the \
             questions of `items` (supervised, the loss on the answer's tokens only) and \
             returns its Metrics table (`step`, `loss`, `tokens`, `lr`, `grad_norm`, \
             `step_s`). It is the warm-up a small pre-trained model needs before `grpo`: \
             one that never writes the study's format gets no reward signal. The prompt is \
             `grpo`'s (the study's by default, `system` and `user` as in `grpo`); the answer \
             is `target` with `{answer}`, `{answer_text}` and `{question}` replaced \
             (default `<think> The answer is ({answer}) {answer_text}. </think><answer> \
             {answer} </answer>`), then the end-of-turn token. Options: `steps` (16), \
             `batch` (4 examples per step), `lr` (1e-4), `schedule` (`linear`), \
             `max_grad_norm` (1.0), `seed` (42), `system`, `user`, `target`, `cache` (true: \
             an identical earlier run under `$RLVR_HOME/cache/sft` is loaded instead of \
             trained again). Train on questions kept apart from those you evaluate on.",
        ])
        .register_into_engine(
            engine,
            move |policy: ModelHandle, items: DataFrame, opts: Map| -> RhaiResult<DataFrame> {
                let config = config(&opts)?;
                let qs = questions(&items).map_err(error)?;
                let mut lm = policy.write()?;
                sft::train(&mut lm, &qs, &config, &job_of(&out)).map_err(error)
            },
        );
}
