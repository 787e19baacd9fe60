//! The malformed-input campaign. Every case below is one bad file or value, read by a
//! one-line script under `rlvr run`: the run must end with exit status 1 and an error that
//! names the file and the line, row, field, setting or tensor at fault — never a panic.
//!
//! The small files live in the corpus (`tests/data/bad/`, described in its README); the big
//! ones (huge lines) and those cut or altered from the real fixtures (truncated GGUF and
//! safetensors, wrong dtypes and shapes, model folders around a bad `config.json` or
//! tokenizer, PEFT adapters around a bad `adapter_config.json`) are made by [`generate`]
//! before the run. In the calls, `BAD` is the corpus, `GEN` the generated folder, `LLAMA` the
//! tiny Llama fixture and `TOK` the tiny tokenizer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::repo;

/// One bad input: what is wrong, the script statement that reads it, and what the error
/// must contain (the file's name first).
struct Case {
    what: &'static str,
    call: &'static str,
    names: &'static [&'static str],
}

const fn case(what: &'static str, call: &'static str, names: &'static [&'static str]) -> Case {
    Case { what, call, names }
}

/// The tiny Llama with the tiny tokenizer, as every adapter case loads it.
macro_rules! adapter {
    ($dir:literal) => {
        concat!(
            r#"model("LLAMA", #{ tokenizer: "TOK" }).load_adapter("GEN/"#,
            $dir,
            r#"")"#
        )
    };
}

