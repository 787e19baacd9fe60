//! The generation engine: a KV cache of slots written in place, and the scheduler that
//! keeps a continuous batch of sequences decoding over them.
//!
//! Each running sequence owns a slot: per layer, the keys and values of its first positions
//! as segments shared with other slots (a prompt prefilled once for a group, the prefix
//! cache's blocks), then a buffer of its own written at the sequence's own length (a
//! sliding-window layer keeps a ring of its window). A sequence
//! joins the batch as soon as a slot is free and leaves it the step it finishes; its slot's
//! buffers wait for the next sequence. A step feeds every decoding row's last token through
//! the linear layers together, while each row attends over its own slot alone, and a prompt
//! is prefilled on its own, one chunk per step. So no number of a sequence depends on which
//! others share its steps: its tokens are a function of its prompt and its [`Sampling`]
//! (seed included). On the CPU a step holds at most [`FEW_ROWS`] rows, so every product of
//! a decoding step takes the one kernel, whose rows are independent of each other.
//!
//! The layout follows vLLM's and candle's preallocated caches (per-sequence lengths, a
//! rotating buffer for sliding windows) without paging: a slot's buffer grows by doubling
//! where a sequence outgrows it, up to its prompt and token budget.
//!
//! A prompt is prefilled in chunks of one [`super::prefix::BLOCK`]; each whole block's keys
//! and values go to the process's [`PrefixCache`], and a new prompt starts from the longest
//! run of cached blocks it begins with (see [`super::prefix`]), in any later call too.

use std::collections::VecDeque;

use candle_core::Tensor;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::attention::{attend, KeyValues};
use super::cpu_matmul::FEW_ROWS;
use super::decode_attention::{self, RowKeys, Segment};
use super::generate::{
    reaches_stop_string, sample, Completion, Decode, Finish, Sampling, PREFILL_CHUNK,
};
use super::padded::{continuing, mask};
use super::prefix::{LayerKeys, Namespace, PrefillCounts, PrefixCache, BLOCK};
use super::team;
use super::{Model, Result};

/// Key slots a buffer starts with (it doubles from there as its sequence grows).
const FIRST_CAPACITY: usize = 256;

/// Keys and values of the running sequences, one slot per sequence.
#[derive(Debug, Default)]
pub struct SlotCache {
    slots: Vec<Slot>,
}

#[derive(Debug, Default)]
struct Slot {
    /// Tokens whose keys are written.
    len: usize,
    /// The most tokens its sequence may reach (prompt and token budget).
    need: usize,
    /// Per layer, the keys and values of positions `0 .. len`.
    layers: Vec<Layer>,
}

/// One layer's keys and values in a slot: the first positions' in segments shared with other
/// slots, the rest in the slot's own buffers.
#[derive(Debug, Default, Clone)]
struct Layer {
    /// Keys and values of positions `0 .. base`, in order, shared with other slots and
    /// never written: blocks from the prefix cache, a prompt prefilled once for a group.
    shared: Vec<Segment>,
    /// The slot's own buffers `[1, kv, capacity, hd]` for the positions from `base` on
    /// (position `p` at `(p − base) mod capacity`: a ring only in a sliding layer with
    /// nothing shared, whose capacity is then its window); allocated at the first write and
    /// kept for the slot's next sequence.
    own: Option<(Tensor, Tensor)>,
}

impl Layer {
    /// Positions the shared segments hold.
    fn base(&self) -> usize {
        self.shared.iter().map(|s| s.len).sum()
    }

    /// The shared segments, then the first `own_len` rows of the own buffers.
    fn segments(&self, own_len: usize) -> Vec<Segment> {
        let (keys, values) = self.own.clone().expect("own buffers");
        let mut segments = self.shared.clone();
        segments.push(Segment {
            keys,
            values,
            from: 0,
            len: own_len,
        });
        segments
    }
}

impl SlotCache {
    /// `slots` empty slots.
    pub fn new(slots: usize) -> Self {
        SlotCache {
            slots: (0..slots).map(|_| Slot::default()).collect(),
        }
    }

    /// Starts a sequence of at most `need` tokens in `slot`, keeping its own buffers.
    fn open(&mut self, slot: usize, need: usize) {
        let s = &mut self.slots[slot];
        s.len = 0;
        s.need = need;
        s.layers.iter_mut().for_each(|l| l.shared.clear());
    }

