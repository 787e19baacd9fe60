//! Script bindings for judging and training: `judge`, `select_by_difficulty`, `grpo` and the
//! training run's `metrics`, `completions` and `folder`.

use std::sync::Arc;

use polars::prelude::DataFrame;
use rhai::{Array, Dynamic, Engine, FnPtr, FuncRegistration, Map, NativeCallContext};
use sha2::{Digest, Sha256};

use super::convert::{check_keys, count, error, text, RhaiResult};
use super::model_api::ModelHandle;
use super::{Area, Output};
use crate::data::question::{questions, Question};
use crate::grpo::{self, GrpoConfig, GrpoRun};
use crate::judge::{self, JudgeConfig, Selection};
use crate::model::generate::Sampling;
use crate::progress::Job;
use crate::prompt::PromptTemplate;
use crate::reward::{Builtin, Reward, BUILTIN_REWARDS};

/// The judging and training area of the reference.
pub const AREA: Area = Area {
    title: "Judging and training",
    intro: "`judge` has a model answer every question `samples` times and adds the pass \
            rate; `select_by_difficulty` takes the study's hard/easy mix from it; `grpo` \
            trains a model's LoRA adapters in place with group relative policy optimisation. \
            Judging and training save their progress as they go under \
            `$RLVR_HOME/cache`: a rerun (after a crash or Ctrl-C) continues where it stopped.",
    register,
};

/// A finished (or resumed-and-finished) GRPO run as scripts see it.
#[derive(Clone)]
pub struct TrainingRun(pub Arc<GrpoRun>);

fn register(engine: &mut Engine, output: &Arc<dyn Output>) {
    engine.register_type_with_name::<TrainingRun>("TrainingRun");
    super::sft_api::register(engine, output);
    register_judge(engine, output);
    #[cfg(feature = "http")]
    register_judge_remote(engine, output);
    register_select_by_difficulty(engine);
    register_grpo(engine, output);
    register_reward(engine);
    register_training_run(engine);
}

/// `judge` by a local model, with or without options.
fn register_judge(engine: &mut Engine, output: &Arc<dyn Output>) {
    let out = output.clone();
    FuncRegistration::new("judge")
        .in_global_namespace()
        .with_params_info([
            "judge: Model",
            "items: DataFrame",
            "options: Map",
            "DataFrame",
        ])
        .with_comments([
            "/// Has `judge` answer every question of `items` `samples` times (the study's \
             prompt by default) and returns the Judged table: the items plus `judge`, \
             `samples`, `responses`, `correct`, `format_ok`, `n_correct` and `pass_rate` (the \
             share of responses both right and in the `<think>…</think><answer>…</answer>` \
             format). Options: `samples` (1), `max_tokens` (256), `temperature` (0.7), \
             `top_p`, `top_k`, `min_p`, `stop` (strings), `seed` (0), `batch` (8 conversations per batch), \
             `system` and `user` (the prompt; `{question}` and `{choices}` in `user` are \
             filled in).",
        ])
        .register_into_engine(
            engine,
            move |model: ModelHandle, items: DataFrame, opts: Map| {
                judge_with(&out, &model, &items, &opts)
            },
        );
    let out = output.clone();
    FuncRegistration::new("judge")
        .in_global_namespace()
        .with_params_info(["judge: Model", "items: DataFrame", "DataFrame"])
        .with_comments(["/// `judge` with the default options: one sample per question."])
        .register_into_engine(engine, move |model: ModelHandle, items: DataFrame| {
            judge_with(&out, &model, &items, &Map::new())
        });
}

