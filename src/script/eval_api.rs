//! Script bindings for benchmark evaluation: `evaluate`, `summary`, `compare`, `presets`.

use std::sync::Arc;

use polars::prelude::DataFrame;
use rhai::{Array, Dynamic, Engine, FuncRegistration, Map};

use super::convert::{check_keys, count, error, text, RhaiResult};
#[cfg(feature = "http")]
use super::endpoint_api::fleet_of;
use super::model_api::ModelHandle;
use super::{Area, Output};
#[cfg(feature = "http")]
use crate::endpoint::Endpoint;
use crate::eval::preset::{Mode, Preset};
#[cfg(feature = "http")]
use crate::eval::GENERATE_BATCH;
use crate::eval::{self, Average, Backend, EvalOptions, LocalModel};
use crate::progress::Job;

/// The evaluation area of the reference.
pub const AREA: Area = Area {
    title: "Evaluation",
    intro: "`evaluate` scores a model on an Items table with a benchmark preset (the prompts \
            and answer extraction of lm-evaluation-harness: `mmlu`, `cmmlu`, `mmlu_pro`, \
            `gsm8k`, `gsm8k_cot`, `medqa`, or the study's `<answer>` format `study`) and \
            returns the Results table (`id`, `dataset`, `subject`, `category`, `medical`, \
            `model`, `adapter`, `preset`, `pred`, `correct`, `response`, `prompt_tokens`, \
            `tokens`, …). Finished items are cached under `$RLVR_HOME/cache/eval`, so a \
            rerun or an interrupted run resumes. The model may be an `endpoint` (an \
            OpenAI-compatible server), cached by its model name. `summary` and `compare` make \
            tables with 95 % intervals; `overlap` checks training questions against a \
            benchmark for shared 13-word n-grams (contamination).",
    register,
};

const EVALUATE_OPTIONS: [&str; 11] = [
    "mode",
    "preset",
    "shots",
    "fewshot",
    "max_tokens",
    "temperature",
    "batch",
    "seed",
    "label",
    "cache",
    "limit",
];

fn int(map: &Map, key: &str) -> RhaiResult<Option<i64>> {
    match map.get(key) {
        None => Ok(None),
        Some(v) => v
            .as_int()
            .map(Some)
            .map_err(|t| error(format!("option `{key}` must be an integer, not {t}"))),
    }
}

fn options(opts: &Map) -> RhaiResult<(EvalOptions, Option<usize>)> {
    check_keys(opts, &EVALUATE_OPTIONS, "evaluate")?;
    let mut o = EvalOptions::default();
    if let Some(mode) = text(opts, "mode")? {
        o.mode = Some(Mode::by_name(&mode).map_err(error)?);
    }
    o.preset = text(opts, "preset")?;
    if let Some(n) = int(opts, "shots")? {
        o.shots = Some(count(n, "shots")?);
    }
    if let Some(n) = int(opts, "max_tokens")? {
        o.max_tokens = Some(count(n, "max_tokens")?);
    }
    if let Some(n) = int(opts, "batch")? {
        o.batch = Some(count(n, "batch")?.max(1));
    }
    if let Some(n) = int(opts, "seed")? {
        o.seed = n as u64;
    }
    if let Some(v) = opts.get("temperature") {
        o.temperature = v
            .as_float()
            .or_else(|_| v.as_int().map(|i| i as f64))
            .map_err(|t| error(format!("option `temperature` must be a number, not {t}")))?;
    }
    if let Some(v) = opts.get("fewshot") {
        o.fewshot = Some(v.clone().try_cast::<DataFrame>().ok_or_else(|| {
            error("option `fewshot` must be an Items table, e.g. load(\"mmlu\", path, #{ split: \"dev\" })")
        })?);
    }
    o.label = text(opts, "label")?;
    if let Some(v) = opts.get("cache") {
        if !v
            .as_bool()
            .map_err(|t| error(format!("option `cache` must be true or false, not {t}")))?
        {
            o.cache_dir = None;
        }
    }
    let limit = int(opts, "limit")?.map(|n| count(n, "limit")).transpose()?;
    Ok((o, limit))
}

fn run(
    output: &Arc<dyn Output>,
    model: &ModelHandle,
    items: &DataFrame,
    opts: &Map,
) -> RhaiResult<DataFrame> {
    let (options, limit) = options(opts)?;
    let backend = {
        let lm = model.read()?;
        LocalModel::new(&lm).map_err(error)?
    };
    run_on(output, &backend, items, &options, limit)
}

