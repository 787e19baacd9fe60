//! The tokenizer against Hugging Face's on the tiny Gemma-pipeline tokenizer
//! (`reference/make_tokenizer_fixture.py`): ids with and without special tokens, decoding,
//! and the chat template. One deliberate difference: text that already starts with `<bos>`
//! gets no second one here (Hugging Face adds it).

use rlvr::model::chat::Message;
use rlvr::model::tokenizer::Tokenizer;
use serde_json::Value;

use crate::repo;

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn encoding_decoding_and_chat_equal_transformers() {
    let tokenizer =
        Tokenizer::from_file(&repo("tests/fixtures/tiny-tokenizer/tokenizer.json")).unwrap();
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("tests/fixtures/tiny-tokenizer/expected.json")).unwrap(),
    )
    .unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert!(cases.len() >= 12);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let plain = ids(&case["ids_plain"]);
        assert_eq!(tokenizer.encode_plain(text).unwrap(), plain, "{text:?}");
        assert_eq!(
            tokenizer.decode(&plain).unwrap(),
            case["decoded"].as_str().unwrap(),
            "{text:?}"
        );
        let with_special = ids(&case["ids_with_special"]);
        if text.starts_with("<bos>") {
            assert_eq!(with_special[..2], [2, 2], "Hugging Face doubles the BOS");
            assert_eq!(
                tokenizer.encode(text).unwrap(),
                with_special[1..],
                "{text:?}"
            );
        } else {
            assert_eq!(tokenizer.encode(text).unwrap(), with_special, "{text:?}");
        }
    }
    let chat = &expected["chat"];
    let rendered = tokenizer
        .chat(&[Message::new("user", "What is 2 + 2?")], true)
        .unwrap();
    assert_eq!(rendered, chat["text"].as_str().unwrap());
    assert_eq!(tokenizer.encode(&rendered).unwrap(), ids(&chat["ids"]));
    assert_eq!(tokenizer.stop_ids(), vec![1, 5]);
}

#[test]
fn a_tokenizer_larger_than_the_model_is_refused() {
    let mut json: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("tests/fixtures/tiny-tokenizer/tokenizer.json")).unwrap(),
    )
    .unwrap();
    let vocab = json["model"]["vocab"].as_object_mut().unwrap();
    for i in 0..40 {
        vocab.insert(format!("extra{i}"), Value::from(512 + i));
    }
    let dir = std::env::temp_dir().join(format!("rlvr-bigtok-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tokenizer.json");
    std::fs::write(&path, json.to_string()).unwrap();
    let model_dir = repo("tests/fixtures/tiny-gemma3");
    let err = match rlvr::model::lm::LanguageModel::load(
        &model_dir,
        Some(&path),
        &candle_core::Device::Cpu,
    ) {
        Ok(_) => panic!("a 552-token tokenizer must not load with a 512-token model"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("tokenizer.json") && err.contains("552") && err.contains("512"),
        "{err}"
    );
}