#[rustfmt::skip]
const CASES: &[Case] = &[
    // ---- MedQA -------------------------------------------------------------------------
    case("medqa: line 2 is not JSON", r#"load("medqa", "BAD/medqa_malformed.jsonl")"#,
        &["medqa_malformed.jsonl", "line 2", "malformed JSON"]),
    case("medqa: line 3 has no question", r#"load("medqa", "BAD/medqa_missing_question.jsonl")"#,
        &["medqa_missing_question.jsonl", "line 3", "`question`", "missing"]),
    case("medqa: answer E with options A–D", r#"load("medqa", "BAD/medqa_answer_outside.jsonl")"#,
        &["medqa_answer_outside.jsonl", "line 2", "`answer_idx`", "`E`", "A–D"]),
    case("medqa: options A, B, D", r#"load("medqa", "BAD/medqa_option_gap.jsonl")"#,
        &["medqa_option_gap.jsonl", "line 1", "`options`", "`C`"]),
    case("medqa: options is a list", r#"load("medqa", "BAD/medqa_options_list.jsonl")"#,
        &["medqa_options_list.jsonl", "line 1", "`options`", "expected an object"]),
    case("medqa: question is an object", r#"load("medqa", "BAD/medqa_question_object.jsonl")"#,
        &["medqa_question_object.jsonl", "line 2", "`question`", "found an object"]),
    case("medqa: option B is a number", r#"load("medqa", "BAD/medqa_option_number.jsonl")"#,
        &["medqa_option_number.jsonl", "line 1", "`options.B`", "expected text"]),
    case("medqa: answer_idx is null", r#"load("medqa", "BAD/medqa_answer_null.jsonl")"#,
        &["medqa_answer_null.jsonl", "line 1", "`answer_idx`", "null"]),
    case("medqa: the last line is cut", r#"load("medqa", "BAD/medqa_truncated.jsonl")"#,
        &["medqa_truncated.jsonl", "line 2", "malformed JSON"]),
    case("medqa: invalid UTF-8", r#"load("medqa", "BAD/medqa_invalid_utf8.jsonl")"#,
        &["medqa_invalid_utf8.jsonl", "line 1", "UTF-8"]),
    case("medqa: empty file", r#"load("medqa", "BAD/empty.jsonl")"#,
        &["empty.jsonl", "empty"]),
    case("medqa: a folder without a split file", r#"load("medqa", "BAD/medqa_no_split")"#,
        &["medqa_no_split", "no file for split `test`"]),
    case("medqa: a 16 MB line that never closes", r#"load("medqa", "GEN/huge_line.jsonl")"#,
        &["huge_line.jsonl", "line 2", "malformed JSON"]),
    // ---- GSM8K -------------------------------------------------------------------------
    case("gsm8k: a Latin-1 byte", r#"load("gsm8k", "BAD/gsm8k_latin1.jsonl")"#,
        &["gsm8k_latin1.jsonl", "line 2", "UTF-8"]),
    case("gsm8k: no #### line", r#"load("gsm8k", "BAD/gsm8k_no_final.jsonl")"#,
        &["gsm8k_no_final.jsonl", "line 2", "`answer`", "####"]),
    case("gsm8k: #### without a number", r#"load("gsm8k", "BAD/gsm8k_empty_final.jsonl")"#,
        &["gsm8k_empty_final.jsonl", "line 1", "`answer`", "no number"]),
    case("gsm8k: line 2 has no answer", r#"load("gsm8k", "BAD/gsm8k_missing_answer.jsonl")"#,
        &["gsm8k_missing_answer.jsonl", "line 2", "`answer`", "missing"]),
    case("gsm8k: answer is a list", r#"load("gsm8k", "BAD/gsm8k_answer_list.jsonl")"#,
        &["gsm8k_answer_list.jsonl", "line 1", "`answer`", "found an array"]),
    case("gsm8k: blank lines only", r#"load("gsm8k", "BAD/gsm8k_blank.jsonl")"#,
        &["gsm8k_blank.jsonl", "empty"]),
    case("gsm8k: empty file", r#"load("gsm8k", "BAD/empty.jsonl")"#,
        &["empty.jsonl", "empty"]),
    // ---- MMLU --------------------------------------------------------------------------
    case("mmlu: a row of 5 columns", r#"load("mmlu", "BAD/mmlu_columns")"#,
        &["anatomy_test.csv", "line 3", "expected 6 columns, found 5"]),
    case("mmlu: answer F", r#"load("mmlu", "BAD/mmlu_answer")"#,
        &["anatomy_test.csv", "line 2", "`answer`", "`F`"]),
    case("mmlu: unknown subject", r#"load("mmlu", "BAD/mmlu_subject")"#,
        &["astrology_test.csv", "unknown MMLU subject `astrology`"]),
    case("mmlu: a quote that never closes", r#"load("mmlu", "BAD/mmlu_quoting")"#,
        &["anatomy_test.csv", "line 2", "columns"]),
    case("mmlu: invalid UTF-8", r#"load("mmlu", "BAD/mmlu_utf8")"#,
        &["virology_test.csv", "line 2", "UTF-8"]),
    case("mmlu: empty subject file", r#"load("mmlu", "BAD/mmlu_empty")"#,
        &["anatomy_test.csv", "empty"]),
    case("mmlu: no file of the split", r#"load("mmlu", "BAD/mmlu_no_split")"#,
        &["mmlu_no_split", "test"]),
    case("mmlu: blank question", r#"load("mmlu", "BAD/mmlu_blank")"#,
        &["anatomy_test.csv", "line 1", "`question`", "empty"]),
    // ---- CMMLU -------------------------------------------------------------------------
    case("cmmlu: header without Answer", r#"load("cmmlu", "BAD/cmmlu_header")"#,
        &["anatomy.csv", "line 1", "`Answer`", "missing column"]),
    case("cmmlu: answer E", r#"load("cmmlu", "BAD/cmmlu_answer")"#,
        &["anatomy.csv", "line 3", "`Answer`", "`E`"]),
    case("cmmlu: a quote that never closes", r#"load("cmmlu", "BAD/cmmlu_quoting")"#,
        &["anatomy.csv", "line 2", "columns"]),
    case("cmmlu: a row of 8 columns", r#"load("cmmlu", "BAD/cmmlu_columns")"#,
        &["anatomy.csv", "line 3", "expected 7 columns, found 8"]),
    case("cmmlu: unknown subject", r#"load("cmmlu", "BAD/cmmlu_subject")"#,
        &["astrology.csv", "unknown CMMLU subject `astrology`"]),
    // ---- MMLU-Pro ----------------------------------------------------------------------
    case("mmlu_pro: answer D with three options", r#"load("mmlu_pro", "BAD/mmlu_pro_answer.json")"#,
        &["mmlu_pro_answer.json", "row 1", "`answer`", "`D`", "A–C"]),
    case("mmlu_pro: unknown category", r#"load("mmlu_pro", "BAD/mmlu_pro_category.json")"#,
        &["mmlu_pro_category.json", "row 0", "`category`", "astrology"]),
    case("mmlu_pro: options is text", r#"load("mmlu_pro", "BAD/mmlu_pro_options.json")"#,
        &["mmlu_pro_options.json", "row 0", "`options`"]),
    case("mmlu_pro: no answer", r#"load("mmlu_pro", "BAD/mmlu_pro_missing_answer.json")"#,
        &["mmlu_pro_missing_answer.json", "row 0", "`answer`", "missing"]),
    case("mmlu_pro: an object, not an array", r#"load("mmlu_pro", "BAD/mmlu_pro_object.json")"#,
        &["mmlu_pro_object.json", "expected a JSON array"]),
    case("mmlu_pro: cut JSON", r#"load("mmlu_pro", "BAD/mmlu_pro_truncated.json")"#,
        &["mmlu_pro_truncated.json", "line 2", "malformed JSON"]),
    case("mmlu_pro: truncated parquet", r#"load("mmlu_pro", "GEN/mmlu_pro_cut")"#,
        &["test-00000-of-00001.parquet"]),
    // ---- one's own files ---------------------------------------------------------------
    case("jsonl: line 2 is an array", r#"load("jsonl", "BAD/not_object.jsonl")"#,
        &["not_object.jsonl", "line 2", "expected a JSON object"]),
    case("csv: a label naming no option", r#"load("csv", "BAD/own_answer.csv", #{ question: "q", choices: ["o1", "o2"], answer: "label" })"#,
        &["own_answer.csv", "line 3", "`label`", "`eight`"]),
    case("jsonl: a numeric answer, answer_index not given", r#"load("jsonl", "BAD/own_numeric_answer.jsonl")"#,
        &["own_numeric_answer.jsonl", "line 1", "`answer`", "answer 1 could mean B (0-based) or A (1-based): set answer_index: 0 or 1"]),
    case("jsonl: index 5 of four options, 1-based", r#"load("jsonl", "BAD/own_index_range.jsonl", #{ answer_index: 1 })"#,
        &["own_index_range.jsonl", "line 2", "`answer`", "index 5 is out of range"]),
    case("csv: index 0, 1-based", r#"load("csv", "BAD/own_index_zero.csv", #{ answer_index: 1 })"#,
        &["own_index_zero.csv", "line 2", "`answer`", "index 0 is out of range"]),
    case("jsonl: answer 1.5", r#"load("jsonl", "BAD/own_float_answer.jsonl", #{ answer_index: 0 })"#,
        &["own_float_answer.jsonl", "line 1", "`answer`", "not a whole number"]),
    case("jsonl: answer true", r#"load("jsonl", "BAD/own_answer_bool.jsonl")"#,
        &["own_answer_bool.jsonl", "line 1", "`answer`", "a boolean"]),
    case("answer_index 2", r#"load("jsonl", "BAD/own_numeric_answer.jsonl", #{ answer_index: 2 })"#,
        &["answer_index", "must be 0 or 1"]),
    case("an unknown load option", r#"load("jsonl", "BAD/own_numeric_answer.jsonl", #{ answer_idx: 1 })"#,
        &["answer_idx"]),
    case("jsonl: the mapped question column is absent", r#"load("jsonl", "BAD/own_missing_column.jsonl", #{ question: "prompt" })"#,
        &["own_missing_column.jsonl", "line 1", "`prompt`", "missing"]),
    case("jsonl: choices is text", r#"load("jsonl", "BAD/own_choices_not_list.jsonl")"#,
        &["own_choices_not_list.jsonl", "line 1", "`choices`", "list"]),
    case("jsonl: a choice is an object", r#"load("jsonl", "BAD/own_choice_object.jsonl")"#,
        &["own_choice_object.jsonl", "line 1", "`choices[1]`", "found an object"]),
    case("jsonl: medical is neither true nor false", r#"load("jsonl", "BAD/own_medical_flag.jsonl", #{ medical: "medical" })"#,
        &["own_medical_flag.jsonl", "line 1", "`medical`", "true or false"]),
    case("csv: a quote that never closes", r#"load("csv", "BAD/own_quoting.csv")"#,
        &["own_quoting.csv", "line 2", "columns"]),
    case("csv: a row of 3 columns", r#"load("csv", "BAD/own_columns.csv")"#,
        &["own_columns.csv", "line 3", "expected 2 columns, found 3"]),
    case("csv: a Latin-1 byte", r#"load("csv", "BAD/own_latin1.csv")"#,
        &["own_latin1.csv", "line 3", "UTF-8"]),
    case("csv: a header and no rows", r#"load("csv", "BAD/own_header_only.csv")"#,
        &["own_header_only.csv", "no records"]),
    case("csv: blank question", r#"load("csv", "BAD/own_empty_question.csv")"#,
        &["own_empty_question.csv", "line 3", "`question`", "empty"]),
    case("csv: a 16 MB line of one column", r#"load("csv", "GEN/huge_line.csv")"#,
        &["huge_line.csv", "line 2", "expected 2 columns, found 1"]),
    case("json: an array of numbers", r#"load("json", "BAD/own_numbers.json")"#,
        &["own_numbers.json", "row 0", "expected a JSON object"]),
    case("json: cut JSON", r#"load("json", "BAD/own_truncated.json")"#,
        &["own_truncated.json", "line 1", "malformed JSON"]),
    case("json: one object", r#"load("json", "BAD/own_one_object.json")"#,
        &["own_one_object.json", "expected a JSON array of objects"]),
    case("json: JSON lines whose line 3 is cut", r#"load("json", "BAD/own_bad_line.json")"#,
        &["own_bad_line.json", "line 3", "malformed JSON"]),
    case("parquet: a text file", r#"load("parquet", "BAD/own_not_parquet.parquet")"#,
        &["own_not_parquet.parquet"]),
    case("parquet: question is a list of numbers", r#"load("parquet", "GEN/wrong_type.parquet")"#,
        &["wrong_type.parquet", "row 0", "`question`", "found an array"]),
    case("load(path): an unknown extension", r#"load("BAD/table.tsv")"#,
        &["table.tsv", "unknown format `.tsv`"]),
    case("an unknown dataset kind", r#"load("mmlx", "BAD/empty.jsonl")"#,
        &["unknown dataset `mmlx`", "medqa", "gsm8k"]),
    case("a path that does not exist", r#"load("mmlu", "BAD/no_such_dir")"#,
        &["no_such_dir", "no such file"]),
    // ---- model files -------------------------------------------------------------------
    case("gguf: empty file", r#"model("BAD/model/empty.gguf")"#,
        &["empty.gguf", "GGUF"]),
    case("gguf: a text file", r#"model("BAD/model/not_gguf.gguf")"#,
        &["not_gguf.gguf", "GGUF"]),
    case("gguf: general.alignment 0", r#"model("BAD/model/gguf_alignment_zero.gguf")"#,
        &["gguf_alignment_zero.gguf", "header is corrupt"]),
    case("gguf: a tensor of 2^80 elements", r#"model("GEN/huge_tensor.gguf", #{ tokenizer: "TOK" })"#,
        &["huge_tensor.gguf", "`token_embd.weight`", "does not fit"]),
    case("gguf: cut inside the header", r#"model("GEN/cut_header.gguf")"#,
        &["cut_header.gguf", "GGUF"]),
    case("gguf: cut inside the tensor data", r#"model("GEN/cut_data.gguf")"#,
        &["cut_data.gguf", "tensor `"]),
    case("safetensors: cut in half", r#"model("GEN/st_cut", #{ tokenizer: "TOK" })"#,
        &["model.safetensors"]),
    case("safetensors: a header that is not JSON", r#"model("GEN/st_garbage", #{ tokenizer: "TOK" })"#,
        &["model.safetensors", "header"]),
    case("safetensors: a header length of 2^62", r#"model("GEN/st_huge_header", #{ tokenizer: "TOK" })"#,
        &["model.safetensors", "header"]),
    case("safetensors: a weight stored as i64", r#"model("GEN/st_int", #{ tokenizer: "TOK" })"#,
        &["model.safetensors", "`model.layers.0.self_attn.q_proj.weight`", "not floating-point"]),
    case("safetensors: a weight of the wrong shape", r#"model("GEN/st_shape", #{ tokenizer: "TOK" })"#,
        &["model.safetensors", "`model.layers.0.self_attn.k_proj.weight`", "shape [64, 32]"]),
    case("safetensors: a weight missing", r#"model("GEN/st_missing", #{ tokenizer: "TOK" })"#,
        &["model.safetensors", "`model.layers.3.mlp.down_proj.weight`", "missing"]),
    case("safetensors: no weights file", r#"model("GEN/no_weights", #{ tokenizer: "TOK" })"#,
        &["model.safetensors"]),
    case("config.json: no hidden_size", r#"model("GEN/config_missing_hidden_size", #{ tokenizer: "TOK" })"#,
        &["config.json", "`hidden_size`"]),
    case("config.json: no num_hidden_layers", r#"model("GEN/config_missing_layers", #{ tokenizer: "TOK" })"#,
        &["config.json", "`num_hidden_layers`"]),
    case("config.json: hidden_size is text", r#"model("GEN/config_wrong_type", #{ tokenizer: "TOK" })"#,
        &["config.json", "`hidden_size`", "integer"]),
    case("config.json: an unknown architecture", r#"model("GEN/config_unknown_arch", #{ tokenizer: "TOK" })"#,
        &["config.json", "`bert`"]),
    case("config.json: intermediate_size disagrees with the weights", r#"model("GEN/config_wrong_size", #{ tokenizer: "TOK" })"#,
        &["model.safetensors", "`model.layers.0.mlp.gate_proj.weight`", "[96, 64]"]),
    case("config.json: cut JSON", r#"model("GEN/config_not_json", #{ tokenizer: "TOK" })"#,
        &["config.json", "not valid JSON"]),
    case("config.json: absent", r#"model("GEN/no_config", #{ tokenizer: "TOK" })"#,
        &["config.json"]),
    case("tokenizer.json: cut JSON", r#"model("GEN/tokenizer_truncated")"#,
        &["tokenizer.json"]),
    case("tokenizer.json: JSON but no tokenizer", r#"model("GEN/tokenizer_not_a_tokenizer")"#,
        &["tokenizer.json"]),
    case("tokenizer_config.json: cut JSON", r#"model("GEN/tokenizer_config_not_json")"#,
        &["tokenizer_config.json"]),
    case("tokenizer.json: absent", r#"model("GEN/no_tokenizer")"#,
        &["tokenizer.json"]),
    // ---- PEFT adapters -----------------------------------------------------------------
    case("adapter: use_dora", adapter!("adapter_use_dora"),
        &["adapter_config.json", "`use_dora: true`"]),
    case("adapter: rank_pattern", adapter!("adapter_rank_pattern"),
        &["adapter_config.json", "`rank_pattern"]),
    case("adapter: alpha_pattern", adapter!("adapter_alpha_pattern"),
        &["adapter_config.json", "`alpha_pattern"]),
    case("adapter: modules_to_save", adapter!("adapter_modules_to_save"),
        &["adapter_config.json", "`modules_to_save", "lm_head"]),
    case("adapter: bias all", adapter!("adapter_bias_all"),
        &["adapter_config.json", "`bias: \"all\"`"]),
    case("adapter: bias lora_only", adapter!("adapter_bias_lora_only"),
        &["adapter_config.json", "`bias: \"lora_only\"`"]),
    case("adapter: lora_bias", adapter!("adapter_lora_bias"),
        &["adapter_config.json", "`lora_bias: true`"]),
    case("adapter: layers_to_transform", adapter!("adapter_layers_to_transform"),
        &["adapter_config.json", "`layers_to_transform"]),
    case("adapter: exclude_modules", adapter!("adapter_exclude_modules"),
        &["adapter_config.json", "`exclude_modules"]),
    case("adapter: lm_head among the targets", adapter!("adapter_target_unknown"),
        &["adapter_config.json", "`target_modules`", "\"lm_head\""]),
    case("adapter: target_modules as a pattern", adapter!("adapter_target_regex"),
        &["adapter_config.json", "`target_modules`", "pattern"]),
    case("adapter: an IA3 adapter", adapter!("adapter_peft_type_ia3"),
        &["adapter_config.json", "`peft_type`", "IA3"]),
    case("adapter: r 0", adapter!("adapter_rank_zero"),
        &["adapter_config.json", "`r`"]),
    case("adapter: no lora_alpha", adapter!("adapter_no_alpha"),
        &["adapter_config.json", "`lora_alpha`"]),
    case("adapter: cut adapter_config.json", adapter!("adapter_not_json"),
        &["adapter_config.json", "not valid JSON"]),
    case("adapter: no adapter_config.json", adapter!("adapter_no_config"),
        &["adapter_config.json"]),
    case("adapter: no weights file", adapter!("adapter_no_weights"),
        &["adapter_model.safetensors"]),
    case("adapter: weights cut in half", adapter!("adapter_cut"),
        &["adapter_model.safetensors"]),
    case("adapter: a tensor for layer 9 of 4", adapter!("adapter_stray"),
        &["adapter_model.safetensors", "`base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight`", "matches no adapted layer"]),
    case("adapter: a multimodal model's names", adapter!("adapter_multimodal"),
        &["adapter_model.safetensors", "language_model", "matches no adapted layer"]),
    case("adapter: lora_A transposed", adapter!("adapter_shape"),
        &["adapter_model.safetensors", "`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`", "shape [64, 4]", "[4, 64]"]),
    case("adapter: lora_B stored as i64", adapter!("adapter_int"),
        &["adapter_model.safetensors", "`base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight`", "not floating-point"]),
    case("adapter: a tensor missing", adapter!("adapter_missing"),
        &["adapter_model.safetensors", "`base_model.model.model.layers.2.self_attn.o_proj.lora_B.weight`", "missing"]),
];