/// `judge` by an endpoint or a fleet of servers.
#[cfg(feature = "http")]
fn register_judge_remote(engine: &mut Engine, output: &Arc<dyn Output>) {
    let out = output.clone();
    FuncRegistration::new("judge")
        .in_global_namespace()
        .with_params_info([
            "judge: Endpoint",
            "items: DataFrame",
            "options: Map",
            "DataFrame",
        ])
        .with_comments([
            "/// `judge` with an OpenAI-compatible server as the judge (see `endpoint`): the \
             same prompt, options, table and cache; `batch` requests are in flight together.",
        ])
        .register_into_engine(
            engine,
            move |server: crate::endpoint::Endpoint, items: DataFrame, opts: Map| {
                let config = judge_config(&opts)?;
                judge::judge(&server, &items, &config, &job_of(&out)).map_err(error)
            },
        );

    let out = output.clone();
    FuncRegistration::new("judge")
        .in_global_namespace()
        .with_params_info([
            "servers: Array",
            "items: DataFrame",
            "options: Map",
            "DataFrame",
        ])
        .with_comments([
            "/// `judge` spread over several servers of one model (an array of `endpoint(…)`s, \
             e.g. one per GPU): each conversation goes to a server with a free slot (each \
             server `concurrency` at a time; `batch` defaults to 4 × their sum), every \
             response is cached as it arrives, a server that stops answering hands its \
             conversations to the others, and each sample's seed comes from the item and \
             the sample index, so the table is the one a single server gives.",
        ])
        .register_into_engine(
            engine,
            move |servers: Array, items: DataFrame, opts: Map| -> RhaiResult<DataFrame> {
                let fleet = super::endpoint_api::fleet_of(servers, "judge")?;
                let mut config = judge_config(&opts)?;
                if !opts.contains_key("batch") {
                    config.batch = (4 * fleet.concurrency()).max(8);
                }
                judge::judge(&fleet, &items, &config, &job_of(&out)).map_err(error)
            },
        );
}

/// `select_by_difficulty`: the study's hard/easy mix from a Judged table.
fn register_select_by_difficulty(engine: &mut Engine) {
    FuncRegistration::new("select_by_difficulty")
        .in_global_namespace()
        .with_params_info(["judged: DataFrame", "options: Map", "DataFrame"])
        .with_comments([
            "/// Takes `hard` (400) questions with a pass rate below `easy_min` (1.0; or at \
             most `hard_max` when given) and `easy` (100) with a pass rate of at least \
             `easy_min`, sampled with `seed` (42), and adds a `difficulty` column: the \
             study's 400 + 100 mix. Fails when a band has too few questions.",
        ])
        .register_into_engine(
            engine,
            |judged: DataFrame, opts: Map| -> RhaiResult<DataFrame> {
                check_keys(
                    &opts,
                    &["hard", "easy", "easy_min", "hard_max", "seed"],
                    "select_by_difficulty",
                )?;
                let mut s = Selection::default();
                if let Some(v) = opts.get("hard") {
                    s.hard = int(v, "hard")?;
                }
                if let Some(v) = opts.get("easy") {
                    s.easy = int(v, "easy")?;
                }
                if let Some(v) = opts.get("easy_min") {
                    s.easy_min = float(v, "easy_min")?;
                }
                if let Some(v) = opts.get("hard_max") {
                    s.hard_max = Some(float(v, "hard_max")?);
                }
                if let Some(v) = opts.get("seed") {
                    s.seed = int(v, "seed")? as u64;
                }
                judge::select_by_difficulty(&judged, &s).map_err(error)
            },
        );
}

/// `grpo`: training a model's LoRA adapters in place.
fn register_grpo(engine: &mut Engine, output: &Arc<dyn Output>) {
    let out = output.clone();
    FuncRegistration::new("grpo")
        .in_global_namespace()
        .with_params_info([
            "policy: Model",
            "items: DataFrame",
            "options: Map",
            "TrainingRun",
        ])
        .with_comments([grpo_doc()])
        .register_into_engine(
            engine,
            move |ctx: NativeCallContext, policy: ModelHandle, items: DataFrame, opts: Map| {
                grpo_with(&ctx, &out, &policy, &items, &opts)
            },
        );
}

