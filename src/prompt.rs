//! Prompts: the study's system prompt and question format, shared by judging and training.

use crate::data::items::letter;
use crate::data::question::Question;
use crate::model::chat::Message;

/// The Open-Medical-R1 system prompt, verbatim (its missing spaces and spelling included,
/// since the trained models saw exactly this text).
pub const STUDY_SYSTEM_PROMPT: &str = "A conversation between user and assistant. The user asks a question, and the assistant solves it. The assistant first thinks about the reasoning process in the mind and then provides the user with the answer.The reasoning process is to solve the problem step by step, so you will think about it sinceraly.The reasoning process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning process here </think><answer> answer here </answer>";

/// A question as the study's data preparation writes it: the question, then
/// `\nAnswer Choices: (A) … (B) … ` for multiple choice (its trailing space included).
pub fn study_question(q: &Question) -> String {
    if q.choices.is_empty() {
        return q.question.clone();
    }
    let mut text = format!("{}\nAnswer Choices: ", q.question);
    for (i, choice) in q.choices.iter().enumerate() {
        text.push_str(&format!("({}) {} ", letter(i), choice));
    }
    text
}

/// How a question becomes a conversation: an optional system message and a user message
/// template in which `{question}` is replaced by the question text and `{choices}` by the
/// lettered options (`(A) … (B) … `).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTemplate {
    /// The system message (Gemma's chat template folds it into the first user turn).
    pub system: Option<String>,
    /// The user message.
    pub user: String,
}

impl PromptTemplate {
    /// The study's prompt: its system prompt, and the question with `Answer Choices`.
    pub fn study() -> Self {
        PromptTemplate {
            system: Some(STUDY_SYSTEM_PROMPT.to_string()),
            user: "{question}\nAnswer Choices: {choices}".to_string(),
        }
    }

    /// The conversation for one question.
    pub fn messages(&self, q: &Question) -> Vec<Message> {
        let user = if q.choices.is_empty() {
            // an open question has no options line
            self.user
                .replace("\nAnswer Choices: {choices}", "")
                .replace("{choices}", "")
                .replace("{question}", &q.question)
        } else {
            let choices: String = q
                .choices
                .iter()
                .enumerate()
                .map(|(i, c)| format!("({}) {} ", letter(i), c))
                .collect();
            self.user
                .replace("{question}", &q.question)
                .replace("{choices}", &choices)
        };
        let mut messages = vec![];
        if let Some(system) = &self.system {
            messages.push(Message::new("system", system));
        }
        messages.push(Message::new("user", &user));
        messages
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_study_template_writes_the_study_question() {
        let q = Question {
            question: "Which drug?".into(),
            choices: vec!["Aspirin".into(), "Heparin".into()],
            ..Question::default()
        };
        let m = PromptTemplate::study().messages(&q);
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].content, study_question(&q));
        assert_eq!(
            m[1].content,
            "Which drug?\nAnswer Choices: (A) Aspirin (B) Heparin "
        );
        let open = Question {
            question: "2+2?".into(),
            ..Question::default()
        };
        assert_eq!(PromptTemplate::study().messages(&open)[1].content, "2+2?");
    }
}