    /// Starts the sequence in `slot` from cached keys and values: per layer, the blocks of
    /// its first `len` positions, in order, which it shares with the cache (nothing is
    /// copied).
    fn restore(&mut self, slot: usize, blocks: Vec<LayerKeys>, len: usize) -> Result<()> {
        let s = &mut self.slots[slot];
        if s.layers.len() < blocks.len() {
            s.layers.resize(blocks.len(), Layer::default());
        }
        for (layer, blocks) in s.layers.iter_mut().zip(blocks) {
            layer.shared = blocks
                .into_iter()
                .map(|(k, v)| Segment::whole(k, v))
                .collect::<candle_core::Result<_>>()?;
        }
        s.len = len;
        Ok(())
    }

    /// Gives each of `to` the keys and values `from` holds (a prompt prefilled once for a
    /// group): `from`'s own positions become a segment they all share, and `from` writes
    /// its next ones to a new buffer of its own. A sliding layer's ring that has wrapped is
    /// copied instead.
    fn share(&mut self, from: usize, to: &[usize]) -> Result<()> {
        let len = self.slots[from].len;
        let leader = &mut self.slots[from];
        for layer in &mut leader.layers {
            let own_len = len - layer.base();
            if let Some((keys, values)) = layer.own.take_if(|(k, _)| own_len <= k.dims()[2]) {
                layer.shared.push(Segment {
                    keys,
                    values,
                    from: 0,
                    len: own_len,
                });
            }
        }
        let layers = self.slots[from].layers.clone();
        for &slot in to {
            let s = &mut self.slots[slot];
            if s.layers.len() < layers.len() {
                s.layers.resize(layers.len(), Layer::default());
            }
            for (mine, theirs) in s.layers.iter_mut().zip(&layers) {
                mine.shared = theirs.shared.clone();
                if let Some((k, v)) = &theirs.own {
                    mine.own = Some((k.copy()?, v.copy()?));
                }
            }
            s.len = len;
        }
        Ok(())
    }

    /// Hidden states `[b, s, d]` of `tokens[r]` (all of one length `s`) continuing the
    /// sequence in `slots[r]`, at positions from its length on; the keys and values are
    /// written to the slots, whose lengths grow by `s`. With `capture`, a single row's keys
    /// and values `[1, kv, s, hd]` are also pushed there, one pair per layer.
    pub fn forward(
        &mut self,
        model: &Model,
        slots: &[usize],
        tokens: &[&[u32]],
        adapters_on: bool,
        capture: Option<&mut LayerKeys>,
    ) -> Result<Tensor> {
        let s = tokens.first().map_or(0, |t| t.len());
        let starts: Vec<usize> = slots.iter().map(|&slot| self.slots[slot].len).collect();
        let (ids, positions) = continuing(tokens, &starts, model.device())?;
        let hidden = model.forward_with(
            &ids,
            &positions,
            &mut SlotRows {
                cache: self,
                slots,
                capture,
            },
            adapters_on,
        )?;
        for &slot in slots {
            self.slots[slot].len += s;
        }
        Ok(hidden)
    }
}

/// The rows of one forward pass, row `r` continuing the sequence in slot `slots[r]`.
struct SlotRows<'a> {
    cache: &'a mut SlotCache,
    slots: &'a [usize],
    capture: Option<&'a mut LayerKeys>,
}

