//! Script bindings for language models: `model`, `tokenize`, `detokenize`, `generate`,
//! `chat`, `logprob`, `with_lora`, `save_adapter`, `load_adapter`, `merge_and_save`.

use std::path::Path;
use std::sync::{Arc, RwLock, TryLockError};

use polars::prelude::DataFrame;
use rhai::plugin::*;
use rhai::{Array, Map};

use super::convert::{check_keys, count, error, strings, text, text_list, RhaiResult};
use super::{Area, Output};
use crate::model::chat::Message;
use crate::model::generate::Sampling;
use crate::model::lm::LanguageModel;
use crate::model::lora::LoraConfig;
use crate::model::Placement;
use crate::models::{Hub, Store};
use crate::progress::{Cancel, Job};

/// A model shared by every script value that refers to it (training changes it in place).
#[derive(Clone)]
pub struct ModelHandle(pub Arc<RwLock<LanguageModel>>);

impl ModelHandle {
    fn new(lm: LanguageModel) -> Self {
        ModelHandle(Arc::new(RwLock::new(lm)))
    }

    /// The model, to read. Fails when a call that changes it is running on this thread: a
    /// reward closure of `grpo` that uses the policy being trained would otherwise wait for
    /// itself forever.
    pub(super) fn read(&self) -> RhaiResult<std::sync::RwLockReadGuard<'_, LanguageModel>> {
        match self.0.try_read() {
            Ok(lm) => Ok(lm),
            Err(TryLockError::Poisoned(e)) => Ok(e.into_inner()),
            Err(TryLockError::WouldBlock) => Err(busy()),
        }
    }

    /// The model, to change. Fails when another call is using it (see [`ModelHandle::read`]).
    pub(super) fn write(&self) -> RhaiResult<std::sync::RwLockWriteGuard<'_, LanguageModel>> {
        match self.0.try_write() {
            Ok(lm) => Ok(lm),
            Err(TryLockError::Poisoned(e)) => Ok(e.into_inner()),
            Err(TryLockError::WouldBlock) => Err(busy()),
        }
    }
}

/// The error of a model used from inside a call that holds it (script evaluation runs on one
/// thread, so waiting for the model would never end).
fn busy() -> Box<rhai::EvalAltResult> {
    error(
        "this model is in use by the call running now: a `grpo` reward closure cannot use the \
         policy being trained (nor train it again); score with another model, e.g. \
         `model(...)` loaded separately or the base model the policy came from",
    )
}

/// The model area of the reference.
pub const AREA: Area = Area {
    title: "Models",
    intro: "A model is loaded once and shared: `with_lora` and `load_adapter` return new \
            handles over the same base weights. Prompts are tokenized as the Hugging Face \
            tokenizer does (BOS added unless the text starts with it, as `chat` output does).",
    register,
};

fn register(engine: &mut Engine, output: &Arc<dyn Output>) {
    engine.register_type_with_name::<ModelHandle>("Model");
    engine.register_global_module(exported_module!(model_functions).into());
    register_generate(engine, output);
    FuncRegistration::new("prefix_cache")
        .with_params_info(["Map"])
        .with_comments([
            "/// The process's prefix cache (the keys and values of prompt blocks that later \
             prompts start with, kept across calls): `budget_mib` (`RLVR_PREFIX_CACHE_MIB`, \
             256 by default, 0 off), `used_mib`, `blocks` (of 64 tokens), and the prompt \
             tokens of every prefill so far, `cached_tokens` (taken from the cache) and \
             `computed_tokens` (run through a model).",
        ])
        .register_into_engine(engine, || -> Map {
            let cache = crate::model::prefix::PrefixCache::global();
            let counts = cache.counts();
            let mib = |bytes: usize| Dynamic::from_float(bytes as f64 / (1 << 20) as f64);
            let mut map = Map::new();
            map.insert("budget_mib".into(), mib(cache.budget()));
            map.insert("used_mib".into(), mib(cache.used()));
            map.insert("blocks".into(), Dynamic::from_int(cache.blocks() as i64));
            map.insert(
                "cached_tokens".into(),
                Dynamic::from_int(counts.cached as i64),
            );
            map.insert(
                "computed_tokens".into(),
                Dynamic::from_int(counts.computed as i64),
            );
            map
        });
}