/// The adapter settings of the corpus (`tests/data/bad/adapter/<name>.json`), each made
/// into an adapter folder `GEN/adapter_<name>` beside the fixture's weights.
const ADAPTER_CONFIGS: [&str; 15] = [
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
    "bias_all",
    "bias_lora_only",
    "lora_bias",
    "layers_to_transform",
    "exclude_modules",
    "target_unknown",
    "target_regex",
    "peft_type_ia3",
    "rank_zero",
    "no_alpha",
    "not_json",
];

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
}

/// The first `n` bytes of `from`, written to `to`.
fn cut(from: &Path, to: &Path, n: usize) {
    let bytes = std::fs::read(from).unwrap();
    std::fs::write(to, &bytes[..n]).unwrap();
}

/// A folder `dir` holding the tiny Llama (config, weights, tokenizer files).
fn llama_folder(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    copy(
        &repo("tests/fixtures/tiny-llama/config.json"),
        &dir.join("config.json"),
    );
    copy(
        &repo("tests/fixtures/tiny-llama/model.safetensors"),
        &dir.join("model.safetensors"),
    );
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        copy(
            &repo("tests/fixtures/tiny-tokenizer").join(file),
            &dir.join(file),
        );
    }
    dir.to_path_buf()
}

/// A folder `dir` holding the fixture adapter of the tiny Llama.
fn adapter_folder(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        copy(
            &repo("tests/fixtures/tiny-llama/adapter").join(file),
            &dir.join(file),
        );
    }
    dir.to_path_buf()
}