impl KeyValues for SlotRows<'_> {
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        window: Option<usize>,
        scale: f64,
        softcap: Option<f64>,
    ) -> candle_core::Result<Tensor> {
        if let Some(capture) = self.capture.as_deref_mut() {
            assert_eq!(capture.len(), layer, "layers run in order");
            capture.push((
                k.force_contiguous()?.detach(),
                v.force_contiguous()?.detach(),
            ));
        }
        if q.dim(2)? == 1 && decode_attention::applies(q, k, v) {
            let rows = self
                .slots
                .iter()
                .enumerate()
                .map(|(r, &slot)| {
                    let row = |x: &Tensor| x.narrow(0, r, 1);
                    self.cache.slots[slot].append_one(layer, &row(k)?, &row(v)?, window)
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            return decode_attention::attend(q, &rows, scale, softcap);
        }
        let outs = self
            .slots
            .iter()
            .enumerate()
            .map(|(r, &slot)| {
                let row = |x: &Tensor| x.narrow(0, r, 1);
                self.cache.slots[slot].attend(
                    layer,
                    &row(q)?,
                    (&row(k)?, &row(v)?),
                    window,
                    scale,
                    softcap,
                )
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&outs, 0)
    }
}

/// The keys and values `[1, kv, t, hd]` of `segments` one after the other (views where
/// there is one segment).
fn gathered(segments: &[Segment]) -> candle_core::Result<(Tensor, Tensor)> {
    let parts = segments
        .iter()
        .map(Segment::narrowed)
        .collect::<candle_core::Result<Vec<_>>>()?;
    if let [(k, v)] = parts.as_slice() {
        return Ok((k.clone(), v.clone()));
    }
    let keys: Vec<&Tensor> = parts.iter().map(|(k, _)| k).collect();
    let values: Vec<&Tensor> = parts.iter().map(|(_, v)| v).collect();
    Ok((Tensor::cat(&keys, 2)?, Tensor::cat(&values, 2)?))
}

impl Slot {
    /// Attention of one row's `s` queries `q: [1, h, s, hd]` over the slot's keys and its
    /// own `k, v: [1, kv, s, hd]`, which it then keeps.
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        (k, v): (&Tensor, &Tensor),
        window: Option<usize>,
        scale: f64,
        softcap: Option<f64>,
    ) -> candle_core::Result<Tensor> {
        let (len, s) = (self.len, q.dim(2)?);
        if s == 1 {
            let row = self.append_one(layer, k, v, window)?;
            let (keys, values) = gathered(&row.segments)?;
            return attend(q, &keys, &values, None, scale, softcap);
        }
        self.reserve(layer, k, len + s, window)?;
        let l = &self.layers[layer];
        let base = l.base();
        let (kb, vb) = l.own.as_ref().expect("reserved");
        let capacity = kb.dim(2)?;
        if len + s - base <= capacity {
            // keys in position order
            write(kb, k, len - base)?;
            write(vb, v, len - base)?;
            let (keys, values) = gathered(&l.segments(len + s - base))?;
            let t = len + s;
            let mask = mask(&[vec![true; t]], len, s, window, q.device())?;
            return attend(q, &keys, &values, Some(&mask), scale, softcap);
        }
        // a chunk past a full ring (nothing shared): the window's earlier keys in order,
        // then the chunk's
        let kept = len.min(capacity - 1);
        let earlier = |b: &Tensor| ring_range(b, len - kept, kept);
        let keys = Tensor::cat(&[&earlier(kb)?, &k.contiguous()?], 2)?;
        let values = Tensor::cat(&[&earlier(vb)?, &v.contiguous()?], 2)?;
        let mask = mask(&[vec![true; kept + s]], kept, s, window, q.device())?;
        let out = attend(q, &keys, &values, Some(&mask), scale, softcap)?;
        write(kb, k, len)?;
        write(vb, v, len)?;
        Ok(out)
    }

    /// Writes a decoding row's key and value `k, v: [1, kv, 1, hd]` at the slot's length:
    /// the keys its query attends to (a full ring: all of them, its window).
    fn append_one(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
        window: Option<usize>,
    ) -> candle_core::Result<RowKeys> {
        let len = self.len;
        self.reserve(layer, k, len + 1, window)?;
        let l = &self.layers[layer];
        let base = l.base();
        let (kb, vb) = l.own.as_ref().expect("reserved");
        write(kb, k, len - base)?;
        write(vb, v, len - base)?;
        Ok(RowKeys {
            segments: l.segments((len + 1 - base).min(kb.dim(2)?)),
        })
    }

    /// Makes layer `layer`'s own buffers hold the positions up to `required` (a sliding
    /// layer: its window at most), shaped as `k`, keeping what they hold. A sliding layer
    /// that is to hold more than its window first takes its shared keys into a ring of its
    /// own.
    fn reserve(
        &mut self,
        layer: usize,
        k: &Tensor,
        required: usize,
        window: Option<usize>,
    ) -> candle_core::Result<()> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, Layer::default());
        }
        let limit = window.unwrap_or(usize::MAX);
        if required > limit && !self.layers[layer].shared.is_empty() {
            return self.own_ring(layer, k, required, limit);
        }
        let l = &mut self.layers[layer];
        let base = l.base();
        let capacity = l.own.as_ref().map_or(0, |(b, _)| b.dims()[2]);
        let required = required - base;
        if required <= capacity || capacity == limit {
            return Ok(());
        }
        let grown = required
            .max(
                (2 * capacity)
                    .max(FIRST_CAPACITY)
                    .min(self.need.saturating_sub(base).max(required)),
            )
            .min(limit);
        let (_, kv, _, hd) = k.dims4()?;
        let buffer = || Tensor::zeros((1, kv, grown, hd), k.dtype(), k.device());
        let (kb, vb) = (buffer()?, buffer()?);
        if let Some((old_k, old_v)) = &l.own {
            // below its limit a buffer has never wrapped: its keys sit in order
            let kept = (self.len - base).min(capacity);
            if kept > 0 {
                kb.slice_set(&old_k.narrow(2, 0, kept)?.contiguous()?, 2, 0)?;
                vb.slice_set(&old_v.narrow(2, 0, kept)?.contiguous()?, 2, 0)?;
            }
        }
        l.own = Some((kb, vb));
        Ok(())
    }

    /// Moves a sliding layer's keys, shared and own, into a ring of its own of `window`
    /// keys (all it will attend to from here on), for positions up to `required`.
    fn own_ring(
        &mut self,
        layer: usize,
        k: &Tensor,
        required: usize,
        window: usize,
    ) -> candle_core::Result<()> {
        let l = &mut self.layers[layer];
        let base = l.base();
        let mut segments = std::mem::take(&mut l.shared);
        if let Some((kb, vb)) = l.own.take() {
            if self.len > base {
                segments.push(Segment {
                    keys: kb,
                    values: vb,
                    from: 0,
                    len: self.len - base,
                });
            }
        }
        let (keys, values) = gathered(&segments)?;
        self.reserve(layer, k, required.min(window), Some(window))?;
        let (kb, vb) = self.layers[layer].own.as_ref().expect("reserved");
        write(kb, &keys, 0)?;
        write(vb, &values, 0)
    }
}