/// `generate` on a model, stopped between two decoding steps by an interrupt (the
/// output's cancel flag).
fn register_generate(engine: &mut Engine, output: &Arc<dyn Output>) {
    let cancel = output.cancel();
    FuncRegistration::new("generate")
        .with_params_info([
            "model: ModelHandle",
            "prompt: String",
            "options: Map",
            "String",
        ])
        .with_comments([
            "/// Completes `prompt`; options `max_tokens` (64), `temperature` (1.0; 0.0 is greedy),",
            "/// `top_k`, `top_p`, `min_p`, `seed` (0), `stop` (a string or an array of strings: the",
            "/// completion ends when its text contains one, and is cut before it). Stops at the",
            "/// model's end-of-turn tokens too.",
        ])
        .register_into_engine(
            engine,
            move |model: &mut ModelHandle, prompt: &str, options: Map| -> RhaiResult<String> {
                Ok(generate_texts(model, vec![prompt.to_string()], &options, &cancel)?.remove(0))
            },
        );
    let cancel = output.cancel();
    FuncRegistration::new("generate")
        .with_params_info(["model: ModelHandle", "prompt: String", "String"])
        .with_comments(["/// Completes `prompt` with the default options."])
        .register_into_engine(
            engine,
            move |model: &mut ModelHandle, prompt: &str| -> RhaiResult<String> {
                let texts = generate_texts(model, vec![prompt.to_string()], &Map::new(), &cancel);
                Ok(texts?.remove(0))
            },
        );
    let cancel = output.cancel();
    FuncRegistration::new("generate")
        .with_params_info([
            "model: ModelHandle",
            "prompts: Array",
            "options: Map",
            "Array",
        ])
        .with_comments([
            "/// Completes every prompt of an array in one batch (prompt `i` uses seed \
             `seed + i`).",
        ])
        .register_into_engine(
            engine,
            move |model: &mut ModelHandle, prompts: Array, options: Map| -> RhaiResult<Array> {
                let prompts = strings(prompts, "prompts")?;
                Ok(generate_texts(model, prompts, &options, &cancel)?
                    .into_iter()
                    .map(Dynamic::from)
                    .collect())
            },
        );
}

const GENERATE_OPTIONS: [&str; 7] = [
    "max_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "seed",
    "stop",
];

fn sampling(opts: &Map) -> RhaiResult<Sampling> {
    check_keys(opts, &GENERATE_OPTIONS, "generate")?;
    let mut s = Sampling::default();
    if let Some(v) = opts.get("max_tokens") {
        s.max_tokens = count(
            v.as_int()
                .map_err(|t| error(format!("max_tokens: not {t}")))?,
            "max_tokens",
        )?;
    }
    if let Some(v) = opts.get("top_k") {
        s.top_k = count(
            v.as_int().map_err(|t| error(format!("top_k: not {t}")))?,
            "top_k",
        )?;
    }
    if let Some(v) = opts.get("seed") {
        s.seed = v.as_int().map_err(|t| error(format!("seed: not {t}")))? as u64;
    }
    if let Some(stops) = text_list(opts, "stop")? {
        s.stop_strings = stops;
    }
    for (key, slot) in [
        ("temperature", &mut s.temperature),
        ("top_p", &mut s.top_p),
        ("min_p", &mut s.min_p),
    ] {
        if let Some(v) = opts.get(key) {
            *slot = v
                .as_float()
                .or_else(|_| v.as_int().map(|i| i as f64))
                .map_err(|t| error(format!("{key}: expected a number, not {t}")))?;
        }
    }
    Ok(s)
}