#[cfg(feature = "http")]
/// `evaluate` on an endpoint: `batch` defaults to the endpoint's concurrency (at least 8),
/// so that a batch keeps every request slot busy.
fn run_endpoint(
    output: &Arc<dyn Output>,
    endpoint: &Endpoint,
    items: &DataFrame,
    opts: &Map,
) -> RhaiResult<DataFrame> {
    let (mut options, limit) = options(opts)?;
    if !opts.contains_key("batch") {
        options.batch = Some(GENERATE_BATCH.max(endpoint.options().concurrency));
    }
    run_on(output, endpoint, items, &options, limit)
}

fn run_on(
    output: &Arc<dyn Output>,
    backend: &dyn Backend,
    items: &DataFrame,
    options: &EvalOptions,
    limit: Option<usize>,
) -> RhaiResult<DataFrame> {
    let items = match limit {
        Some(n) => items.head(Some(n)),
        None => items.clone(),
    };
    let job = Job {
        progress: output.progress(),
        cancel: output.cancel(),
    };
    eval::evaluate(backend, &items, options, &job).map_err(error)
}

fn summary_options(opts: &Map) -> RhaiResult<(Average, String)> {
    check_keys(opts, &["average", "column"], "summary")?;
    let average = match text(opts, "average")? {
        Some(a) => Average::by_name(&a).map_err(error)?,
        None => Average::Micro,
    };
    Ok((
        average,
        text(opts, "column")?.unwrap_or_else(|| "correct".into()),
    ))
}

fn tables(results: Array) -> RhaiResult<Vec<DataFrame>> {
    results
        .into_iter()
        .map(|v| {
            let name = v.type_name();
            v.try_cast::<DataFrame>().ok_or_else(|| {
                error(format!(
                    "compare takes an array of Results tables, not {name}"
                ))
            })
        })
        .collect()
}

fn overlap_with(train: &DataFrame, benchmark: &DataFrame, opts: &Map) -> RhaiResult<DataFrame> {
    check_keys(opts, &["n"], "overlap")?;
    let n = match int(opts, "n")? {
        Some(n) => count(n, "n")?,
        None => 13,
    };
    if n == 0 {
        return Err(error("overlap: `n` must be at least 1"));
    }
    let train = crate::data::question::questions(train).map_err(error)?;
    let benchmark = crate::data::question::questions(benchmark).map_err(error)?;
    Ok(eval::overlap::overlap(&train, &benchmark, n))
}

fn register(engine: &mut Engine, output: &Arc<dyn Output>) {
    register_evaluate(engine, output);
    #[cfg(feature = "http")]
    register_evaluate_remote(engine, output);
    register_summary(engine);
    register_compare(engine);
    register_overlap(engine);
    register_presets(engine);
}

/// `evaluate` over a local model, with or without options.
fn register_evaluate(engine: &mut Engine, output: &Arc<dyn Output>) {
    let out = output.clone();
    FuncRegistration::new("evaluate")
        .in_global_namespace()
        .with_params_info([
            "model: Model",
            "items: DataFrame",
            "options: Map",
            "DataFrame",
        ])
        .with_comments([
            "/// Scores `model` on `items` (an Items table) and returns the Results table. \
             Options: `mode` (`loglik`: the option letters scored as continuations; \
             `generate`: a chain of thought, then answer extraction), `preset` (`mmlu`, \
             `cmmlu`, `mmlu_pro`, `gsm8k`, `gsm8k_cot`, `medqa`, `study`, or a `.json` \
             preset file; default: the dataset's), `shots` (default: the preset's), \
             `fewshot` (the Items table few-shot examples come from, e.g. MMLU's `dev` \
             split), `max_tokens`, `temperature` (0.0: greedy), `batch` (questions per batch: 64 for `loglik`, where a \
             local model scores them in sub-batches of about one length, 8 for `generate`), \
             `seed` (0), \
             `label` (the `model` column), `cache` (true), `limit` (the first n items).",
        ])
        .register_into_engine(
            engine,
            move |model: ModelHandle, items: DataFrame, opts: Map| run(&out, &model, &items, &opts),
        );
    let out = output.clone();
    FuncRegistration::new("evaluate")
        .in_global_namespace()
        .with_params_info(["model: Model", "items: DataFrame", "DataFrame"])
        .with_comments(["/// Scores `model` on `items` with the dataset's default preset."])
        .register_into_engine(engine, move |model: ModelHandle, items: DataFrame| {
            run(&out, &model, &items, &Map::new())
        });
}

