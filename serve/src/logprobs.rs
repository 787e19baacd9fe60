//! OpenAI's legacy log-probabilities, as `/v1/completions` returns them with `logprobs: k`
//! (and `echo` for the prompt's own): each token's text, its log-probability after the
//! tokens before it, the `k` most likely tokens at its position, and where its text starts;
//! and chat's `logprobs.content` entries.
//! lm-eval's `local-completions` scores a continuation from them (`echo: true, logprobs: 1`),
//! and so does this crate's endpoint backend.

use candle_core::D;
use serde_json::{json, Map, Value};

use rlvr::model::logprob::{logits_of, CHUNK_ROWS};
use rlvr::model::tokenizer::Tokenizer;
use rlvr::model::{Input, Model, Result};

/// One token's score.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenScore {
    /// `log p(token | the tokens before it)` under the model's own distribution
    /// (temperature 1, nothing truncated).
    pub logprob: f32,
    /// The most likely tokens at its position with their log-probabilities, most likely
    /// first (ties: the lower id first).
    pub top: Vec<(u32, f32)>,
}

/// Scores tokens `from..` of `ids` (`from` at least 1: the first token has no context)
/// with `top` alternatives each: one forward pass over the whole sequence, the output
/// projection applied [`CHUNK_ROWS`] positions at a time.
pub fn score(
    model: &Model,
    ids: &[u32],
    from: usize,
    top: usize,
    adapters_on: bool,
) -> Result<Vec<TokenScore>> {
    let from = from.max(1);
    if from >= ids.len() {
        return Ok(vec![]);
    }
    rlvr::model::linear::no_grad(|| {
        let input = Input::unpadded(&[ids.to_vec()], 0, model.device())?;
        let hidden = model.forward(&input, None, adapters_on)?.squeeze(0)?; // [s, d]
        let mut scores = Vec::with_capacity(ids.len() - from);
        // the state at position p predicts token p + 1
        let mut position = from - 1;
        while position + 1 < ids.len() {
            let rows = CHUNK_ROWS.min(ids.len() - 1 - position);
            let logits = logits_of(
                &hidden.narrow(0, position, rows)?,
                model.lm_head(),
                model.logit_softcap(),
            )?;
            let logprobs = candle_nn::ops::log_softmax(&logits, D::Minus1)?.to_vec2::<f32>()?;
            for (r, row) in logprobs.iter().enumerate() {
                let target = ids[position + r + 1] as usize;
                scores.push(TokenScore {
                    logprob: row[target],
                    top: most_likely(row, top),
                });
            }
            position += rows;
        }
        Ok(scores)
    })
}

/// The score of `token` sampled from a row of `logits` (the model's distribution at
/// temperature 1), with the `top` most likely tokens: how a streamed reply scores each token
/// as it comes, from the logits it was sampled from.
pub fn from_logits(logits: &[f32], token: u32, top: usize) -> TokenScore {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&x| f64::from(x - max).exp()).sum();
    let log_z = max + sum.ln() as f32;
    TokenScore {
        logprob: logits[token as usize] - log_z,
        top: most_likely(logits, top)
            .into_iter()
            .map(|(id, x)| (id, x - log_z))
            .collect(),
    }
}

/// The `k` largest entries of `row` as (index, value), largest first, the lower index
/// first among equals.
fn most_likely(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k == 0 {
        return best;
    }
    for (i, &v) in row.iter().enumerate() {
        if best.len() == k && best.last().is_some_and(|&(_, low)| v <= low) || v.is_nan() {
            continue;
        }
        let at = best.partition_point(|&(_, b)| b >= v);
        best.insert(at, (i as u32, v));
        best.truncate(k);
    }
    best
}

/// The text of each token of `ids` such that the texts joined are the decoded sequence: a
/// token that ends inside a character (byte-level vocabularies) gets an empty text and the
/// token that completes the character gets all of it, as incremental detokenizers do.
pub fn pieces(tokenizer: &Tokenizer, ids: &[u32]) -> Result<Vec<String>> {
    let mut pieces = Vec::with_capacity(ids.len());
    // tokens prefix..read were emitted and give the text before the next one its context;
    // read.. wait for a complete character
    let (mut prefix, mut read) = (0, 0);
    for i in 0..ids.len() {
        let before = tokenizer.decode(&ids[prefix..read])?;
        let after = tokenizer.decode(&ids[prefix..=i])?;
        if after.len() > before.len() && after.starts_with(&before) && !after.ends_with('\u{FFFD}')
        {
            pieces.resize(i, String::new());
            pieces.push(after[before.len()..].to_string());
            (prefix, read) = (read, i + 1);
        }
    }
    if read < ids.len() {
        // the sequence ends inside a character: the rest goes to its last token
        let before = tokenizer.decode(&ids[prefix..read])?;
        let after = tokenizer.decode(&ids[prefix..])?;
        let rest = match after.strip_prefix(&before) {
            Some(rest) => rest.to_string(),
            None => tokenizer.decode(&ids[read..])?,
        };
        pieces.resize(ids.len() - 1, String::new());
        pieces.push(rest);
    }
    Ok(pieces)
}

