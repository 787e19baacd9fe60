//! Batched generation on the tiny Gemma 3 fixture (sliding window 4, so padding and the
//! window interact): batching and left padding change nothing, the KV cache agrees with
//! full forwards, seeds reproduce, stop tokens, stop strings and cancellation end
//! completions; the prefix cache serves later calls' shared prefixes and changes no bit.

use candle_core::Device;
use rlvr::model::batching::Scheduler;
use rlvr::model::generate::{generate, generate_in, generate_until, Finish, Sampling};
use rlvr::model::lm::LanguageModel;
use rlvr::model::prefix::{PrefillCounts, PrefixCache, BLOCK};
use rlvr::model::Model;

use crate::repo;

fn tiny() -> Model {
    Model::from_hf_dir(&repo("tests/fixtures/tiny-gemma3"), &Device::Cpu).unwrap()
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![2, 17, 301, 44, 9, 120, 77],
        vec![2, 400],
        vec![2, 5, 6, 7, 8, 9, 10, 11, 12, 13],
    ]
}

fn greedy(n: usize) -> Sampling {
    Sampling {
        max_tokens: n,
        temperature: 0.0,
        ..Sampling::default()
    }
}

#[test]
fn batched_left_padded_greedy_equals_full_forward_argmax() {
    let model = tiny();
    let prompts = prompts();
    let requests = vec![greedy(12); prompts.len()];
    let batch = generate(&model, &prompts, &requests, false, None, &mut |_| true).unwrap();
    for (prompt, completion) in prompts.iter().zip(&batch) {
        // independent of the cache and of batching: argmax of a full forward each step
        let mut ids = prompt.clone();
        for _ in 0..12 {
            let logits = model.logits(&[ids.clone()], false).unwrap();
            let last = logits.squeeze(0).unwrap().get(ids.len() - 1).unwrap();
            ids.push(last.argmax(0).unwrap().to_scalar::<u32>().unwrap());
        }
        assert_eq!(completion.ids, ids[prompt.len()..], "prompt {prompt:?}");
        assert_eq!(completion.finish, Finish::Length);
    }
}

#[test]
fn returned_logprobs_equal_scored_logprobs() {
    let model = tiny();
    let prompt = prompts().remove(0);
    let request = Sampling {
        max_tokens: 8,
        temperature: 1.0,
        seed: 5,
        ..Sampling::default()
    };
    let c = generate(
        &model,
        std::slice::from_ref(&prompt),
        &[request],
        false,
        None,
        &mut |_| true,
    )
    .unwrap()
    .remove(0);
    let scored: Vec<f32> = model
        .completion_logprobs(&prompt, &c.ids, false)
        .unwrap()
        .to_vec1()
        .unwrap();
    for (a, b) in c.logprobs.iter().zip(&scored) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}

#[test]
fn seeds_reproduce_and_differ() {
    let model = tiny();
    let prompt = prompts().remove(1);
    let sample = |seed| {
        let request = Sampling {
            max_tokens: 16,
            temperature: 1.0,
            top_p: 0.95,
            top_k: 50,
            min_p: 0.01,
            seed,
            ..Sampling::default()
        };
        generate(
            &model,
            &[prompt.clone(), prompt.clone()],
            &[request.clone(), request],
            false,
            None,
            &mut |_| true,
        )
        .unwrap()
    };
    let a = sample(1);
    let b = sample(1);
    let c = sample(2);
    assert_eq!(a, b, "same seed, same tokens");
    assert_eq!(
        a[0].ids, a[1].ids,
        "a request's tokens do not depend on its batch row"
    );
    assert_ne!(a[0].ids, c[0].ids, "another seed, other tokens");
}

#[test]
fn top_k_one_is_greedy() {
    let model = tiny();
    let prompt = prompts().remove(2);
    let request = Sampling {
        max_tokens: 10,
        temperature: 0.8,
        top_k: 1,
        seed: 9,
        ..Sampling::default()
    };
    let sampled = generate(
        &model,
        std::slice::from_ref(&prompt),
        &[request],
        false,
        None,
        &mut |_| true,
    )
    .unwrap();
    assert_eq!(sampled[0].ids, model.greedy(&prompt, 10, false).unwrap());
}