/// `evaluate` over an endpoint, with or without options, and over a fleet of them.
#[cfg(feature = "http")]
fn register_evaluate_remote(engine: &mut Engine, output: &Arc<dyn Output>) {
    let out = output.clone();
    FuncRegistration::new("evaluate")
        .in_global_namespace()
        .with_params_info([
            "endpoint: Endpoint",
            "items: DataFrame",
            "options: Map",
            "DataFrame",
        ])
        .with_comments([
            "/// Scores the model of an OpenAI-compatible server on `items`, with the options \
             of `evaluate` on a local model; the `model` column is the endpoint's model name, \
             which also keys the cache (a restarted server at another address resumes). \
             `generate` sends text prompts to `/completions` and conversations to \
             `/chat/completions`, `concurrency` requests at a time (`batch` defaults to the \
             endpoint's `concurrency`, at least 8). `loglik` scores each question as \
             lm-eval's `local-completions` does, with one `/completions` request listing the \
             context alone and with each option, `echo: true, logprobs: 1, max_tokens: 0` \
             (vLLM, SGLang, `rlvr serve`; not llama.cpp's server).",
        ])
        .register_into_engine(
            engine,
            move |endpoint: Endpoint, items: DataFrame, opts: Map| {
                run_endpoint(&out, &endpoint, &items, &opts)
            },
        );
    let out = output.clone();
    FuncRegistration::new("evaluate")
        .in_global_namespace()
        .with_params_info([
            "servers: Array",
            "items: DataFrame",
            "options: Map",
            "DataFrame",
        ])
        .with_comments([
            "/// `evaluate` spread over several servers of one model (an array of \
             `endpoint(…)`s, e.g. one per GPU): each question of a batch goes to a server \
             with a free slot (each server `concurrency` at a time; `batch` defaults to \
             their sum, at least 8), a server that stops answering hands its questions to \
             the others, and the Results and the cache are those of one server of that \
             model.",
        ])
        .register_into_engine(
            engine,
            move |servers: Array, items: DataFrame, opts: Map| -> RhaiResult<DataFrame> {
                let fleet = fleet_of(servers, "evaluate")?;
                let (mut options, limit) = options(&opts)?;
                if !opts.contains_key("batch") {
                    options.batch = Some(GENERATE_BATCH.max(fleet.concurrency()));
                }
                run_on(&out, &fleet, &items, &options, limit)
            },
        );
    let out = output.clone();
    FuncRegistration::new("evaluate")
        .in_global_namespace()
        .with_params_info(["endpoint: Endpoint", "items: DataFrame", "DataFrame"])
        .with_comments([
            "/// Scores the model of an OpenAI-compatible server on `items` with the dataset's \
             default preset.",
        ])
        .register_into_engine(engine, move |endpoint: Endpoint, items: DataFrame| {
            run_endpoint(&out, &endpoint, &items, &Map::new())
        });
}

/// `summary` of a Results table, by default or with options.
fn register_summary(engine: &mut Engine) {
    FuncRegistration::new("summary")
        .in_global_namespace()
        .with_params_info(["results: DataFrame", "by: &str", "DataFrame"])
        .with_comments([
            "/// Accuracy per value of column `by` of a Results table (`\"\"`: overall \
             only), then the rows `all`, `medical` and `medical (extended)`, per model: \
             `model`, `<by>`, `n`, `n_correct`, `accuracy`, `ci_low`, `ci_high` (95 % \
             Wilson), `average` (`micro`: every question weighs the same, as \
             lm-evaluation-harness averages).",
        ])
        .register_into_engine(
            engine,
            |res: DataFrame, by: &str| -> RhaiResult<DataFrame> {
                eval::summary(&res, by, Average::Micro, "correct").map_err(error)
            },
        );
    FuncRegistration::new("summary")
        .in_global_namespace()
        .with_params_info([
            "results: DataFrame",
            "by: &str",
            "options: Map",
            "DataFrame",
        ])
        .with_comments([
            "/// `summary` with options: `average` (`micro`, or `macro`: the mean of the \
             subjects' accuracies, as CMMLU's own script and OpenCompass average), \
             `column` (the true/false column scored, e.g. `correct_flexible` or \
             `correct_official`).",
        ])
        .register_into_engine(
            engine,
            |res: DataFrame, by: &str, opts: Map| -> RhaiResult<DataFrame> {
                let (average, column) = summary_options(&opts)?;
                eval::summary(&res, by, average, &column).map_err(error)
            },
        );
}