/// `reward`: one completion scored by a built-in reward.
fn register_reward(engine: &mut Engine) {
    FuncRegistration::new("reward")
        .in_global_namespace()
        .with_params_info(["name: String", "completion: String", "item: Map", "float"])
        .with_comments([
            "/// Scores one completion with a built-in reward, as `grpo` does: `name` is \
             `accuracy`, `format`, `xmlcount` (the study's three), `binary` or `numeric`; \
             `item` is the question as a map with at least `answer` (e.g. `items.row(0)`; \
             `answer_text` and `choices` are read when present), e.g. \
             `reward(\"accuracy\", \"<think>…</think><answer>B</answer>\", item)` is 2.0 \
             when B is right.",
        ])
        .register_into_engine(
            engine,
            |name: &str, completion: &str, item: Map| -> RhaiResult<f64> {
                let builtin = Builtin::by_name(name)
                    .filter(|b| *b != Builtin::Length)
                    .ok_or_else(|| {
                        error(format!(
                            "reward: unknown reward `{name}`; use accuracy, format, xmlcount, \
                             binary or numeric (`length` depends on the token budget of \
                             training: use it in grpo)"
                        ))
                    })?;
                let question = question_of(&item)?;
                let scored = crate::reward::Scored {
                    completion,
                    question: &question,
                    tokens: 0,
                    max_tokens: 0,
                    truncated: false,
                };
                Ok(builtin.score(&scored))
            },
        );
}

/// A TrainingRun's `metrics`, `completions`, `folder` and its text form.
fn register_training_run(engine: &mut Engine) {
    FuncRegistration::new("metrics")
        .in_global_namespace()
        .with_params_info(["run: TrainingRun", "DataFrame"])
        .with_comments([
            "/// One row per step: `step`, `loss`, `reward`, `reward_std`, `reward_<name>` and \
             `reward_<name>_std` per reward, `kl`, `entropy`, `logp_mismatch` (mean |sampling \
             − training| log-prob: 0 for local rollouts), `clip_ratio`, `completion_len`, \
             `frac_zero_std`, `grad_norm`, `lr`, `step_s`, `tokens_per_s`, `gen_s`, \
             `reward_s`, `train_s`.",
        ])
        .register_into_engine(engine, |run: &mut TrainingRun| run.0.metrics.clone());
    FuncRegistration::new("completions")
        .in_global_namespace()
        .with_params_info(["run: TrainingRun", "DataFrame"])
        .with_comments([
            "/// One row per sampled completion: `step`, `id`, `completion`, `reward`, \
             `reward_<name>`, `advantage`, `tokens`, `finish`.",
        ])
        .register_into_engine(engine, |run: &mut TrainingRun| run.0.completions.clone());
    FuncRegistration::new("folder")
        .in_global_namespace()
        .with_params_info(["run: TrainingRun", "String"])
        .with_comments([
            "/// The folder holding the run's manifest, metrics, completions and checkpoint.",
        ])
        .register_into_engine(engine, |run: &mut TrainingRun| {
            run.0.dir.display().to_string()
        });
    FuncRegistration::new("to_string")
        .in_global_namespace()
        .register_into_engine(engine, |run: &mut TrainingRun| describe(&run.0));
    FuncRegistration::new("to_debug")
        .in_global_namespace()
        .register_into_engine(engine, |run: &mut TrainingRun| describe(&run.0));
}