/// One token of a choice's `logprobs`: its id, its text, and its score (`None` for the
/// prompt's first token, which has no context).
pub struct Entry<'a> {
    /// The token id.
    pub id: u32,
    /// Its text, from [`pieces`].
    pub piece: String,
    /// Its score.
    pub score: Option<&'a TokenScore>,
}

/// The `logprobs` object of one choice: `tokens`, `token_logprobs` (null for a token
/// without context), `top_logprobs` (each alternative's text → log-probability, the chosen
/// token added when it is not among them, as vLLM adds it) and `text_offset` (where each
/// token's text starts, in characters, in the tokens' texts joined, as vLLM counts).
pub fn legacy(tokenizer: &Tokenizer, entries: &[Entry]) -> Result<Value> {
    let mut tokens = Vec::with_capacity(entries.len());
    let mut token_logprobs = Vec::with_capacity(entries.len());
    let mut top_logprobs = Vec::with_capacity(entries.len());
    let mut text_offset = Vec::with_capacity(entries.len());
    let mut offset = 0;
    for entry in entries {
        tokens.push(json!(entry.piece));
        text_offset.push(json!(offset));
        offset += entry.piece.chars().count();
        match entry.score {
            None => {
                token_logprobs.push(Value::Null);
                top_logprobs.push(Value::Null);
            }
            Some(score) => {
                token_logprobs.push(json!(score.logprob));
                let mut alternatives = Map::new();
                let chosen = std::iter::once((entry.id, score.logprob));
                for (id, logprob) in score.top.iter().copied().chain(chosen) {
                    alternatives
                        .entry(tokenizer.decode(&[id])?)
                        .or_insert(json!(logprob));
                }
                top_logprobs.push(Value::Object(alternatives));
            }
        }
    }
    Ok(json!({
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }))
}

/// A log-probability as JSON: vLLM's floor of -9999 for a token the model rules out (JSON
/// has no infinity).
fn finite(logprob: f32) -> Value {
    json!(logprob.max(-9999.0))
}

/// One token of a chat choice's `logprobs.content`, as OpenAI and vLLM write it: its text,
/// log-probability, UTF-8 bytes and the `top_logprobs` alternatives (each a text,
/// log-probability and bytes), most likely first.
pub fn chat_entry(tokenizer: &Tokenizer, piece: &str, score: &TokenScore) -> Result<Value> {
    let top = score
        .top
        .iter()
        .map(|&(id, logprob)| {
            let text = tokenizer.decode(&[id])?;
            Ok(json!({"token": text, "logprob": finite(logprob), "bytes": text.as_bytes()}))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(
        json!({"token": piece, "logprob": finite(score.logprob), "bytes": piece.as_bytes(),
              "top_logprobs": top}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_scored_from_its_logits() {
        let logits = [1.0f32, 3.0, 2.0, f32::NEG_INFINITY];
        let score = from_logits(&logits, 2, 2);
        let log_z = (1f64.exp() + 3f64.exp() + 2f64.exp()).ln() as f32;
        assert!((score.logprob - (2.0 - log_z)).abs() < 1e-6);
        assert_eq!(score.top.iter().map(|t| t.0).collect::<Vec<_>>(), [1, 2]);
        assert!((score.top[0].1 - (3.0 - log_z)).abs() < 1e-6);
        assert_eq!(finite(from_logits(&logits, 3, 0).logprob), json!(-9999.0));
    }

    #[test]
    fn the_most_likely_come_first_and_ties_keep_the_lower_index() {
        let row = [0.1, 0.5, f32::NAN, 0.5, -1.0, 0.9];
        assert_eq!(most_likely(&row, 3), [(5, 0.9), (1, 0.5), (3, 0.5)]);
        assert_eq!(most_likely(&row, 1), [(5, 0.9)]);
        assert!(most_likely(&row, 0).is_empty());
        assert_eq!(most_likely(&row, 10).len(), 5);
    }
}