/// `compare` of several Results tables.
fn register_compare(engine: &mut Engine) {
    FuncRegistration::new("compare")
        .in_global_namespace()
        .with_params_info(["results: Array", "by: &str", "DataFrame"])
        .with_comments([
            "/// Results tables side by side per value of `by` (then `all` and the medical \
             subsets) on their shared questions: `model`, `runs` (seeds of one setting, \
             shown as mean ± `sd`), `n`, `accuracy`, `ci_low`, `ci_high`, and against the \
             first table's setting `diff`, `diff_low`, `diff_high`, `p_value` and `test` \
             (McNemar's exact test, or a paired bootstrap when seeds are pooled).",
        ])
        .register_into_engine(
            engine,
            |results: Array, by: &str| -> RhaiResult<DataFrame> {
                eval::compare(&tables(results)?, by, "correct").map_err(error)
            },
        );
    FuncRegistration::new("compare")
        .in_global_namespace()
        .with_params_info(["results: Array", "by: &str", "options: Map", "DataFrame"])
        .with_comments([
            "/// `compare` with options: `column` (the true/false column compared), `seeds` \
             (true: strategies run under several seeds, e.g. one GRPO run per training seed, \
             each evaluated with `label` the strategy and `seed` the run's seed; the first \
             label, run once or under the same seeds, is the reference). With `seeds`, each \
             label has a row per seed (`accuracy`, and against the reference's run of that \
             seed `diff`, `better`, `worse` and McNemar's exact `p_value`) and a combined \
             row with a null `seed`: `accuracy` and `diff` as mean over seeds with `sd` and \
             `diff_sd`, and `p_value` from Stouffer's method (each seed's McNemar p-value as \
             a z-score signed by its direction, `Σz/√k`; seeds share the questions, so it \
             leans optimistic). Columns: `<by>`, `model`, `seed`, `runs`, `n`, `accuracy`, \
             `sd`, `ci_low`, `ci_high`, `diff`, `diff_sd`, `better`, `worse`, `p_value`, \
             `test`.",
        ])
        .register_into_engine(
            engine,
            |results: Array, by: &str, opts: Map| -> RhaiResult<DataFrame> {
                check_keys(&opts, &["column", "seeds"], "compare")?;
                let column = text(&opts, "column")?.unwrap_or_else(|| "correct".into());
                let seeds = match opts.get("seeds") {
                    None => false,
                    Some(v) => v.as_bool().map_err(|t| {
                        error(format!("option `seeds` must be true or false, not {t}"))
                    })?,
                };
                let tables = tables(results)?;
                if seeds {
                    eval::seeds::compare_seeds(&tables, by, &column).map_err(error)
                } else {
                    eval::compare(&tables, by, &column).map_err(error)
                }
            },
        );
}

/// `overlap` between a training table and a benchmark.
fn register_overlap(engine: &mut Engine) {
    FuncRegistration::new("overlap")
        .in_global_namespace()
        .with_params_info(["train: DataFrame", "benchmark: DataFrame", "DataFrame"])
        .with_comments([
            "/// The contamination check: one row per training question and benchmark row \
             that share a 13-word n-gram (texts lower-cased, split at every character that \
             is not a letter or digit; a question's text is its question and choices), as \
             the GPT-3 and lm-evaluation-harness decontamination notes do: `id`, \
             `benchmark_id`, `benchmark_dataset`, `shared` (distinct shared n-grams) and \
             `example` (the first of them). An empty table means no overlap found.",
        ])
        .register_into_engine(
            engine,
            |train: DataFrame, benchmark: DataFrame| -> RhaiResult<DataFrame> {
                overlap_with(&train, &benchmark, &Map::new())
            },
        );
    FuncRegistration::new("overlap")
        .in_global_namespace()
        .with_params_info([
            "train: DataFrame",
            "benchmark: DataFrame",
            "options: Map",
            "DataFrame",
        ])
        .with_comments(["/// `overlap` with options: `n` (the n-gram length in words, 13)."])
        .register_into_engine(
            engine,
            |train: DataFrame, benchmark: DataFrame, opts: Map| -> RhaiResult<DataFrame> {
                overlap_with(&train, &benchmark, &opts)
            },
        );
}

/// `presets`: the built-in evaluation presets.
fn register_presets(engine: &mut Engine) {
    FuncRegistration::new("presets")
        .in_global_namespace()
        .with_params_info(["Map"])
        .with_comments(["/// The built-in benchmark presets: name → what each reproduces."])
        .register_into_engine(engine, || -> RhaiResult<Map> {
            Preset::names()
                .into_iter()
                .map(|n| {
                    let p = Preset::get(n).map_err(error)?;
                    Ok((n.into(), Dynamic::from(p.about)))
                })
                .collect()
        });
}