/// The completions of `prompts`; an interrupt (`cancel`) ends them after the decoding step
/// in flight, with an error.
fn generate_texts(
    handle: &ModelHandle,
    prompts: Vec<String>,
    opts: &Map,
    cancel: &Cancel,
) -> RhaiResult<Vec<String>> {
    let sampling = sampling(opts)?;
    let lm = handle.read()?;
    let out = lm
        .generate(&prompts, &sampling, &mut |_| !cancel.is_cancelled())
        .map_err(error)?;
    if cancel.is_cancelled() {
        return Err(error("generate: interrupted"));
    }
    Ok(out.into_iter().map(|g| g.text).collect())
}

/// Loads what `spec` names (alias, folder, `.gguf` file or hub id), with an optional
/// tokenizer file, on `placement`; the model is named by `spec`.
fn load(spec: &str, tokenizer: Option<&Path>, placement: &Placement) -> RhaiResult<ModelHandle> {
    let path = Store::default()
        .resolve(spec, &Hub::default(), &Job::silent())
        .map_err(error)?;
    let mut lm = LanguageModel::load_on(&path, tokenizer, placement).map_err(error)?;
    lm.name = spec.to_string();
    Ok(ModelHandle::new(lm))
}

fn messages_of(items: Array) -> RhaiResult<Vec<Message>> {
    items
        .into_iter()
        .map(|item| {
            let map = item
                .try_cast::<Map>()
                .ok_or_else(|| error("chat: each message is a map #{ role: …, content: … }"))?;
            let role = text(&map, "role")?.ok_or_else(|| error("chat: a message has no `role`"))?;
            let content =
                text(&map, "content")?.ok_or_else(|| error("chat: a message has no `content`"))?;
            Ok(Message::new(&role, &content))
        })
        .collect()
}

/// `next_tokens` as a table.
fn next_token_table(handle: &ModelHandle, prompt: &str, opts: &Map) -> RhaiResult<DataFrame> {
    check_keys(opts, &["k", "temperature", "top_p"], "next_tokens")?;
    let k = match opts.get("k") {
        None => 10,
        Some(v) => count(v.as_int().map_err(|t| error(format!("k: not {t}")))?, "k")?,
    };
    let number = |key: &str, default: f64| -> RhaiResult<f64> {
        opts.get(key).map_or(Ok(default), |v| {
            v.as_float()
                .or_else(|_| v.as_int().map(|i| i as f64))
                .map_err(|t| error(format!("{key}: expected a number, not {t}")))
        })
    };
    let temperature = number("temperature", 1.0)?;
    let top_p = number("top_p", 1.0)?;
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(error(format!("top_p must be in (0, 1], not {top_p}")));
    }
    let tokens = handle
        .read()?
        .next_tokens(prompt, k, temperature, top_p)
        .map_err(error)?;
    polars::df!(
        "rank" => (1..=tokens.len() as i64).collect::<Vec<_>>(),
        "id" => tokens.iter().map(|t| t.id as i64).collect::<Vec<_>>(),
        "token" => tokens.iter().map(|t| t.text.clone()).collect::<Vec<_>>(),
        "logprob" => tokens.iter().map(|t| t.logprob).collect::<Vec<_>>(),
        "prob" => tokens.iter().map(|t| t.prob).collect::<Vec<_>>(),
        "cum_prob" => tokens.iter().map(|t| t.cumulative).collect::<Vec<_>>(),
        "kept" => tokens.iter().map(|t| t.kept).collect::<Vec<_>>(),
    )
    .map_err(error)
}

#[export_module]
mod model_functions {
    use super::*;

    /// Loads a model: an alias fetched with `rlvr models fetch` (`gemma-3-270m`,
    /// `smollm2-135m-instruct`), a Hugging Face directory (`config.json`, safetensors,
    /// `tokenizer.json`, `tokenizer_config.json`), a `.gguf` file with `tokenizer.json`
    /// beside it, or a hub id `org/name` (downloaded into the Hugging Face cache). On the CPU
    /// the computation is in f32 and frozen weights stay in their GGUF blocks (or bf16/f16),
    /// decoded on the fly; elsewhere as `rlvr run --device` says.
    #[rhai_fn(name = "model", return_raw)]
    pub fn model_at(spec: &str) -> RhaiResult<ModelHandle> {
        let placement = Placement::chosen(None, None).map_err(error)?;
        load(spec, None, &placement)
    }

