//! vLLM's runtime LoRA API for `rlvr serve --enable-lora`: `POST /v1/load_lora_adapter`
//! (`{"lora_name": …, "lora_path": …}`, a PEFT adapter folder, with vLLM's optional
//! `load_inplace`), `POST /v1/unload_lora_adapter` (`{"lora_name": …}`), the loaded adapters
//! listed by `/v1/models` (with `root`, the folder, and `parent`, the base model), and
//! per-request adapters: a completion whose `model` names a loaded adapter runs with it.
//!
//! Replies are vLLM's: a success is HTTP 200 with a plain-text body (`Success: LoRA adapter
//! 'x' added successfully.`), an error is HTTP 400 or 404 with OpenAI's error shape, vLLM's
//! `type` (`InvalidUserInput`, `NotFoundError`, `BadRequestError`) and the status as `code`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};

use rlvr::model::lm::LanguageModel;

/// An adapter loaded into the server.
pub struct Adapter {
    /// The name requests use as their `model`.
    pub name: String,
    /// The folder it was loaded from, as given.
    pub path: String,
    /// The base model with this adapter attached (sharing the base's weights).
    pub lm: LanguageModel,
}

/// The adapters a server holds, in the order they were loaded.
pub struct Adapters {
    /// The served model's name: no adapter may take it.
    base_name: String,
    /// The model adapters are attached to.
    base: LanguageModel,
    loaded: Mutex<Vec<Arc<Adapter>>>,
    created: u64,
}

/// An HTTP answer: status and body (a JSON string is sent as plain text).
pub type Answer = (u16, Value);

impl Adapters {
    /// No adapters yet, over `base` (served as `base_name`).
    pub fn new(base: LanguageModel, base_name: &str, created: u64) -> Self {
        Adapters {
            base_name: base_name.to_string(),
            base,
            loaded: Mutex::new(Vec::new()),
            created,
        }
    }

    /// The loaded adapter named `name`.
    pub fn get(&self, name: &str) -> Option<Arc<Adapter>> {
        let loaded = self.loaded.lock().expect("adapters lock");
        loaded.iter().find(|a| a.name == name).cloned()
    }

    /// `/v1/models` cards of the loaded adapters, as vLLM lists them.
    pub fn cards(&self) -> Vec<Value> {
        let loaded = self.loaded.lock().expect("adapters lock");
        loaded
            .iter()
            .map(|a| {
                json!({"id": a.name, "object": "model", "created": self.created,
                       "owned_by": "rlvr", "root": a.path, "parent": self.base_name})
            })
            .collect()
    }

    /// `POST /v1/load_lora_adapter`: reads the PEFT adapter at `lora_path` and serves it as
    /// `lora_name`; with `load_inplace: true` an adapter of that name is replaced (requests
    /// already running keep the one they started with).
    pub fn load(&self, body: &Value) -> Answer {
        let name = body.get("lora_name").and_then(Value::as_str).unwrap_or("");
        let path = body.get("lora_path").and_then(Value::as_str).unwrap_or("");
        if name.is_empty() || path.is_empty() {
            return error(
                400,
                "InvalidUserInput",
                "Both 'lora_name' and 'lora_path' must be provided.",
            );
        }
        if name == self.base_name {
            return error(
                400,
                "InvalidUserInput",
                &format!("The lora adapter name '{name}' is the served base model's name."),
            );
        }
        let inplace = body
            .get("load_inplace")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if !inplace && self.get(name).is_some() {
            return error(
                400,
                "InvalidUserInput",
                &format!(
                    "The lora adapter '{name}' has already been loaded. If you want to load \
                     the adapter in place, set 'load_inplace' to true."
                ),
            );
        }
        if !Path::new(path).join("adapter_config.json").is_file() {
            return error(
                404,
                "NotFoundError",
                &format!("No adapter found for {path} (no adapter_config.json in it)"),
            );
        }
        let lm = match self.base.load_adapter(Path::new(path)) {
            Ok(lm) => lm,
            Err(e) => {
                let message = e.to_string();
                let first = message.lines().next().unwrap_or_default();
                return error(400, "BadRequestError", first);
            }
        };
        let adapter = Arc::new(Adapter {
            name: name.to_string(),
            path: path.to_string(),
            lm,
        });
        let mut loaded = self.loaded.lock().expect("adapters lock");
        match loaded.iter().position(|a| a.name == name) {
            Some(at) if inplace => loaded[at] = adapter,
            Some(_) => {
                // loaded by a concurrent request meanwhile
                return error(
                    400,
                    "InvalidUserInput",
                    &format!("The lora adapter '{name}' has already been loaded."),
                );
            }
            None => loaded.push(adapter),
        }
        (
            200,
            json!(format!(
                "Success: LoRA adapter '{name}' added successfully."
            )),
        )
    }

    /// `POST /v1/unload_lora_adapter`: forgets the adapter named `lora_name` (requests
    /// already running finish with it).
    pub fn unload(&self, body: &Value) -> Answer {
        let Some(name) = body
            .get("lora_name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        else {
            return error(
                400,
                "InvalidUserInput",
                "either 'lora_name' and 'lora_int_id' needs to be provided.",
            );
        };
        let mut loaded = self.loaded.lock().expect("adapters lock");
        let before = loaded.len();
        loaded.retain(|a| a.name != name);
        if loaded.len() == before {
            return error(
                404,
                "NotFoundError",
                &format!("The lora adapter '{name}' cannot be found."),
            );
        }
        (
            200,
            json!(format!(
                "Success: LoRA adapter '{name}' removed successfully."
            )),
        )
    }
}

/// The answer to a LoRA route when the server was started without `--enable-lora` (vLLM
/// does not have the routes then).
pub fn disabled(route: &str) -> Answer {
    error(
        404,
        "NotFoundError",
        &format!(
            "{route}: runtime LoRA adapters are off; start rlvr serve with --enable-lora (as \
             vLLM needs --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"
        ),
    )
}

/// vLLM's error reply: OpenAI's shape with vLLM's error type and the status as `code`.
fn error(status: u16, kind: &str, message: &str) -> Answer {
    (
        status,
        json!({"error": {"message": message, "type": kind, "param": null, "code": status}}),
    )
}