/// Writes `x: [1, kv, s, hd]`, the keys of positions `from .. from + s`, into the ring
/// `buffer: [1, kv, capacity, hd]` (the last `capacity` of them where more come).
fn write(buffer: &Tensor, x: &Tensor, from: usize) -> candle_core::Result<()> {
    let (capacity, s) = (buffer.dim(2)?, x.dim(2)?);
    let n = s.min(capacity);
    let skip = s - n;
    let at = (from + skip) % capacity;
    let first = n.min(capacity - at);
    buffer.slice_set(&x.narrow(2, skip, first)?.contiguous()?, 2, at)?;
    if first < n {
        buffer.slice_set(&x.narrow(2, skip + first, n - first)?.contiguous()?, 2, 0)?;
    }
    Ok(())
}

/// The keys of positions `from .. from + n` from the ring `buffer`, in order.
fn ring_range(buffer: &Tensor, from: usize, n: usize) -> candle_core::Result<Tensor> {
    let capacity = buffer.dim(2)?;
    let at = from % capacity;
    let first = n.min(capacity - at);
    let head = buffer.narrow(2, at, first)?;
    if first == n {
        return head.contiguous();
    }
    Tensor::cat(&[&head, &buffer.narrow(2, 0, n - first)?], 2)
}

/// The most prompt tokens one [`Scheduler::step`] prefills (whole chunks of
/// [`PREFILL_CHUNK`] tokens, at least one): decoding rows are not held up by every
/// newcomer's prompt at once, and a step stays short enough for a cancel to take effect
/// within a second.
pub const PREFILL_PER_STEP: usize = 512;

/// Runs after each new token of a sequence: `(id, its tokens so far, the row of logits the
/// token was sampled from)`; true ends the sequence there.
pub type Ends<'a> = &'a mut dyn FnMut(usize, &[u32], &[f32]) -> bool;

/// What a running sequence does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Its prompt is being prefilled; this many tokens are written.
    Prefill(usize),
    /// It waits for the sequence `id` to prefill the same prompt, then copies its slot.
    Follows(usize),
    /// It decodes; the token sampled last is not yet written.
    Decode(u32),
}