    /// Loads a model with options: `tokenizer` (a `tokenizer.json` to use instead of the
    /// directory's own), `device` (`"cpu"`, `"cuda"`, `"cuda:N"`; a GPU needs a build with
    /// the `cuda` feature) and `dtype` of the weights and activations (`"f32"`, `"bf16"`;
    /// f32 on the CPU and bf16 on a GPU unless given). Adapters, optimizer state and
    /// log-probabilities stay f32.
    #[rhai_fn(name = "model", return_raw)]
    pub fn model_with(spec: &str, options: Map) -> RhaiResult<ModelHandle> {
        check_keys(&options, &["tokenizer", "device", "dtype"], "model")?;
        let tokenizer = text(&options, "tokenizer")?;
        let dtype = text(&options, "dtype")?;
        let device = text(&options, "device")?;
        let placement = Placement::chosen(device.as_deref(), dtype.as_deref())
            .map_err(|e| error(format!("model: {e}")))?;
        load(spec, tokenizer.as_deref().map(Path::new), &placement)
    }

    /// Token ids of `text` as the model sees it (BOS added as the Hugging Face tokenizer
    /// adds it, unless the text already starts with it).
    #[rhai_fn(pure, return_raw)]
    pub fn tokenize(model: &mut ModelHandle, text: &str) -> RhaiResult<Array> {
        let ids = model.read()?.tokenizer.encode(text).map_err(error)?;
        Ok(ids.into_iter().map(|i| Dynamic::from(i as i64)).collect())
    }

    /// The text of token ids (special tokens kept).
    #[rhai_fn(pure, return_raw)]
    pub fn detokenize(model: &mut ModelHandle, ids: Array) -> RhaiResult<String> {
        let ids = ids
            .into_iter()
            .map(|v| {
                v.as_int()
                    .map(|i| i as u32)
                    .map_err(|t| error(format!("token ids are integers, not {t}")))
            })
            .collect::<RhaiResult<Vec<u32>>>()?;
        model.read()?.tokenizer.decode(&ids).map_err(error)
    }

    /// A user message rendered with the model's chat template, ready for `generate`.
    #[rhai_fn(name = "chat", pure, return_raw)]
    pub fn chat_user(model: &mut ModelHandle, message: &str) -> RhaiResult<String> {
        let lm = model.read()?;
        lm.tokenizer
            .chat(&[Message::new("user", message)], true)
            .map_err(error)
    }

    /// A conversation (array of `#{ role, content }`, roles `system`, `user`, `assistant`)
    /// rendered with the model's chat template, ready for the assistant's next turn.
    #[rhai_fn(name = "chat", pure, return_raw)]
    pub fn chat_messages(model: &mut ModelHandle, messages: Array) -> RhaiResult<String> {
        let messages = messages_of(messages)?;
        model.read()?.tokenizer.chat(&messages, true).map_err(error)
    }

    /// The total log-probability of `completion` after `prompt`.
    #[rhai_fn(pure, return_raw)]
    pub fn logprob(model: &mut ModelHandle, prompt: &str, completion: &str) -> RhaiResult<f64> {
        Ok(model.read()?.logprob(prompt, completion).map_err(error)? as f64)
    }

    /// The 10 most likely next tokens after `prompt`: `rank`, `id`, `token`, `logprob`,
    /// `prob`, `cum_prob`, `kept` (see the form with options).
    #[rhai_fn(name = "next_tokens", pure, return_raw)]
    pub fn next_tokens_default(model: &mut ModelHandle, prompt: &str) -> RhaiResult<DataFrame> {
        next_token_table(model, prompt, &Map::new())
    }