/// `grpo`'s reference text: what it does, then every setting by its TRL name.
fn grpo_doc() -> String {
    let settings: Vec<String> = grpo::config::SETTINGS
        .iter()
        .map(|(name, what)| format!("`{name}`: {what}"))
        .collect();
    let aliases: Vec<String> = grpo::config::ALIASES
        .iter()
        .map(|(alias, name)| format!("`{alias}` for `{name}`"))
        .collect();
    format!(
        "/// Trains `policy`'s LoRA adapters in place with GRPO on the questions of `items`. \
         `rewards` is an array of built-in names (`accuracy`, `format`, `xmlcount`: the \
         study's preset and default; `binary`, `numeric`, `length`), closures \
         `|completion, item| -> number` (`item` is a map of the question's fields) and maps \
         `#{{ name, reward, weight }}`. `preset` is a built-in preset ({}) or the path of a \
         preset file (`presets/grpo/*.json`: `name`, `about`, `settings`); the other options \
         override its settings, by the names of TRL 1.16's `GRPOConfig` where TRL has the \
         setting — {}. TRL's other names are taken too: {}. An unknown option is an error. \
         The mismatch correction (`vllm_importance_sampling_*`) applies to rollouts sampled by \
         another engine; with local rollouts the sampler's log-probs are the trainer's and \
         the measured mismatch (`logp_mismatch` in the metrics) is 0. `rollout`: an \
         `endpoint(…)` of a server with vLLM's runtime LoRA API (vLLM, `rlvr serve \
         --enable-lora`) that samples each step's completions with the policy's adapter \
         loaded; training stays here, the server's log-probs go through the correction, and \
         each step's mismatch between server and trainer is printed with the adapter that \
         sampled it; with `max_staleness` s the server samples the next s steps while one \
         trains, step n by the policy of step n − s (the metrics' `staleness`; refused with \
         local rollouts). A reward closure may \
         not use the policy being trained (an error says so; score with another model).",
        grpo::config::PRESETS.join(", "),
        settings.join("; "),
        aliases.join(", ")
    )
}

fn describe(run: &GrpoRun) -> String {
    format!(
        "TrainingRun({} steps, {} completions, in {})",
        run.metrics.height(),
        run.completions.height(),
        run.dir.display()
    )
}

pub(super) fn job_of(output: &Arc<dyn Output>) -> Job {
    Job {
        progress: output.progress(),
        cancel: output.cancel(),
    }
}

pub(super) fn int(v: &Dynamic, key: &str) -> RhaiResult<usize> {
    let i = v
        .as_int()
        .map_err(|t| error(format!("option `{key}` must be an integer, not {t}")))?;
    count(i, key)
}

pub(super) fn float(v: &Dynamic, key: &str) -> RhaiResult<f64> {
    v.as_float()
        .or_else(|_| v.as_int().map(|i| i as f64))
        .map_err(|t| error(format!("option `{key}` must be a number, not {t}")))
}

fn boolean(v: &Dynamic, key: &str) -> RhaiResult<bool> {
    v.as_bool()
        .map_err(|t| error(format!("option `{key}` must be true or false, not {t}")))
}

/// Applies the sampling options present in `opts` to `s`.
fn apply_sampling(opts: &Map, s: &mut Sampling) -> RhaiResult<()> {
    if let Some(stop) = super::convert::text_list(opts, "stop")? {
        s.stop_strings = stop;
    }
    if let Some(v) = opts.get("include_stop") {
        s.include_stop = boolean(v, "include_stop")?;
    }
    if let Some(v) = opts.get("max_tokens") {
        s.max_tokens = int(v, "max_tokens")?;
    }
    if let Some(v) = opts.get("top_k") {
        s.top_k = int(v, "top_k")?;
    }
    for (key, slot) in [
        ("temperature", &mut s.temperature),
        ("top_p", &mut s.top_p),
        ("min_p", &mut s.min_p),
    ] {
        if let Some(v) = opts.get(key) {
            *slot = float(v, key)?;
        }
    }
    Ok(())
}

/// Applies `system` and `user` to a prompt template.
pub(super) fn apply_template(opts: &Map, t: &mut PromptTemplate) -> RhaiResult<()> {
    if let Some(v) = opts.get("system") {
        t.system = if v.is_unit() {
            None
        } else {
            text(opts, "system")?
        };
    }
    if let Some(user) = text(opts, "user")? {
        t.user = user;
    }
    Ok(())
}