#[test]
fn stop_tokens_and_cancellation_end_completions() {
    let model = tiny();
    let prompts = prompts();
    let free = model.greedy(&prompts[0], 12, false).unwrap();
    let stop = free[4];
    let first_stop = free.iter().position(|&t| t == stop).unwrap();
    let request = Sampling {
        stop_ids: vec![stop],
        ..greedy(12)
    };
    let c = generate(&model, &prompts[..1], &[request], false, None, &mut |_| {
        true
    })
    .unwrap()
    .remove(0);
    assert_eq!(c.finish, Finish::Stop);
    assert_eq!(c.ids, free[..=first_stop]);

    let requests = vec![greedy(30); 3];
    let out = generate(&model, &prompts, &requests, false, None, &mut |steps| {
        steps < 3
    })
    .unwrap();
    for c in out {
        assert_eq!((c.finish, c.ids.len()), (Finish::Cancelled, 3));
    }
}

#[test]
fn a_stop_string_ends_the_completion_and_cuts_its_text() {
    let lm = LanguageModel::load(
        &repo("tests/fixtures/tiny-gemma3"),
        Some(&repo("tests/fixtures/tiny-tokenizer/tokenizer.json")),
        &Device::Cpu,
    )
    .unwrap();
    let prompts = vec!["The patient has".to_string(), "An answer is".to_string()];
    let free = lm.generate(&prompts, &greedy(16), &mut |_| true).unwrap();
    for (prompt, free) in prompts.iter().zip(&free) {
        // a stop string spanning the text of completion tokens 5 and 6
        let ids = &free.completion.ids;
        assert!(ids.len() >= 7, "{prompt:?}: {ids:?}");
        let before = lm.tokenizer.decode(&ids[..5]).unwrap();
        let through = lm.tokenizer.decode(&ids[..7]).unwrap();
        let stop = through[before.len()..].to_string();
        assert!(!stop.is_empty());
        let cut = free.text.find(&stop).unwrap();
        let request = Sampling {
            stop_strings: vec!["never appears \u{1F9EA}".into(), stop.clone()],
            ..greedy(16)
        };
        let stopped = lm
            .generate(std::slice::from_ref(prompt), &request, &mut |_| true)
            .unwrap()
            .remove(0);
        assert_eq!(stopped.completion.finish, Finish::Stop, "{prompt:?}");
        assert_eq!(stopped.text, free.text[..cut], "text cut before {stop:?}");
        let n = stopped.completion.ids.len();
        assert!(
            n <= 7,
            "stopped once the text held {stop:?}, after {n} tokens"
        );
        assert_eq!(
            stopped.completion.ids,
            ids[..n],
            "same tokens up to the stop"
        );
    }
}

#[test]
fn rows_leave_the_batch_at_their_own_budgets() {
    // a row ending right after the prefill drops out of a cache still holding the prefill's
    // keys and values
    let model = tiny();
    let prompts = prompts();
    let budgets = [1, 5, 3];
    let requests: Vec<Sampling> = budgets.iter().map(|&n| greedy(n)).collect();
    let batch = generate(&model, &prompts, &requests, false, None, &mut |_| true).unwrap();
    for ((prompt, c), n) in prompts.iter().zip(&batch).zip(budgets) {
        assert_eq!(c.ids, model.greedy(prompt, n, false).unwrap());
        assert_eq!(c.finish, Finish::Length);
    }
}

#[test]
fn a_caller_can_end_one_row_by_its_tokens() {
    let model = tiny();
    let prompts = prompts();
    let free = model.greedy(&prompts[0], 10, false).unwrap();
    let requests = vec![greedy(10); 3];
    // row 0 ends once it has produced its fourth token; the others run to their budget
    let out = generate_until(
        &model,
        &prompts,
        &requests,
        false,
        None,
        &mut |_| true,
        &mut |row, ids, _| row == 0 && ids.len() == 4,
    )
    .unwrap();
    assert_eq!(
        (out[0].finish, out[0].ids.clone()),
        (Finish::Cancelled, free[..4].to_vec())
    );
    for (prompt, c) in prompts.iter().zip(&out).skip(1) {
        assert_eq!(c.finish, Finish::Length);
        assert_eq!(c.ids, model.greedy(prompt, 10, false).unwrap());
    }
}