/// Rewrites the safetensors file `path` with `change` applied to its tensors.
fn alter(path: &Path, change: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let mut tensors = candle_core::safetensors::load(path, &Device::Cpu).unwrap();
    change(&mut tensors);
    candle_core::safetensors::save(&tensors, path).unwrap();
}

fn transpose(tensors: &mut HashMap<String, Tensor>, name: &str) {
    let t = tensors[name].t().unwrap().contiguous().unwrap();
    tensors.insert(name.to_string(), t);
}

fn as_i64(tensors: &mut HashMap<String, Tensor>, name: &str) {
    let t = tensors[name].to_dtype(DType::I64).unwrap();
    tensors.insert(name.to_string(), t);
}

/// Makes the generated cases under `gen`.
fn generate(gen: &Path) {
    let _ = std::fs::remove_dir_all(gen);
    std::fs::create_dir_all(gen).unwrap();
    let bad = repo("tests/data/bad");
    let huge = "x".repeat(16 << 20);
    let first = std::fs::read_to_string(bad.join("medqa_malformed.jsonl")).unwrap();
    let first = first.lines().next().unwrap();
    std::fs::write(
        gen.join("huge_line.jsonl"),
        format!("{first}\n{{\"question\": \"{huge}\n"),
    )
    .unwrap();
    std::fs::write(
        gen.join("huge_line.csv"),
        format!("question,answer\n{huge}\n"),
    )
    .unwrap();

    let parquet = repo("data/samples/mmlu_pro/data/test-00000-of-00001.parquet");
    std::fs::create_dir_all(gen.join("mmlu_pro_cut/data")).unwrap();
    let size = std::fs::metadata(&parquet).unwrap().len() as usize;
    cut(
        &parquet,
        &gen.join("mmlu_pro_cut/data/test-00000-of-00001.parquet"),
        size / 2,
    );
    let row = serde_json::json!({ "question": [1, 2], "answer": "A" });
    let table = rlvr::data::table::from_rows(&[row.as_object().unwrap().clone()], None).unwrap();
    rlvr::data::table::save(&table, &gen.join("wrong_type.parquet")).unwrap();

    let gguf = repo("tests/fixtures/tiny-gemma3-gguf/model-q8_0.gguf");
    let size = std::fs::metadata(&gguf).unwrap().len() as usize;
    cut(&gguf, &gen.join("cut_header.gguf"), 200);
    cut(&gguf, &gen.join("cut_data.gguf"), size - 4096);
    let mut bytes = std::fs::read(&gguf).unwrap();
    let name = b"token_embd.weight";
    let dims = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4;
    let huge = (1u64 << 40).to_le_bytes();
    bytes[dims..dims + 16].copy_from_slice(&[huge, huge].concat());
    std::fs::write(gen.join("huge_tensor.gguf"), bytes).unwrap();

    let weights = |name: &str| llama_folder(&gen.join(name)).join("model.safetensors");
    let st = weights("st_cut");
    cut(&st, &st, std::fs::metadata(&st).unwrap().len() as usize / 2);
    copy(
        &bad.join("model/header_garbage.safetensors"),
        &weights("st_garbage"),
    );
    copy(
        &bad.join("model/header_huge.safetensors"),
        &weights("st_huge_header"),
    );
    alter(&weights("st_int"), |t| {
        as_i64(t, "model.layers.0.self_attn.q_proj.weight")
    });
    alter(&weights("st_shape"), |t| {
        transpose(t, "model.layers.0.self_attn.k_proj.weight")
    });
    alter(&weights("st_missing"), |t| {
        t.remove("model.layers.3.mlp.down_proj.weight");
    });
    std::fs::remove_file(weights("no_weights")).unwrap();
    for config in [
        "config_missing_hidden_size",
        "config_missing_layers",
        "config_wrong_type",
        "config_unknown_arch",
        "config_wrong_size",
        "config_not_json",
    ] {
        let dir = llama_folder(&gen.join(config));
        copy(
            &bad.join(format!("model/{config}.json")),
            &dir.join("config.json"),
        );
    }
    std::fs::remove_file(llama_folder(&gen.join("no_config")).join("config.json")).unwrap();
    for (name, file) in [
        ("tokenizer_truncated", "tokenizer.json"),
        ("tokenizer_not_a_tokenizer", "tokenizer.json"),
        ("tokenizer_config_not_json", "tokenizer_config.json"),
    ] {
        let dir = llama_folder(&gen.join(name));
        copy(&bad.join(format!("model/{name}.json")), &dir.join(file));
    }
    std::fs::remove_file(llama_folder(&gen.join("no_tokenizer")).join("tokenizer.json")).unwrap();

    for name in ADAPTER_CONFIGS {
        let dir = adapter_folder(&gen.join(format!("adapter_{name}")));
        copy(
            &bad.join(format!("adapter/{name}.json")),
            &dir.join("adapter_config.json"),
        );
    }
    let adapter = |name: &str| adapter_folder(&gen.join(name));
    std::fs::remove_file(adapter("adapter_no_config").join("adapter_config.json")).unwrap();
    std::fs::remove_file(adapter("adapter_no_weights").join("adapter_model.safetensors")).unwrap();
    let st = adapter("adapter_cut").join("adapter_model.safetensors");
    cut(&st, &st, std::fs::metadata(&st).unwrap().len() as usize / 2);
    let a = |layer: usize, module: &str, part: &str| {
        format!("base_model.model.model.layers.{layer}.self_attn.{module}.{part}.weight")
    };
    alter(
        &adapter("adapter_stray").join("adapter_model.safetensors"),
        |t| {
            let extra = t[&a(0, "q_proj", "lora_A")].clone();
            t.insert(a(9, "q_proj", "lora_A"), extra);
        },
    );
    alter(
        &adapter("adapter_multimodal").join("adapter_model.safetensors"),
        |t| {
            *t = t
                .drain()
                .map(|(k, v)| (k.replace("model.model.", "model.model.language_model."), v))
                .collect();
        },
    );
    alter(
        &adapter("adapter_shape").join("adapter_model.safetensors"),
        |t| transpose(t, &a(0, "q_proj", "lora_A")),
    );
    alter(
        &adapter("adapter_int").join("adapter_model.safetensors"),
        |t| as_i64(t, &a(0, "v_proj", "lora_B")),
    );
    alter(
        &adapter("adapter_missing").join("adapter_model.safetensors"),
        |t| {
            t.remove(&a(2, "o_proj", "lora_B"));
        },
    );
}

