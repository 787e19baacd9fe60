//! Prefix caching: the keys and values of whole blocks of prompt tokens, kept across calls
//! within a process, so a prefix many prompts share (a study's system prompt, a few-shot
//! block, a GRPO group's prompt) is computed once.
//!
//! A prompt is cut into blocks of [`BLOCK`] tokens; block `i` is named by a hash chain as
//! in vLLM's automatic prefix caching, `key(i) = hash(key(i - 1), tokens of block i)`, the
//! chain starting from the [`Namespace`]: the model's weights and, when its adapter takes
//! part, the adapter's identity and the stamp of the latest write to its variables. So keys
//! and values computed under one adapter never serve the base model, another adapter, or
//! the same adapter after a training step changed it. An entry keeps its parent's key and
//! its tokens, so a hash collision is a miss, never a wrong hit.
//!
//! Results equal those without the cache to the bit: a prompt is always prefilled in
//! chunks of one block (see [`super::generate::PREFILL_CHUNK`]), so a block's keys and
//! values are a function of the tokens up to its end alone, whether they were computed in
//! this call or another. Every layer's keys are kept, the sliding-window layers' too, so a
//! cached prefix longer than the window restores the window's ring exactly.
//!
//! Memory is bounded: entries are evicted least recently used first (the deepest block of
//! a chain before its parents) once their bytes pass the budget, [`DEFAULT_BUDGET_MIB`] MiB
//! unless the environment variable [`BUDGET_ENV`] sets another (0 turns the cache off).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use candle_core::{Tensor, TensorId, Var};

use super::{lora, Model, Result};

/// Tokens per cached block, and per prefill chunk. Small enough that little of a shared
/// prefix is lost to a block boundary (a judge's prompts share a system prompt and a
/// few-shot block of a few hundred tokens, then differ), large enough that a prefill chunk
/// still multiplies many rows at once.
pub const BLOCK: usize = 64;

/// The cache's budget, in MiB, where [`BUDGET_ENV`] sets none.
pub const DEFAULT_BUDGET_MIB: usize = 256;

/// The environment variable that sets the process's budget in MiB (0: no prefix caching).
pub const BUDGET_ENV: &str = "RLVR_PREFIX_CACHE_MIB";

/// The stamp of the latest in-place write to each adapter variable written so far, by the
/// variable's tensor id (see [`super::lora::set`]); stamps only grow.
fn write_stamps() -> &'static Mutex<HashMap<TensorId, u64>> {
    static STAMPS: OnceLock<Mutex<HashMap<TensorId, u64>>> = OnceLock::new();
    STAMPS.get_or_init(Default::default)
}

/// The source of write stamps.
static NEXT_STAMP: AtomicU64 = AtomicU64::new(1);

/// The source of [`fresh_weights_id`].
static WEIGHTS_IDS: AtomicU64 = AtomicU64::new(1);

/// A new name for a model's weights: taken at load time and whenever its layers may change.
pub fn fresh_weights_id() -> u64 {
    WEIGHTS_IDS.fetch_add(1, Ordering::Relaxed)
}

/// Records a write to the adapter variable `var`: keys computed under an adapter holding it
/// before the write are never used again. Writes to other models' adapters change nothing
/// here.
pub fn adapter_written(var: &Var) {
    let stamp = NEXT_STAMP.fetch_add(1, Ordering::SeqCst);
    write_stamps()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(var.as_tensor().id(), stamp);
}

/// What the keys and values of a forward pass depend on besides its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Namespace {
    weights: u64,
    /// The adapter's variables (a hash of their ids) and the stamp of the latest write to
    /// any of them (0 before any).
    adapter: Option<(u64, u64)>,
}

impl Namespace {
    /// The namespace of `model`'s forward passes, its adapters on with `adapters_on`.
    pub fn of(model: &Model, adapters_on: bool) -> Namespace {
        let adapter = adapters_on
            .then(|| {
                let vars = lora::variables(&mut model.clone());
                (!vars.is_empty()).then(|| {
                    let stamps = write_stamps().lock().unwrap_or_else(|e| e.into_inner());
                    let mut h = std::hash::DefaultHasher::new();
                    let mut latest = 0;
                    for (_, var) in &vars {
                        let id = var.as_tensor().id();
                        id.hash(&mut h);
                        latest = latest.max(stamps.get(&id).copied().unwrap_or(0));
                    }
                    (h.finish(), latest)
                })
            })
            .flatten();
        Namespace {
            weights: model.weights_id(),
            adapter,
        }
    }
}