#[test]
fn a_group_of_one_prompt_prefills_it_once_and_equals_each_row_alone() {
    // GRPO's layout: each prompt repeated for its group, interleaved with another prompt;
    // every row is seeded on its own, so each completion equals that request run alone
    let model = tiny();
    let p = prompts();
    let rows = vec![
        p[0].clone(),
        p[0].clone(),
        p[2].clone(),
        p[0].clone(),
        p[2].clone(),
    ];
    let requests: Vec<Sampling> = (0..rows.len() as u64)
        .map(|seed| Sampling {
            max_tokens: 6,
            temperature: 1.0,
            seed,
            ..Sampling::default()
        })
        .collect();
    let batch = generate(&model, &rows, &requests, false, None, &mut |_| true).unwrap();
    for ((prompt, request), c) in rows.iter().zip(&requests).zip(&batch) {
        let alone = generate(
            &model,
            std::slice::from_ref(prompt),
            std::slice::from_ref(request),
            false,
            None,
            &mut |_| true,
        )
        .unwrap();
        assert_eq!(c.ids, alone[0].ids, "seed {}", request.seed);
        for (a, b) in c.logprobs.iter().zip(&alone[0].logprobs) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
    assert_ne!(
        batch[0].ids, batch[1].ids,
        "the group's rows are sampled apart"
    );
}

#[test]
fn a_long_prompt_is_prefilled_in_chunks_that_change_nothing_and_can_cancel() {
    use rlvr::model::batching::PREFILL_PER_STEP;
    use rlvr::model::generate::PREFILL_CHUNK;
    let model = tiny();
    // two rows of eleven and two chunks, the last ones ragged
    let long = |n: usize, salt: usize| -> Vec<u32> {
        std::iter::once(2)
            .chain((1..n).map(|i| ((i * 7 + salt) % 500 + 3) as u32))
            .collect()
    };
    let prompts = vec![
        long(PREFILL_PER_STEP + 2 * PREFILL_CHUNK + 20, 1),
        long(PREFILL_CHUNK + 30, 5),
    ];
    let requests: Vec<Sampling> = (0..2)
        .map(|i| Sampling {
            max_tokens: 6,
            temperature: 1.0,
            seed: 11 + i,
            ..Sampling::default()
        })
        .collect();
    let mut calls = vec![];
    let batch = generate(&model, &prompts, &requests, false, None, &mut |n| {
        calls.push(n);
        true
    })
    .unwrap();
    // one call per step, a step prefilling PREFILL_PER_STEP tokens at most: the longer
    // prompt's first eight chunks in step 1, its last three and the shorter one's two in
    // step 2 (each row's first token comes with its last chunk), then five more tokens
    // each (steps 3-7)
    assert_eq!(calls, (1..=7).collect::<Vec<usize>>());
    for (prompt, c) in prompts.iter().zip(&batch) {
        // the sampled tokens' log-probabilities from one unchunked forward
        let scored: Vec<f32> = model
            .completion_logprobs(prompt, &c.ids, false)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(c.ids.len(), 6);
        for (a, b) in c.logprobs.iter().zip(&scored) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }
    // stopped after the first chunk: nothing generated, every row cancelled (without the
    // prefix cache, which now holds the prompts' first blocks)
    let off = PrefixCache::new(0);
    let mut scheduler = Scheduler::with_cache(&model, false, None, 16, &off);
    let stopped = generate_in(
        &mut scheduler,
        &prompts,
        &requests,
        &mut |_| false,
        &mut |_, _, _| false,
    )
    .unwrap();
    for c in stopped {
        assert_eq!(c.finish, Finish::Cancelled);
        assert!(c.ids.is_empty());
    }
}

/// 20 requests over 16 slots, so rows join as others leave: prompts of many lengths (past
/// the sliding window of 4, one over a prefill chunk, two alike), budgets and stop tokens
/// that end rows at different steps, temperatures 0 to 1.5. Each completion equals the
/// same request run alone, to the bit: nothing of a row depends on the batch around it.
#[test]
fn a_sequence_is_the_same_alone_and_inside_a_busy_batch() {
    use rlvr::model::generate::PREFILL_CHUNK;
    let tokenizer = repo("tests/fixtures/tiny-tokenizer/tokenizer.json");
    let adapted = LanguageModel::load(
        &repo("tests/fixtures/tiny-gemma3"),
        Some(&tokenizer),
        &Device::Cpu,
    )
    .unwrap()
    .load_adapter(&repo("tests/fixtures/tiny-gemma3/adapter"))
    .unwrap();
    let load = |path: &str| Model::load(&repo(path), &Device::Cpu).unwrap();
    let models = [
        ("tiny-gemma3", tiny(), false),
        ("tiny-gemma3 + adapter", adapted.model, true),
        (
            "tiny-gemma3 q8_0",
            load("tests/fixtures/tiny-gemma3-gguf/model-q8_0.gguf"),
            false,
        ),
        ("tiny-llama", load("tests/fixtures/tiny-llama"), false),
        ("tiny-qwen2", load("tests/fixtures/tiny-qwen2"), false),
    ];
    let prompt = |i: usize| -> Vec<u32> {
        let len = match i {
            3 => PREFILL_CHUNK + 40,
            7 => 4,
            _ => 1 + (i * 13) % 29,
        };
        std::iter::once(2)
            .chain((1..len).map(|t| ((t * 31 + i * 17) % 500 + 3) as u32))
            .collect()
    };
    let mut prompts: Vec<Vec<u32>> = (0..20).map(prompt).collect();
    prompts[12] = prompts[5].clone();
    let requests: Vec<Sampling> = (0..20)
        .map(|i| Sampling {
            max_tokens: 3 + (i * 7) % 17,
            temperature: [0.0, 0.7, 1.0, 1.5][i % 4],
            seed: 100 + i as u64,
            stop_ids: vec![(i * 11 % 500) as u32],
            ..Sampling::default()
        })
        .collect();
    for (name, model, adapters_on) in &models {
        let batch = generate(model, &prompts, &requests, *adapters_on, None, &mut |_| {
            true
        })
        .unwrap();
        for (i, (prompt, request)) in prompts.iter().zip(&requests).enumerate() {
            let alone = generate(
                model,
                std::slice::from_ref(prompt),
                std::slice::from_ref(request),
                *adapters_on,
                None,
                &mut |_| true,
            )
            .unwrap()
            .remove(0);
            assert_eq!(batch[i], alone, "{name}, request {i}");
        }
        let lengths: Vec<usize> = batch.iter().map(|c| c.ids.len()).collect();
        assert!(
            lengths.iter().any(|&n| n < 5) && lengths.iter().any(|&n| n > 12),
            "{name}: rows end at different steps: {lengths:?}"
        );
    }
}

/// The five models of the busy-batch test: tiny Gemma 3 (sliding window 4) without and with
/// its adapter, its Q8_0 GGUF, tiny Llama and tiny Qwen2; each with whether its adapter is on.
fn engine_models() -> Vec<(&'static str, Model, bool)> {
    let adapted = LanguageModel::load(
        &repo("tests/fixtures/tiny-gemma3"),
        Some(&repo("tests/fixtures/tiny-tokenizer/tokenizer.json")),
        &Device::Cpu,
    )
    .unwrap()
    .load_adapter(&repo("tests/fixtures/tiny-gemma3/adapter"))
    .unwrap();
    let load = |path: &str| Model::load(&repo(path), &Device::Cpu).unwrap();
    vec![
        ("tiny-gemma3", tiny(), false),
        ("tiny-gemma3 + adapter", adapted.model, true),
        (
            "tiny-gemma3 q8_0",
            load("tests/fixtures/tiny-gemma3-gguf/model-q8_0.gguf"),
            false,
        ),
        ("tiny-llama", load("tests/fixtures/tiny-llama"), false),
        ("tiny-qwen2", load("tests/fixtures/tiny-qwen2"), false),
    ]
}

/// `n` tokens after BOS, from `salt`.
fn tokens(n: usize, salt: usize) -> Vec<u32> {
    (0..n)
        .map(|t| ((t * 31 + salt * 17) % 500 + 3) as u32)
        .collect()
}

/// Seeded requests at temperatures 0 to 1.5, one per prompt.
fn sampled(n: usize) -> Vec<Sampling> {
    (0..n)
        .map(|i| Sampling {
            max_tokens: 5 + i % 4,
            temperature: [0.0, 0.7, 1.0, 1.5][i % 4],
            seed: 40 + i as u64,
            ..Sampling::default()
        })
        .collect()
}

/// Completes `prompts` on a scheduler of `rows` rows over `cache`; returns the completions
/// and the prompt tokens taken from the cache and computed.
fn run_with(
    model: &Model,
    adapters_on: bool,
    cache: &PrefixCache,
    rows: usize,
    prompts: &[Vec<u32>],
    requests: &[Sampling],
) -> (Vec<rlvr::model::generate::Completion>, PrefillCounts) {
    let mut scheduler = Scheduler::with_cache(model, adapters_on, None, rows, cache);
    let out = generate_in(
        &mut scheduler,
        prompts,
        requests,
        &mut |_| true,
        &mut |_, _, _| false,
    )
    .unwrap();
    (out, scheduler.prefill_counts())
}

/// Two calls whose prompts share a prefix of five blocks and some (longer than the sliding
/// window, past the slot buffers' first capacity): the second prefills only its new blocks,
/// and every token and log-probability equals a run without the cache, on every model.
#[test]
fn a_prefix_shared_across_calls_is_computed_once_and_changes_no_bit() {
    let shared: Vec<u32> = std::iter::once(2).chain(tokens(5 * BLOCK + 6, 1)).collect();
    let with = |tail: Vec<u32>| -> Vec<u32> { shared.iter().copied().chain(tail).collect() };
    let first = vec![with(tokens(30, 2))];
    // another tail, a tail within the last shared block, and the first prompt again
    let second = vec![
        with(tokens(2 * BLOCK + 3, 3)),
        with(tokens(9, 4)),
        first[0].clone(),
    ];
    let requests = sampled(second.len());
    for (name, model, adapters_on) in engine_models() {
        let cache = PrefixCache::new(64 << 20);
        let off = PrefixCache::new(0);
        let (a, counts) = run_with(&model, adapters_on, &cache, 16, &first, &requests[..1]);
        assert_eq!(counts.cached, 0, "{name}: nothing cached before");
        assert_eq!(counts.computed, first[0].len(), "{name}");
        assert_eq!(
            cache.blocks(),
            first[0].len() / BLOCK,
            "{name}: whole blocks kept"
        );
        let (a_off, _) = run_with(&model, adapters_on, &off, 16, &first, &requests[..1]);
        assert_eq!(a, a_off, "{name}: the first call");

        let (b, counts) = run_with(&model, adapters_on, &cache, 16, &second, &requests);
        let (b_off, off_counts) = run_with(&model, adapters_on, &off, 16, &second, &requests);
        assert_eq!(b, b_off, "{name}: tokens and log-probabilities, to the bit");
        assert_eq!(
            off_counts.cached, 0,
            "{name}: a cache of no budget keeps nothing"
        );
        // five shared blocks each; the first prompt again: all its whole blocks but the last
        // token's
        let expected = 5 * BLOCK + 5 * BLOCK + (first[0].len() - 1) / BLOCK * BLOCK;
        assert_eq!(
            counts.cached, expected,
            "{name}: blocks taken from the cache"
        );
        let total: usize = second.iter().map(Vec::len).sum();
        assert_eq!(
            counts.computed,
            total - expected,
            "{name}: only the new tokens"
        );
        assert_eq!(
            cache.counts(),
            PrefillCounts {
                cached: expected,
                computed: first[0].len() + total - expected
            },
            "{name}: the cache's own counts"
        );
    }
}

/// A write to one model's adapter changes the prefix cache's namespace of that adapter only:
/// another model's adapter (another test, another policy in the same process) keeps its keys.
#[test]
fn a_write_changes_the_namespace_of_its_own_adapter_only() {
    use rlvr::model::prefix::Namespace;
    let mut first = engine_models().remove(1).1;
    let second = engine_models().remove(1).1;
    let (a, b) = (Namespace::of(&first, true), Namespace::of(&second, true));
    let (_, var) = rlvr::model::lora::variables(&mut first).remove(0);
    rlvr::model::lora::set(&var, &var.as_tensor().copy().unwrap()).unwrap();
    assert_ne!(
        Namespace::of(&first, true),
        a,
        "the written adapter's changes"
    );
    assert_eq!(
        Namespace::of(&second, true),
        b,
        "the other adapter's does not"
    );
    assert_ne!(a, b, "two adapters, two namespaces");
}

/// Keys computed under an adapter serve neither the base model nor the adapter once a write
/// changed it (as a GRPO step does): those calls take nothing from the cache and equal runs
/// without it.
#[test]
fn the_cache_never_serves_keys_of_another_adapter_state() {
    let mut model = engine_models().remove(1).1;
    let vars = rlvr::model::lora::variables(&mut model);
    let prompts = vec![std::iter::once(2)
        .chain(tokens(3 * BLOCK, 7))
        .collect::<Vec<_>>()];
    let requests = sampled(1);
    let cache = PrefixCache::new(64 << 20);
    let off = PrefixCache::new(0);
    let run = |cache: &PrefixCache, adapters_on: bool| {
        run_with(&model, adapters_on, cache, 16, &prompts, &requests)
    };
    run(&cache, true);
    assert_eq!(
        run(&cache, true).1.cached,
        3 * BLOCK,
        "the same adapter hits"
    );
    let (base, counts) = run(&cache, false);
    assert_eq!(
        counts.cached, 0,
        "the adapter's keys never serve the base model"
    );
    assert_eq!(base, run(&off, false).0);
    assert_eq!(
        run(&cache, false).1.cached,
        3 * BLOCK,
        "the base model's own keys do"
    );

    let before = run(&off, true).0;
    for (_, var) in &vars {
        let noise = (var.as_tensor() * 1.5).unwrap();
        rlvr::model::lora::set(var, &noise).unwrap();
    }
    let (after, counts) = run(&cache, true);
    assert_eq!(
        counts.cached, 0,
        "keys of the adapter before its update are never used"
    );
    assert_eq!(after, run(&off, true).0, "equal to a run without the cache");
    assert_ne!(after, before, "the update changed the completion");
    assert_eq!(
        run(&cache, false).1.cached,
        3 * BLOCK,
        "the base model's keys still serve"
    );
}

/// Nine sequences over three slots, each slot reused, their prompts sharing blocks in
/// several ways, with a cache of three blocks' budget that evicts as it goes: every
/// completion equals its request run alone without the cache, and the cache stays within
/// its budget.
#[test]
fn slots_are_reused_and_the_cache_stays_within_its_budget() {
    let (_, model, _) = engine_models().remove(0);
    let bos = |t: Vec<u32>| -> Vec<u32> { std::iter::once(2).chain(t).collect() };
    let prompts: Vec<Vec<u32>> = (0..9)
        .map(|i| {
            let mut p = bos(tokens(BLOCK * (1 + i % 3) + 5, i % 2));
            p.extend(tokens(3 + i, 50 + i));
            p
        })
        .collect();
    let requests = sampled(prompts.len());
    // one block's bytes, measured
    let probe = PrefixCache::new(64 << 20);
    run_with(&model, false, &probe, 16, &prompts[..1], &requests[..1]);
    let block = probe.used() / probe.blocks();
    let cache = PrefixCache::new(3 * block + block / 2);
    for round in 0..2 {
        let (out, counts) = run_with(&model, false, &cache, 3, &prompts, &requests);
        assert!(
            cache.used() <= cache.budget(),
            "round {round}: {} bytes",
            cache.used()
        );
        assert_eq!(cache.blocks(), 3, "round {round}: full, having evicted");
        assert!(counts.cached > 0, "round {round}: {counts:?}");
        for (i, (prompt, request)) in prompts.iter().zip(&requests).enumerate() {
            let (alone, _) = run_with(
                &model,
                false,
                &PrefixCache::new(0),
                16,
                std::slice::from_ref(prompt),
                std::slice::from_ref(request),
            );
            assert_eq!(out[i], alone[0], "round {round}, request {i}");
        }
    }
}

/// Three sequences share a prompt of more than two steps' prefill and join together, so
/// the first prefills it and the others wait to copy it. Cancelling the first in the middle of its
/// prefill (and the third) ends only those: the second prefills the prompt itself and its
/// tokens equal the same request run alone.
#[test]
fn cancelling_a_sequence_that_prefills_for_others_ends_only_it() {
    use rlvr::model::batching::{Scheduler, PREFILL_PER_STEP};
    let model = tiny();
    let prompt: Vec<u32> = std::iter::once(2)
        .chain((1..2 * PREFILL_PER_STEP + 30).map(|i| ((i * 11) % 500 + 3) as u32))
        .collect();
    let sampling = |seed| Sampling {
        max_tokens: 5,
        temperature: 1.0,
        seed,
        ..Sampling::default()
    };
    let alone = generate(
        &model,
        std::slice::from_ref(&prompt),
        &[sampling(2)],
        false,
        None,
        &mut |_| true,
    )
    .unwrap()
    .remove(0);
    // without the prefix cache, which now holds the prompt's blocks from the run alone
    let off = PrefixCache::new(0);
    let mut scheduler = Scheduler::with_cache(&model, false, None, 16, &off);
    for id in 1..=3 {
        scheduler.submit(id, prompt.clone(), sampling(id as u64));
    }
    let none = &mut |_: usize, _: &[u32], _: &[f32]| false;
    assert!(scheduler.step(none).unwrap().is_empty(), "one step in");
    let cancelled = scheduler.cancel(&|id| id != 2);
    let mut ids: Vec<usize> = cancelled.iter().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    assert_eq!(ids, [1, 3]);
    for (_, c) in &cancelled {
        assert_eq!((c.finish, c.ids.len()), (Finish::Cancelled, 0));
    }
    let mut done = vec![];
    while !scheduler.is_idle() {
        done.extend(scheduler.step(none).unwrap());
    }
    assert_eq!(done.len(), 1);
    assert_eq!((done[0].0, &done[0].1), (2, &alone));
}

/// A cancellation from another thread (as Ctrl-C or a Jupyter interrupt sets the job's
/// flag) ends a long generation within a second, prefilling or decoding.
#[test]
fn a_cancelled_generation_returns_within_a_second() {
    use rlvr::model::batching::PREFILL_PER_STEP;
    use rlvr::progress::Cancel;
    use std::time::{Duration, Instant};
    let model = tiny();
    let long: Vec<u32> = std::iter::once(2)
        .chain((1..40 * PREFILL_PER_STEP).map(|i| ((i * 13) % 500 + 3) as u32))
        .collect();
    // sixteen rows prefilling 40 steps' worth each, or decoding 100,000 tokens each: far
    // more than a second of work
    for (prompt, max_tokens) in [(long, 4), (prompts().remove(0), 100_000)] {
        let prompts = vec![prompt; 16];
        let requests = vec![greedy(max_tokens); 16];
        let cancel = Cancel::new();
        let flag = cancel.clone();
        let cancelled_at = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            flag.cancel();
            Instant::now()
        });
        let out = generate(&model, &prompts, &requests, false, None, &mut |_| {
            !cancel.is_cancelled()
        })
        .unwrap();
        let after = cancelled_at.join().unwrap().elapsed().as_secs_f64();
        assert!(after < 1.0, "returned {after:.2} s after the cancel");
        assert!(out.iter().all(|c| c.finish == Finish::Cancelled));
    }
}