/// One sequence the scheduler runs.
#[derive(Debug)]
struct Sequence {
    id: usize,
    prompt: Vec<u32>,
    sampling: Sampling,
    rng: ChaCha8Rng,
    completion: Completion,
    slot: usize,
    state: State,
    /// What its keys and values depend on besides its tokens (the prefix cache's key).
    namespace: Namespace,
}

/// The rows that sample a token in a step, each with the row of `logits` it samples from
/// (the sequences that follow a prompt share its row).
#[derive(Default)]
struct Picks {
    rows: Vec<(usize, usize)>,
    /// The step's rows of logits, `vocab` values each, one after the other: the buffer the
    /// scheduler keeps from step to step, so 16 rows of Gemma's 262,144 logits are not
    /// faulted in afresh every step.
    logits: Vec<f32>,
    vocab: usize,
}

impl Picks {
    /// Row `row` of the step's logits.
    fn logits(&self, row: usize) -> &[f32] {
        &self.logits[row * self.vocab..][..self.vocab]
    }

    /// Appends a row of logits; returns its index.
    fn push(&mut self, row: &[f32]) -> usize {
        if self.logits.is_empty() {
            self.vocab = row.len();
        }
        assert_eq!(row.len(), self.vocab, "rows of logits of one vocabulary");
        self.logits.extend_from_slice(row);
        self.logits.len() / self.vocab - 1
    }
}

/// Runs sequences in a continuous batch: [`Scheduler::submit`] queues one, and every
/// [`Scheduler::step`] admits waiting sequences into free slots, prefills a chunk of each
/// new prompt, decodes one token for every other row, and hands back the ones that ended.
/// Sequences that share a prompt and join together prefill it once; a prompt that starts
/// with blocks in the [`PrefixCache`] prefills only the rest.
pub struct Scheduler<'a> {
    model: &'a Model,
    adapters_on: bool,
    decode: Option<Decode<'a>>,
    prefix: &'a PrefixCache,
    counts: PrefillCounts,
    cache: SlotCache,
    free: Vec<usize>,
    waiting: VecDeque<(usize, Vec<u32>, Sampling)>,
    running: Vec<Sequence>,
    /// The last step's logits buffer, for the next step to write over.
    logits: Vec<f32>,
}

impl<'a> Scheduler<'a> {
    /// A scheduler for `model` (its adapters on with `adapters_on`); stop strings need
    /// `decode`. The batch holds [`Scheduler::default_rows`] rows.
    pub fn new(model: &'a Model, adapters_on: bool, decode: Option<Decode<'a>>) -> Self {
        Scheduler::with_rows(model, adapters_on, decode, Scheduler::default_rows(model))
    }

    /// Rows a batch holds by default: [`FEW_ROWS`] on the CPU (more rows would take
    /// another kernel, and a row's last bits would depend on the rows beside it), 64
    /// elsewhere.
    pub fn default_rows(model: &Model) -> usize {
        if model.device().is_cpu() {
            FEW_ROWS
        } else {
            64
        }
    }

    /// [`Scheduler::new`] with a batch of `rows` rows at most (at least one).
    pub fn with_rows(
        model: &'a Model,
        adapters_on: bool,
        decode: Option<Decode<'a>>,
        rows: usize,
    ) -> Self {
        Scheduler::with_cache(model, adapters_on, decode, rows, PrefixCache::global())
    }