fn judge_config(opts: &Map) -> RhaiResult<JudgeConfig> {
    check_keys(
        opts,
        &[
            "samples",
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "seed",
            "batch",
            "system",
            "user",
            "stop",
            "include_stop",
        ],
        "judge",
    )?;
    let mut config = JudgeConfig::default();
    if let Some(v) = opts.get("samples") {
        config.samples = int(v, "samples")?;
    }
    if let Some(v) = opts.get("batch") {
        config.batch = int(v, "batch")?;
    }
    if let Some(v) = opts.get("seed") {
        config.seed = int(v, "seed")? as u64;
    }
    apply_sampling(opts, &mut config.sampling)?;
    apply_template(opts, &mut config.template)?;
    Ok(config)
}

fn judge_with(
    output: &Arc<dyn Output>,
    model: &ModelHandle,
    items: &DataFrame,
    opts: &Map,
) -> RhaiResult<DataFrame> {
    let config = judge_config(opts)?;
    let lm = model.read()?;
    judge::judge(&*lm, items, &config, &job_of(output)).map_err(error)
}

/// Options of `grpo` besides the settings of [`grpo::config::SETTINGS`] and their aliases.
const GRPO_EXTRA_OPTIONS: [&str; 3] = ["preset", "rewards", "rollout"];