/// Per layer, keys and values `[1, kv, positions, hd]`.
pub type LayerKeys = Vec<(Tensor, Tensor)>;

/// Prompt tokens of prefills: taken from the cache, or run through the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefillCounts {
    /// Tokens whose keys and values came from the prefix cache.
    pub cached: usize,
    /// Tokens run through the model.
    pub computed: usize,
}

impl PrefillCounts {
    /// Both counts summed.
    pub fn add(&mut self, other: PrefillCounts) {
        self.cached += other.cached;
        self.computed += other.computed;
    }
}

/// The keys and values of cached blocks, bounded by a budget of bytes.
#[derive(Debug)]
pub struct PrefixCache {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    budget: usize,
    used: usize,
    entries: HashMap<u64, Entry>,
    /// Keys by last use, oldest first.
    order: BTreeMap<u64, u64>,
    clock: u64,
    /// The newest write stamp seen for each adapter (by the hash of its variables' ids).
    newest: HashMap<u64, u64>,
    counts: PrefillCounts,
}

#[derive(Debug)]
struct Entry {
    parent: u64,
    namespace: Namespace,
    tokens: Vec<u32>,
    /// Per layer, keys and values `[1, kv, BLOCK, hd]`.
    layers: LayerKeys,
    bytes: usize,
    stamp: u64,
}

/// The key a chain starts from.
fn root(namespace: &Namespace) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    namespace.hash(&mut h);
    h.finish()
}