    /// [`Scheduler::with_rows`] over the prefix cache `prefix` rather than the process's.
    pub fn with_cache(
        model: &'a Model,
        adapters_on: bool,
        decode: Option<Decode<'a>>,
        rows: usize,
        prefix: &'a PrefixCache,
    ) -> Self {
        let rows = rows.max(1);
        Scheduler {
            model,
            adapters_on,
            decode,
            prefix,
            counts: PrefillCounts::default(),
            cache: SlotCache::new(rows),
            free: (0..rows).rev().collect(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            logits: Vec::new(),
        }
    }

    /// Queues the sequence `id` (the caller's name for it): `prompt` sampled by `sampling`.
    pub fn submit(&mut self, id: usize, prompt: Vec<u32>, sampling: Sampling) {
        assert!(
            self.decode.is_some() || sampling.stop_strings.is_empty(),
            "stop strings need a decoder"
        );
        self.waiting.push_back((id, prompt, sampling));
    }

    /// Prompt tokens this scheduler's prefills took from the prefix cache and computed.
    pub fn prefill_counts(&self) -> PrefillCounts {
        self.counts
    }

    /// True when no sequence waits or runs.
    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Ends every sequence now, as [`Finish::Cancelled`], with the tokens it has.
    pub fn cancel_all(&mut self) -> Vec<(usize, Completion)> {
        let waiting = self.waiting.drain(..).map(|(id, _, _)| {
            let mut c = empty();
            c.finish = Finish::Cancelled;
            (id, c)
        });
        let mut out: Vec<(usize, Completion)> = waiting.collect();
        for mut seq in self.running.drain(..) {
            self.free.push(seq.slot);
            seq.completion.finish = Finish::Cancelled;
            out.push((seq.id, seq.completion));
        }
        out
    }

    /// Ends the sequences whose id `which` picks, waiting or running, as
    /// [`Finish::Cancelled`] with the tokens they have, and frees their slots; the others
    /// run on. A sequence that waited for a cancelled one to prefill their common prompt
    /// prefills it itself (the first of them, the others following it).
    pub fn cancel(&mut self, which: &dyn Fn(usize) -> bool) -> Vec<(usize, Completion)> {
        let mut out = Vec::new();
        self.waiting.retain(|(id, _, _)| {
            if which(*id) {
                let mut c = empty();
                c.finish = Finish::Cancelled;
                out.push((*id, c));
            }
            !which(*id)
        });
        let mut i = 0;
        while i < self.running.len() {
            if !which(self.running[i].id) {
                i += 1;
                continue;
            }
            let mut seq = self.running.remove(i);
            self.free.push(seq.slot);
            let mut leader = None;
            for other in &mut self.running {
                if other.state == State::Follows(seq.id) {
                    other.state = match leader {
                        None => State::Prefill(0),
                        Some(id) => State::Follows(id),
                    };
                    leader.get_or_insert(other.id);
                }
            }
            seq.completion.finish = Finish::Cancelled;
            out.push((seq.id, seq.completion));
        }
        out
    }

    /// One step of the batch; returns the sequences that ended in it. `ends(id, ids,
    /// logits)` runs after each new token (the sequence's tokens so far, and the row of
    /// logits it was sampled from); true ends the sequence there, as [`Finish::Cancelled`].
    ///
    /// A step prefills at most [`PREFILL_PER_STEP`] prompt tokens (at least one chunk): whole
    /// chunks of the sequences being prefilled, in the batch's order, so decoding rows are
    /// not held up by every newcomer's prompt at once and a step stays short (its caller
    /// looks at its cancel flag between steps).
    pub fn step(&mut self, ends: Ends) -> Result<Vec<(usize, Completion)>> {
        let mut finished = self.admit()?;
        let mut picks = Picks {
            logits: std::mem::take(&mut self.logits),
            ..Picks::default()
        };
        picks.logits.clear();
        self.decode_rows(&mut picks)?;
        self.prefill_chunks(&mut picks)?;
        let ended = self.sample_next_tokens(&picks, ends);
        self.logits = picks.logits;
        let mut ended = ended?;
        ended.sort_unstable();
        for i in ended.into_iter().rev() {
            let seq = self.running.swap_remove(i);
            self.free.push(seq.slot);
            finished.push((seq.id, seq.completion));
        }
        Ok(finished)
    }

    /// One forward of the last token of every decoding row; each samples from its row of
    /// logits (the step's first rows, written into `picks`' buffer).
    fn decode_rows(&mut self, picks: &mut Picks) -> Result<()> {
        let decoding: Vec<usize> = (0..self.running.len())
            .filter(|&i| matches!(self.running[i].state, State::Decode(_)))
            .collect();
        if !decoding.is_empty() {
            let slots: Vec<usize> = decoding.iter().map(|&i| self.running[i].slot).collect();
            let last: Vec<[u32; 1]> = decoding
                .iter()
                .map(|&i| match self.running[i].state {
                    State::Decode(token) => [token],
                    _ => unreachable!("decoding rows only"),
                })
                .collect();
            let tokens: Vec<&[u32]> = last.iter().map(|t| t.as_slice()).collect();
            let hidden = self
                .cache
                .forward(self.model, &slots, &tokens, self.adapters_on, None)?;
            self.model
                .head_logits_into(&hidden.squeeze(1)?, &mut picks.logits)?;
            picks.vocab = picks.logits.len() / decoding.len();
            picks
                .rows
                .extend(decoding.iter().enumerate().map(|(r, &i)| (i, r)));
        }
        Ok(())
    }

    /// Whole chunks of the prompts being prefilled while the step's [`PREFILL_PER_STEP`]
    /// tokens last, in the batch's order; a prompt prefilled to its end samples from its
    /// last position's logits, and so do the sequences that follow it (its keys and values
    /// shared with them).
    fn prefill_chunks(&mut self, picks: &mut Picks) -> Result<()> {
        let mut budget = PREFILL_PER_STEP;
        for i in 0..self.running.len() {
            // whole chunks of this prompt while the step's budget lasts
            while let State::Prefill(done) = self.running[i].state {
                let seq = &self.running[i];
                let end = seq.prompt.len().min(done + PREFILL_CHUNK);
                if end - done > budget {
                    break;
                }
                budget -= end - done;
                let chunk = &seq.prompt[done..end];
                // a whole block is kept for later prompts that start with the same tokens
                let mut block = (chunk.len() == BLOCK && self.prefix.budget() > 0).then(Vec::new);
                let hidden = self.cache.forward(
                    self.model,
                    &[seq.slot],
                    &[chunk],
                    self.adapters_on,
                    block.as_mut(),
                )?;
                let computed = PrefillCounts {
                    cached: 0,
                    computed: chunk.len(),
                };
                self.counts.add(computed);
                self.prefix.record(computed);
                if let Some(layers) = block {
                    self.prefix
                        .insert(&seq.namespace, &seq.prompt, done / BLOCK, layers);
                }
                if end < seq.prompt.len() {
                    self.running[i].state = State::Prefill(end);
                    continue;
                }
                let last = hidden.narrow(1, chunk.len() - 1, 1)?.squeeze(1)?;
                let mut logits = Vec::new();
                self.model.head_logits_into(&last, &mut logits)?;
                let row = picks.push(&logits);
                picks.rows.push((i, row));
                let leader = seq.id;
                let followers: Vec<usize> = (0..self.running.len())
                    .filter(|&j| self.running[j].state == State::Follows(leader))
                    .collect();
                let slots: Vec<usize> = followers.iter().map(|&j| self.running[j].slot).collect();
                self.cache.share(self.running[i].slot, &slots)?;
                picks.rows.extend(followers.iter().map(|&j| (j, row)));
                break;
            }
        }
        Ok(())
    }

    /// Samples the picked rows' next tokens and appends them; returns the rows whose
    /// sequence ended with it (a stop token or string, `ends`, or its token budget).
    fn sample_next_tokens(&mut self, picks: &Picks, ends: Ends) -> Result<Vec<usize>> {
        // the rows are sampled in parallel (a row of Gemma's logits takes milliseconds),
        // each sequence from its own generator
        let running = &self.running;
        let drawn: Vec<(u32, f32, ChaCha8Rng)> = team::map(picks.rows.len(), |n| {
            let (i, row) = picks.rows[n];
            let mut rng = running[i].rng.clone();
            let (token, logprob) = sample(picks.logits(row), &running[i].sampling, &mut rng);
            (token, logprob, rng)
        });
        let mut ended = Vec::new();
        for (&(i, row), (token, logprob, rng)) in picks.rows.iter().zip(drawn) {
            let seq = &mut self.running[i];
            seq.rng = rng;
            let c = &mut seq.completion;
            c.ids.push(token);
            c.logprobs.push(logprob);
            let stopped = seq.sampling.stop_ids.contains(&token)
                || match self.decode {
                    Some(decode) => {
                        reaches_stop_string(&c.ids, &seq.sampling.stop_strings, decode)?
                    }
                    None => false,
                };
            let cut = !stopped && ends(seq.id, &c.ids, picks.logits(row));
            if stopped || cut || c.ids.len() >= seq.sampling.max_tokens {
                c.finish = if stopped {
                    Finish::Stop
                } else if cut {
                    Finish::Cancelled
                } else {
                    Finish::Length
                };
                ended.push(i);
            } else {
                seq.state = State::Decode(token);
            }
        }
        Ok(ended)
    }

    /// Moves waiting sequences into free slots, each new prompt starting from the blocks of
    /// it the prefix cache holds; returns those with nothing to generate.
    fn admit(&mut self) -> Result<Vec<(usize, Completion)>> {
        let mut finished = Vec::new();
        let mut namespace = None;
        while let Some((_, prompt, sampling)) = self.waiting.front() {
            if sampling.max_tokens == 0 || prompt.is_empty() {
                let (id, _, _) = self.waiting.pop_front().expect("a front");
                finished.push((id, empty()));
                continue;
            }
            let Some(slot) = self.free.pop() else {
                break;
            };
            let (id, prompt, sampling) = self.waiting.pop_front().expect("a front");
            let namespace =
                *namespace.get_or_insert_with(|| Namespace::of(self.model, self.adapters_on));
            let mut state = self
                .running
                .iter()
                .find(|s| matches!(s.state, State::Prefill(_)) && s.prompt == prompt)
                .map_or(State::Prefill(0), |leader| State::Follows(leader.id));
            self.cache.open(slot, prompt.len() + sampling.max_tokens);
            if state == State::Prefill(0) {
                if let Some((len, layers)) = self.prefix.lookup(&namespace, &prompt)? {
                    self.cache.restore(slot, layers, len)?;
                    state = State::Prefill(len);
                    let cached = PrefillCounts {
                        cached: len,
                        computed: 0,
                    };
                    self.counts.add(cached);
                    self.prefix.record(cached);
                }
            }
            self.running.push(Sequence {
                id,
                rng: ChaCha8Rng::seed_from_u64(sampling.seed),
                prompt,
                sampling,
                completion: empty(),
                slot,
                state,
                namespace,
            });
        }
        Ok(finished)
    }
}

/// A completion with no tokens yet.
fn empty() -> Completion {
    Completion {
        ids: vec![],
        logprobs: vec![],
        finish: Finish::Length,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn buffer(len: usize) -> Tensor {
        Tensor::zeros((1, 1, len, 16), DType::F32, &Device::Cpu).unwrap()
    }

    /// A restored prefix is the prefix cache's own tensors, and a group's prompt becomes one
    /// segment its leader and followers all read: nothing is copied.
    #[test]
    fn restored_and_grouped_keys_are_shared_not_copied() {
        let mut cache = SlotCache::new(3);
        let blocks: Vec<LayerKeys> = (0..2)
            .map(|_| {
                vec![
                    (buffer(BLOCK), buffer(BLOCK)),
                    (buffer(BLOCK), buffer(BLOCK)),
                ]
            })
            .collect();
        cache.open(0, 4 * BLOCK);
        cache.restore(0, blocks.clone(), 2 * BLOCK).unwrap();
        for (layer, blocks) in cache.slots[0].layers.iter().zip(&blocks) {
            let ids: Vec<_> = layer.shared.iter().map(|s| s.keys.id()).collect();
            assert_eq!(ids, [blocks[0].0.id(), blocks[1].0.id()]);
        }
        // the leader writes one more position of its own, then shares its keys
        for layer in 0..2 {
            cache.slots[0]
                .append_one(layer, &buffer(1), &buffer(1), None)
                .unwrap();
        }
        cache.slots[0].len += 1;
        let own = cache.slots[0].layers[0].own.as_ref().unwrap().0.id();
        cache.open(1, 4 * BLOCK);
        cache.open(2, 4 * BLOCK);
        cache.share(0, &[1, 2]).unwrap();
        for slot in &cache.slots {
            assert_eq!(slot.len, 2 * BLOCK + 1);
            let layer = &slot.layers[0];
            let ids: Vec<_> = layer.shared.iter().map(|s| s.keys.id()).collect();
            assert_eq!(ids, [blocks[0][0].0.id(), blocks[0][1].0.id(), own]);
            assert_eq!(layer.base(), 2 * BLOCK + 1);
        }
        assert!(
            cache.slots[0].layers[0].own.is_none(),
            "the leader writes on elsewhere"
        );
    }
}