/// The settings of `grpo`'s options: the preset's (a built-in name or a preset file; the
/// default preset without one), then every other option by its TRL name.
fn grpo_config(opts: &Map) -> RhaiResult<GrpoConfig> {
    for key in opts.keys() {
        if !GRPO_EXTRA_OPTIONS.contains(&key.as_str()) && grpo::config::canonical(key).is_none() {
            let names: Vec<&str> = GRPO_EXTRA_OPTIONS
                .iter()
                .copied()
                .chain(grpo::config::SETTINGS.iter().map(|(k, _)| *k))
                .collect();
            return Err(error(format!(
                "grpo: unknown option `{key}`; it takes {} (and TRL's names {})",
                names.join(", "),
                grpo::config::ALIASES
                    .iter()
                    .map(|(a, _)| *a)
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    let preset = text(opts, "preset")?.unwrap_or_else(|| "default".into());
    let mut c = GrpoConfig::preset(&preset).map_err(error)?;
    let values: Vec<(String, serde_json::Value)> = opts
        .iter()
        .filter(|(k, _)| !GRPO_EXTRA_OPTIONS.contains(&k.as_str()))
        .map(|(k, v)| (k.to_string(), super::convert::to_json(v)))
        .collect();
    c.apply_all(values.iter().map(|(k, v)| (k.as_str(), v)))
        .map_err(|m| error(format!("grpo: {m}")))?;
    Ok(c)
}

/// A question from a map such as `row()` gives or a reward closure receives: `answer`
/// is required; `id`, `question`, `answer_text` (default: the answer), `subject`,
/// `category` and `choices` are read when present.
fn question_of(item: &Map) -> RhaiResult<Question> {
    let field = |key: &str| -> RhaiResult<Option<String>> {
        match item.get(key) {
            None => Ok(None),
            Some(v) if v.is_unit() => Ok(None),
            Some(v) if v.is_string() => Ok(Some(v.clone().into_string().map_err(error)?)),
            Some(v) if v.is_int() || v.is_float() => Ok(Some(v.to_string())),
            Some(v) => Err(error(format!(
                "reward: the item's `{key}` must be text, not {}",
                v.type_name()
            ))),
        }
    };
    let answer = field("answer")?.ok_or_else(|| {
        error("reward: the item has no `answer`; pass a row of an Items table, e.g. items.row(0)")
    })?;
    let choices = match item.get("choices") {
        None => vec![],
        Some(v) if v.is_unit() => vec![],
        Some(v) => match v.clone().try_cast::<Array>() {
            Some(list) => super::convert::strings(list, "choices")?,
            None => {
                return Err(error(format!(
                    "reward: the item's `choices` must be an array of texts, not {}",
                    v.type_name()
                )))
            }
        },
    };
    Ok(Question {
        id: field("id")?.unwrap_or_default(),
        question: field("question")?.unwrap_or_default(),
        subject: field("subject")?.unwrap_or_default(),
        category: field("category")?.unwrap_or_default(),
        answer_text: field("answer_text")?.unwrap_or_else(|| answer.clone()),
        choices,
        answer,
        ..Question::default()
    })
}

/// An item as the map a reward closure receives.
fn item_map(q: &Question) -> Map {
    let mut m = Map::new();
    m.insert("id".into(), q.id.clone().into());
    m.insert("dataset".into(), q.dataset.clone().into());
    m.insert("subject".into(), q.subject.clone().into());
    m.insert("category".into(), q.category.clone().into());
    m.insert("question".into(), q.question.clone().into());
    m.insert(
        "choices".into(),
        Dynamic::from_array(q.choices.iter().map(|c| c.clone().into()).collect()),
    );
    m.insert("answer".into(), q.answer.clone().into());
    m.insert("answer_text".into(), q.answer_text.clone().into());
    m
}

/// How Rhai names the functions of closures (`anon$` and a hash of the code).
const ANONYMOUS: &str = "anon$";

/// What identifies a reward closure in a training run's key: its parameters and code, the
/// values it captured, and the code of every function the script defines (the closure may
/// call any of them). Code is compared as Rhai parsed it, in [`canonical`] form, so moving a
/// closure or editing a comment keeps the identity, and editing the code or a captured value
/// changes it.
fn closure_identity(ctx: &NativeCallContext, f: &FnPtr) -> String {
    let mut functions: Vec<String> = ctx
        .iter_namespaces()
        .flat_map(|module| module.iter_script_fn_info())
        .filter(|(_, _, name, _, _)| *name == f.fn_name() || !name.starts_with(ANONYMOUS))
        .map(|(_, _, name, _, def)| {
            let shown = if name == f.fn_name() {
                "|closure|"
            } else {
                name
            };
            let params: Vec<&str> = def.params.iter().map(|p| p.as_str()).collect();
            format!(
                "{shown}({}) {}",
                params.join(", "),
                canonical(&format!("{:?}", def.body))
            )
        })
        .collect();
    functions.sort();
    functions.dedup();
    if !functions.iter().any(|d| d.starts_with("|closure|")) {
        // not a closure of the script (a named function's pointer): its name is its identity
        functions.push(format!("fn {}", f.fn_name()));
    }
    let captured = f.iter_curry().map(|v| canonical(&format!("{v:?}")));
    let mut h = Sha256::new();
    for part in functions.into_iter().chain(captured) {
        h.update((part.len() as u64).to_le_bytes());
        h.update(part.as_bytes());
    }
    let digest = h.finalize();
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Rhai's debug text of code without what differs between two parses of the same code:
/// source positions (`@ 4:32`, `, 4:35)`, `@ 2:14-31`), the hashes of function calls
/// (`hash: 123`, `hash: (1, 2)`, ` (native only)`) and the hashes naming closures
/// (`anon$` and 16 hex digits), which Rhai seeds afresh in every process.
fn canonical(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        let skip = if let Some(after) = rest.strip_prefix(" @ ") {
            position_len(after).map(|n| 3 + n)
        } else if let Some(after) = rest.strip_prefix(", ") {
            position_len(after).map(|n| 2 + n)
        } else if let Some(after) = rest.strip_prefix("hash: ") {
            hash_len(after).map(|n| "hash: ".len() + n)
        } else if rest.starts_with(" (native only)") {
            Some(" (native only)".len())
        } else if let Some(after) = rest.strip_prefix(ANONYMOUS) {
            let hex = after.bytes().take_while(u8::is_ascii_hexdigit).count();
            out.push_str(ANONYMOUS);
            Some(ANONYMOUS.len() + hex)
        } else {
            None
        };
        match skip {
            Some(n) => rest = &rest[n..],
            None => {
                out.push(c);
                rest = &rest[c.len_utf8()..];
            }
        }
    }
    out
}

/// The length of a run of ASCII digits at the start of `text`.
fn digits(text: &str) -> usize {
    text.bytes().take_while(u8::is_ascii_digit).count()
}

/// The length of a `line:column` (or `line:column-end`) position at the start of `text`.
fn position_len(text: &str) -> Option<usize> {
    let line = digits(text);
    if line == 0 || text.as_bytes().get(line) != Some(&b':') {
        return None;
    }
    let column = digits(&text[line + 1..]);
    if column == 0 {
        return None;
    }
    let mut end = line + 1 + column;
    if text.as_bytes().get(end) == Some(&b'-') && digits(&text[end + 1..]) > 0 {
        end += 1 + digits(&text[end + 1..]);
    }
    Some(end)
}

/// The length of a call hash (`123` or `(1, 2)`) at the start of `text`.
fn hash_len(text: &str) -> Option<usize> {
    let n = digits(text);
    if n > 0 {
        return Some(n);
    }
    let inner = text.strip_prefix('(')?;
    let a = digits(inner);
    let after = inner[a..].strip_prefix(", ")?;
    let b = digits(after);
    (a > 0 && b > 0 && after[b..].starts_with(')')).then_some(1 + a + 2 + b + 1)
}

fn closure_reward<'a>(
    ctx: &'a NativeCallContext,
    name: String,
    weight: f64,
    f: FnPtr,
) -> Reward<'a> {
    let identity = closure_identity(ctx, &f);
    Reward::custom(&name, weight, move |s| {
        let value: Dynamic = f
            .call_within_context(ctx, (s.completion.to_string(), item_map(s.question)))
            .map_err(|e| e.to_string())?;
        value
            .as_float()
            .or_else(|_| value.as_int().map(|i| i as f64))
            .or_else(|_| value.as_bool().map(|b| f64::from(u8::from(b))))
            .map_err(|t| format!("returned {t}, not a number"))
    })
    .identified_by(identity)
}

fn rewards_of<'a>(ctx: &'a NativeCallContext, opts: &Map) -> RhaiResult<Vec<Reward<'a>>> {
    let items: Array = match opts.get("rewards") {
        None => crate::reward::STUDY_REWARDS
            .iter()
            .map(|n| Dynamic::from(n.to_string()))
            .collect(),
        Some(v) => v
            .clone()
            .try_cast::<Array>()
            .ok_or_else(|| error("grpo: `rewards` must be an array"))?,
    };
    let mut rewards = Vec::with_capacity(items.len());
    let mut closures = 0;
    for item in items {
        if item.is_string() {
            let name = item.into_string().map_err(error)?;
            let b = Builtin::by_name(&name).ok_or_else(|| {
                error(format!(
                    "grpo: unknown reward `{name}`; built-in rewards: {}",
                    BUILTIN_REWARDS.join(", ")
                ))
            })?;
            rewards.push(Reward::builtin(b, 1.0));
        } else if item.is_fnptr() {
            closures += 1;
            let f = item.cast::<FnPtr>();
            rewards.push(closure_reward(ctx, format!("custom{closures}"), 1.0, f));
        } else if let Some(map) = item.clone().try_cast::<Map>() {
            check_keys(&map, &["name", "reward", "weight"], "grpo reward")?;
            let weight = map
                .get("weight")
                .map(|v| float(v, "weight"))
                .transpose()?
                .unwrap_or(1.0);
            let f = map
                .get("reward")
                .ok_or_else(|| error("grpo: a reward map needs `reward` (a name or a closure)"))?;
            if f.is_fnptr() {
                closures += 1;
                let name = text(&map, "name")?.unwrap_or_else(|| format!("custom{closures}"));
                rewards.push(closure_reward(ctx, name, weight, f.clone().cast::<FnPtr>()));
            } else {
                let name = f.clone().into_string().map_err(|t| {
                    error(format!(
                        "grpo: `reward` must be a name or a closure, not {t}"
                    ))
                })?;
                let b = Builtin::by_name(&name)
                    .ok_or_else(|| error(format!("grpo: unknown reward `{name}`")))?;
                rewards.push(Reward::builtin(b, weight));
            }
        } else {
            return Err(error(format!(
                "grpo: a reward is a name, a closure or a map, not {}",
                item.type_name()
            )));
        }
    }
    Ok(rewards)
}

fn grpo_with(
    ctx: &NativeCallContext,
    output: &Arc<dyn Output>,
    policy: &ModelHandle,
    items: &DataFrame,
    opts: &Map,
) -> RhaiResult<TrainingRun> {
    let config = grpo_config(opts)?;
    let rewards = rewards_of(ctx, opts)?;
    let qs = questions(items).map_err(error)?;
    let mut lm = policy.write()?;
    let job = job_of(output);
    let run = match opts.get("rollout") {
        None => grpo::train(&mut lm, &qs, &rewards, &config, &job).map_err(error)?,
        #[cfg(not(feature = "http"))]
        Some(_) => {
            return Err(error(
                "grpo: option `rollout` needs a server, and this build of rlvr has no HTTP client (cargo feature `http`)",
            ))
        }
        #[cfg(feature = "http")]
        Some(server) => {
            let server = server.clone().try_cast::<crate::endpoint::Endpoint>().ok_or_else(|| {
                error("grpo: option `rollout` must be an endpoint(…) of a server with runtime LoRA adapters")
            })?;
            let dir = config.cache_dir.join("rollout-adapters").join(format!(
                "{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis())
            ));
            let mut served = grpo::served::Served::new(server, dir, "rlvr-policy");
            let run = grpo::train_with(&mut lm, &qs, &rewards, &config, &mut served, &job);
            let unloaded = served.finish();
            let run = run.map_err(error)?;
            unloaded.map_err(error)?;
            for m in &served.mismatch {
                let by = served
                    .sampled_by
                    .iter()
                    .find(|(step, _)| *step == m.step)
                    .map_or("", |(_, name)| name.as_str());
                output.print(&format!(
                    "step {}: rollout log-prob mismatch mean |Δ| {:.2e}, max |Δ| {:.2e} over {} tokens (sampled by {by})",
                    m.step, m.mean_abs, m.max_abs, m.tokens
                ));
            }
            run
        }
    };
    Ok(TrainingRun(Arc::new(run)))
}

#[cfg(test)]
mod tests {
    use super::canonical;

    #[test]
    fn canonical_code_drops_positions_and_per_process_hashes() {
        let a = "Statements(Block[FnCall(FnCallExpr { hash: 2722733970923329961 (native only), \
                 name: \"+\", args: [FnCallExpr { hash: (143, 135), name: \"score\", args: \
                 [Variable(c #2) @ 4:32] } @ 4:25, Variable(k) @ 4:37] }, 4:35)] @ 2:14-31) \
                 Fn*(anon$f29e642f9154d76e)";
        let b = "Statements(Block[FnCall(FnCallExpr { hash: 11 (native only), \
                 name: \"+\", args: [FnCallExpr { hash: (1, 2), name: \"score\", args: \
                 [Variable(c #2) @ 9:3] } @ 9:1, Variable(k) @ 9:7] }, 9:5)] @ 8:1-3) \
                 Fn*(anon$0123456789abcdef)";
        assert_eq!(canonical(a), canonical(b));
        assert_eq!(
            canonical("[Variable(k) @ 4:37, 40.0 @ 2:26] Fn*(anon$f29e642f9154d76e)"),
            "[Variable(k), 40.0] Fn*(anon$)"
        );
        // values stay
        assert_ne!(canonical("40.0 @ 2:26"), canonical("20.0 @ 2:26"));
    }
}