/// Runs one case; `None` when it passes, else what went wrong.
fn run_case(case: &Case, i: usize, dir: &Path, gen: &Path) -> Option<String> {
    let call = case
        .call
        .replace("BAD", &repo("tests/data/bad").display().to_string())
        .replace("GEN", &gen.display().to_string())
        .replace(
            "LLAMA",
            &repo("tests/fixtures/tiny-llama").display().to_string(),
        )
        .replace(
            "TOK",
            &repo("tests/fixtures/tiny-tokenizer/tokenizer.json")
                .display()
                .to_string(),
        );
    let script = dir.join(format!("case{i}.rhai"));
    std::fs::write(&script, format!("{call};\n")).unwrap();
    let out = crate::rlvr(&["run", script.to_str().unwrap(), "--quiet"])
        .env("RLVR_HOME", dir.join("home"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let missing: Vec<&str> = case
        .names
        .iter()
        .copied()
        .filter(|part| !stderr.contains(part))
        .collect();
    let ok = out.status.code() == Some(1) && !stderr.contains("panicked") && missing.is_empty();
    (!ok).then(|| {
        format!(
            "{}: status {:?}, missing {missing:?}\n  stderr: {}",
            case.what,
            out.status.code(),
            stderr.trim()
        )
    })
}

#[test]
fn every_malformed_input_fails_with_a_named_error() {
    let dir = std::env::temp_dir().join(format!("rlvr-bad-input-{}", std::process::id()));
    let gen = dir.join("gen");
    generate(&gen);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(case) = CASES.get(i) else { break };
                if let Some(failure) = run_case(case, i, &dir, &gen) {
                    failures.lock().unwrap().push(failure);
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
    assert!(CASES.len() >= 60, "the campaign covers at least 60 cases");
    let _ = std::fs::remove_dir_all(&dir);
}