/// The key of a block of `tokens` after the block keyed `parent`.
fn child(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// The keys of a prompt's first `blocks` blocks, each with its parent's.
fn chain(namespace: &Namespace, prompt: &[u32], blocks: usize) -> Vec<(u64, u64)> {
    let mut parent = root(namespace);
    prompt
        .chunks_exact(BLOCK)
        .take(blocks)
        .map(|tokens| {
            let key = child(parent, tokens);
            let link = (parent, key);
            parent = key;
            link
        })
        .collect()
}

impl PrefixCache {
    /// An empty cache holding at most `budget` bytes (0: none; it then keeps nothing).
    pub fn new(budget: usize) -> Self {
        PrefixCache {
            inner: Mutex::new(Inner {
                budget,
                ..Inner::default()
            }),
        }
    }

    /// The process's cache, which generation uses: its budget from [`BUDGET_ENV`], else
    /// [`DEFAULT_BUDGET_MIB`]. Panics on a budget that is not a whole number of MiB (the
    /// `rlvr` binary checks it with [`budget_from_env`] before anything runs).
    pub fn global() -> &'static PrefixCache {
        static GLOBAL: OnceLock<PrefixCache> = OnceLock::new();
        GLOBAL.get_or_init(|| PrefixCache::new(budget_from_env().unwrap_or_else(|e| panic!("{e}"))))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // an entry is inserted whole or not at all: a panic elsewhere leaves it usable
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The budget in bytes.
    pub fn budget(&self) -> usize {
        self.lock().budget
    }

    /// Sets the budget in bytes, evicting what no longer fits (0 empties the cache).
    pub fn set_budget(&self, budget: usize) {
        let mut inner = self.lock();
        inner.budget = budget;
        inner.evict_to(budget);
    }

    /// Bytes of keys and values held.
    pub fn used(&self) -> usize {
        self.lock().used
    }

    /// Blocks held.
    pub fn blocks(&self) -> usize {
        self.lock().entries.len()
    }

    /// Prompt tokens of every prefill so far that went through this cache.
    pub fn counts(&self) -> PrefillCounts {
        self.lock().counts
    }

    /// Adds a prefill's tokens to [`PrefixCache::counts`].
    pub(super) fn record(&self, counts: PrefillCounts) {
        self.lock().counts.add(counts);
    }

    /// The longest run of cached blocks `prompt` starts with, short of its last token
    /// (which a prefill must compute for its logits): the number of tokens it covers and,
    /// per layer, the blocks' keys and values `[1, kv, BLOCK, hd]` in order (the cache's
    /// own tensors, which every prompt that starts with them shares). `None` on a miss.
    pub fn lookup(
        &self,
        namespace: &Namespace,
        prompt: &[u32],
    ) -> Result<Option<(usize, Vec<LayerKeys>)>> {
        let blocks = prompt.len().saturating_sub(1) / BLOCK;
        let mut inner = self.lock();
        if inner.budget == 0 || blocks == 0 {
            return Ok(None);
        }
        inner.purge_stale(namespace);
        let mut found: Vec<u64> = Vec::new();
        for (i, (parent, key)) in chain(namespace, prompt, blocks).into_iter().enumerate() {
            let tokens = &prompt[i * BLOCK..(i + 1) * BLOCK];
            match inner.entries.get(&key) {
                Some(e)
                    if e.parent == parent && e.namespace == *namespace && e.tokens == tokens =>
                {
                    found.push(key)
                }
                _ => break,
            }
        }
        if found.is_empty() {
            return Ok(None);
        }
        // the deepest block is the least recently used of its chain, so evicted first
        for &key in found.iter().rev() {
            inner.touch(key);
        }
        let per_layer = inner.entries[&found[0]].layers.len();
        let layers = (0..per_layer)
            .map(|l| {
                found
                    .iter()
                    .map(|k| inner.entries[k].layers[l].clone())
                    .collect()
            })
            .collect();
        Ok(Some((found.len() * BLOCK, layers)))
    }

    /// Keeps block `index` of `prompt` (its keys and values per layer, `[1, kv, BLOCK,
    /// hd]`), where its parent is cached (else no lookup could reach it) and it fits the
    /// budget.
    pub fn insert(&self, namespace: &Namespace, prompt: &[u32], index: usize, layers: LayerKeys) {
        let mut inner = self.lock();
        let bytes: usize = layers
            .iter()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum();
        if bytes > inner.budget || prompt.len() < (index + 1) * BLOCK {
            return;
        }
        inner.purge_stale(namespace);
        let links = chain(namespace, prompt, index + 1);
        let (parent, key) = links[index];
        if inner.entries.contains_key(&key) || (index > 0 && !inner.entries.contains_key(&parent)) {
            return;
        }
        // the ancestors outlive what eviction makes room for, and the new block
        let ancestors = || links[..index].iter().rev().map(|&(_, k)| k);
        for k in ancestors() {
            inner.touch(k);
        }
        let budget = inner.budget;
        inner.evict_to(budget - bytes);
        if index > 0 && !inner.entries.contains_key(&parent) {
            return;
        }
        inner.clock += 1;
        let stamp = inner.clock;
        inner.order.insert(stamp, key);
        inner.used += bytes;
        inner.entries.insert(
            key,
            Entry {
                parent,
                namespace: *namespace,
                tokens: prompt[index * BLOCK..(index + 1) * BLOCK].to_vec(),
                layers,
                bytes,
                stamp,
            },
        );
        for k in ancestors() {
            inner.touch(k);
        }
    }
}

impl Inner {
    /// Marks `key` as used now.
    fn touch(&mut self, key: u64) {
        self.clock += 1;
        let stamp = self.clock;
        if let Some(e) = self.entries.get_mut(&key) {
            self.order.remove(&e.stamp);
            e.stamp = stamp;
            self.order.insert(stamp, key);
        }
    }

    /// Evicts least recently used entries until at most `limit` bytes are held.
    fn evict_to(&mut self, limit: usize) {
        while self.used > limit {
            let Some((_, key)) = self.order.pop_first() else {
                break;
            };
            if let Some(e) = self.entries.remove(&key) {
                self.used -= e.bytes;
            }
        }
    }

    /// Drops the entries computed under `namespace`'s adapter before its latest write, once
    /// per write: no lookup can reach them again (stamps only grow).
    fn purge_stale(&mut self, namespace: &Namespace) {
        let Some((adapter, stamp)) = namespace.adapter else {
            return;
        };
        let newest = self.newest.entry(adapter).or_insert(0);
        if stamp <= *newest {
            return;
        }
        *newest = stamp;
        let stale: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| {
                e.namespace
                    .adapter
                    .is_some_and(|(a, s)| a == adapter && s < stamp)
            })
            .map(|(&k, _)| k)
            .collect();
        for key in stale {
            if let Some(e) = self.entries.remove(&key) {
                self.order.remove(&e.stamp);
                self.used -= e.bytes;
            }
        }
    }
}