    /// The most likely next tokens after `prompt`, most likely first, as a table: `rank`
    /// (1 = most likely), `id`, `token` (its text), `logprob` (under the model, temperature
    /// 1), `prob` and `cum_prob` (its probability, and that of it and every likelier token,
    /// at `temperature`: what `generate` samples from) and `kept` (whether `top_p` keeps
    /// it). Options: `k` (10 rows), `temperature` (1.0; 0.0 is greedy), `top_p` (1.0).
    #[rhai_fn(name = "next_tokens", pure, return_raw)]
    pub fn next_tokens_with(
        model: &mut ModelHandle,
        prompt: &str,
        options: Map,
    ) -> RhaiResult<DataFrame> {
        next_token_table(model, prompt, &options)
    }

    /// A new model over the same base weights with fresh LoRA adapters: options `rank` (16),
    /// `alpha` (32), `targets` (module names; default every linear layer), `rslora` (false),
    /// `seed` (0).
    #[rhai_fn(pure, return_raw)]
    pub fn with_lora(model: &mut ModelHandle, options: Map) -> RhaiResult<ModelHandle> {
        check_keys(
            &options,
            &["rank", "alpha", "targets", "rslora", "seed"],
            "with_lora",
        )?;
        let mut config = LoraConfig::default();
        if let Some(v) = options.get("rank") {
            config.rank = count(
                v.as_int().map_err(|t| error(format!("rank: not {t}")))?,
                "rank",
            )?;
        }
        if let Some(v) = options.get("alpha") {
            config.alpha = v
                .as_float()
                .or_else(|_| v.as_int().map(|i| i as f64))
                .map_err(|t| error(format!("alpha: expected a number, not {t}")))?;
        }
        if let Some(targets) = text_list(&options, "targets")? {
            config.targets = targets;
        }
        if let Some(v) = options.get("rslora") {
            config.rslora = v.as_bool().map_err(|t| error(format!("rslora: not {t}")))?;
        }
        if let Some(v) = options.get("seed") {
            config.seed = v.as_int().map_err(|t| error(format!("seed: not {t}")))? as u64;
        }
        let policy = model.read()?.with_lora(&config).map_err(error)?;
        Ok(ModelHandle::new(policy))
    }

    /// Writes the model's adapter to `dir` in PEFT's format (`adapter_config.json`,
    /// `adapter_model.safetensors`). Under `rlvr run` the files' hashes go into the run's
    /// manifest.
    #[rhai_fn(pure, return_raw)]
    pub fn save_adapter(model: &mut ModelHandle, dir: &str) -> RhaiResult<()> {
        model.write()?.save_adapter(Path::new(dir)).map_err(error)?;
        crate::report::RunRecord::note_artifact(&format!("adapter {dir}"), Path::new(dir))
            .map_err(error)
    }

    /// Writes the model with its adapter merged into the weights to `dir` as a Hugging Face
    /// directory (`config.json`, `model.safetensors`, tokenizer files), for serving with
    /// transformers, vLLM or llama.cpp.
    #[rhai_fn(pure, return_raw)]
    pub fn merge_and_save(model: &mut ModelHandle, dir: &str) -> RhaiResult<()> {
        model.read()?.merge_and_save(Path::new(dir)).map_err(error)
    }

    /// A new model over the same base weights with the PEFT adapter in `dir` attached.
    #[rhai_fn(pure, return_raw)]
    pub fn load_adapter(model: &mut ModelHandle, dir: &str) -> RhaiResult<ModelHandle> {
        let tuned = model.read()?.load_adapter(Path::new(dir)).map_err(error)?;
        Ok(ModelHandle::new(tuned))
    }

    /// A short description: where the model came from and its adapter.
    #[rhai_fn(global, name = "to_string", pure)]
    pub fn describe(model: &mut ModelHandle) -> String {
        let Ok(lm) = model.read() else {
            return "Model(in use by the call running now)".into();
        };
        match &lm.lora {
            Some(l) => format!("Model({}, LoRA r={} alpha={})", lm.name, l.rank, l.alpha),
            None => format!("Model({})", lm.name),
        }
    }

    /// The description, for `debug`.
    #[rhai_fn(global, name = "to_debug", pure)]
    pub fn describe_debug(model: &mut ModelHandle) -> String {
        describe(model)
    }
}
