//! Chat templates: the Jinja template of a model's `tokenizer_config.json`, rendered as
//! transformers' `apply_chat_template` does (`trim_blocks`, `lstrip_blocks`,
//! `raise_exception`). Gemma's template folds a system message into the first user turn.

use minijinja::{context, Environment, Error, ErrorKind};
use serde::Serialize;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// What was said.
    pub content: String,
}

impl Message {
    /// A turn with `role` and `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.to_string(),
            content: content.to_string(),
        }
    }
}

/// Renders `messages` with `template`; `add_generation_prompt` appends the opening of the
/// assistant's turn.
pub fn render(
    template: &str,
    messages: &[Message],
    bos_token: &str,
    eos_token: &str,
    add_generation_prompt: bool,
) -> Result<String, Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, message))
        },
    );
    let template = env.template_from_str(template)?;
    template.render(context! {
        messages => messages,
        bos_token => bos_token,
        eos_token => eos_token,
        add_generation_prompt => add_generation_prompt,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gemma_template() -> String {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/gemma-3-270m/chat_template.jinja"
        );
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn gemma_user_turn_renders_as_transformers_does() {
        let fixture: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/gemma-3-270m/chat_example.json"
            ))
            .unwrap(),
        )
        .unwrap();
        let text = render(
            &gemma_template(),
            &[Message::new("user", "What is the capital of France?")],
            "<bos>",
            "<eos>",
            true,
        )
        .unwrap();
        assert_eq!(text, fixture["rendered"].as_str().unwrap());
    }

    #[test]
    fn gemma_folds_the_system_message_into_the_first_user_turn() {
        let text = render(
            &gemma_template(),
            &[
                Message::new("system", "Answer briefly."),
                Message::new("user", "Why?"),
                Message::new("assistant", "Because."),
                Message::new("user", "Sure?"),
            ],
            "<bos>",
            "<eos>",
            false,
        )
        .unwrap();
        assert_eq!(
            text,
            "<bos><start_of_turn>user\nAnswer briefly.\n\nWhy?<end_of_turn>\n\
             <start_of_turn>model\nBecause.<end_of_turn>\n\
             <start_of_turn>user\nSure?<end_of_turn>\n"
        );
    }

    #[test]
    fn template_errors_surface() {
        let err = render(
            &gemma_template(),
            &[Message::new("assistant", "first")],
            "<bos>",
            "<eos>",
            true,
        )
        .unwrap_err();
        assert!(err.to_string().contains("must alternate"), "{err}");
    }
}