/// The budget in bytes that [`BUDGET_ENV`] sets ([`DEFAULT_BUDGET_MIB`] MiB where unset);
/// fails naming the variable when its value is not a whole number.
pub fn budget_from_env() -> std::result::Result<usize, String> {
    match std::env::var(BUDGET_ENV) {
        Ok(text) => text
            .trim()
            .parse::<usize>()
            .ok()
            .and_then(|mib| mib.checked_mul(1 << 20))
            .ok_or_else(|| {
                format!(
                    "{BUDGET_ENV}={text:?}: the prefix cache's budget must be a whole number \
                     of MiB (0 turns the cache off)"
                )
            }),
        Err(_) => Ok(DEFAULT_BUDGET_MIB << 20),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One layer's keys and values of a block, 4 bytes × 2 × BLOCK.
    fn layers() -> Vec<(Tensor, Tensor)> {
        let t = Tensor::zeros((1, 1, BLOCK, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
        vec![(t.clone(), t)]
    }

    const BYTES: usize = 2 * 4 * BLOCK;

    fn namespace() -> Namespace {
        Namespace {
            weights: 1,
            adapter: None,
        }
    }

    fn hit(cache: &PrefixCache, prompt: &[u32]) -> usize {
        let found = cache.lookup(&namespace(), prompt).unwrap();
        found.map_or(0, |(n, layers)| {
            let held: usize = layers[0].iter().map(|(k, _)| k.dim(2).unwrap()).sum();
            assert_eq!(held, n);
            n
        })
    }

    #[test]
    fn a_chain_is_found_block_by_block_short_of_the_last_token() {
        let cache = PrefixCache::new(10 * BYTES);
        let prompt: Vec<u32> = (0..3 * BLOCK as u32).collect();
        for i in 0..3 {
            cache.insert(&namespace(), &prompt, i, layers());
        }
        assert_eq!(cache.used(), 3 * BYTES);
        assert_eq!(
            hit(&cache, &prompt),
            2 * BLOCK,
            "the last token is computed"
        );
        assert_eq!(hit(&cache, &prompt[..2 * BLOCK + 1]), 2 * BLOCK);
        let mut other = prompt.clone();
        other[BLOCK + 3] = 9999;
        assert_eq!(
            hit(&cache, &other),
            BLOCK,
            "the chain stops at the first other token"
        );
        let elsewhere = Namespace {
            weights: 2,
            adapter: None,
        };
        assert!(cache.lookup(&elsewhere, &prompt).unwrap().is_none());
        // a block whose parent is not cached is unreachable, so not kept
        let lone: Vec<u32> = (5000..5000 + 2 * BLOCK as u32).collect();
        cache.insert(&namespace(), &lone, 1, layers());
        assert_eq!(cache.blocks(), 3);
    }

    #[test]
    fn eviction_keeps_the_budget_and_takes_the_deepest_unused_block_first() {
        let cache = PrefixCache::new(3 * BYTES);
        let a: Vec<u32> = (0..3 * BLOCK as u32).collect();
        for i in 0..3 {
            cache.insert(&namespace(), &a, i, layers());
        }
        let b: Vec<u32> = (7000..7000 + BLOCK as u32 + 1).collect();
        cache.insert(&namespace(), &b, 0, layers());
        assert_eq!((cache.blocks(), cache.used()), (3, 3 * BYTES));
        assert_eq!(hit(&cache, &a), 2 * BLOCK, "a's root and second block stay");
        assert_eq!(hit(&cache, &b), BLOCK);
        cache.set_budget(BYTES);
        assert_eq!(cache.used(), BYTES);
        cache.set_budget(0);
        assert_eq!((cache.blocks(), hit(&cache, &b)), (0, 0));
    }

    #[test]
    fn an_adapter_write_retires_the_keys_computed_before_it() {
        let cache = PrefixCache::new(10 * BYTES);
        let prompt: Vec<u32> = (0..BLOCK as u32 + 1).collect();
        let tuned = |stamp| Namespace {
            weights: 1,
            adapter: Some((7, stamp)),
        };
        let other = Namespace {
            weights: 1,
            adapter: Some((8, 1)),
        };
        cache.insert(&tuned(1), &prompt, 0, layers());
        cache.insert(&other, &prompt, 0, layers());
        cache.insert(&namespace(), &prompt, 0, layers());
        assert_eq!(cache.blocks(), 3);
        assert!(cache.lookup(&tuned(2), &prompt).unwrap().is_none());
        assert_eq!(cache.blocks(), 2, "the old adapter state's block is gone");
        assert_eq!(hit(&cache, &prompt), BLOCK, "the base model's stays");
        assert!(
            cache.lookup(&other, &prompt).unwrap().is_some(),
            "another adapter's stays"
        );
    }
}
