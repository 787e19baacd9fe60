//! Batches of token rows of unequal length laid out as one rectangle for a forward pass:
//! padding, position ids, which key slots hold real tokens, the attention masks built from
//! them, and the split of an ordered list of rows into batches that fit a budget.
//!
//! A row is left-padded when its last token must sit in the last column (prompts and
//! contexts, whose last states predict what follows) and right-padded when it continues a
//! sequence whose keys a [`super::KvCache`] already holds (completions, continuations).
//! Either way a token's position is the number of real tokens before it in its row, cached
//! ones included: padding moves no real token, and a padding slot takes the position after
//! the real tokens before it (0 before a row's first token). The generation engine ([`super::batching`]) runs unpadded
//! rows, each continuing its own slot, and takes their ids, positions ([`continuing`]) and
//! masks ([`mask`]) from here too.

use std::ops::Range;

use candle_core::{Device, Result, Tensor, WithDType};

/// One forward pass's input: token ids `[b, s]` (u32), their positions `[b, s]` (u32),
/// and for each row which key slots (cache and new tokens) are real tokens rather than
/// padding.
#[derive(Debug, Clone)]
pub struct Input {
    /// Token ids, `[b, s]`.
    pub ids: Tensor,
    /// Position of each token in its sequence, `[b, s]`.
    pub positions: Tensor,
    /// `[b][cached + s]`: false at padding.
    pub key_valid: Vec<Vec<bool>>,
}

impl Input {
    /// Rows of equal length, no padding, starting at position `offset` (the cache length).
    pub fn unpadded(rows: &[Vec<u32>], offset: usize, device: &Device) -> super::Result<Self> {
        let rows: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let s = rows.first().map_or(0, |r| r.len());
        let (ids, positions) = continuing(&rows, &vec![offset; rows.len()], device)?;
        Ok(Input {
            ids,
            positions,
            key_valid: vec![vec![true; offset + s]; rows.len()],
        })
    }
}

/// Ids and positions `[b, s]` of rows of one length `s`, row `r` continuing a sequence
/// from position `starts[r]` (its length so far): no padding.
pub fn continuing(rows: &[&[u32]], starts: &[usize], device: &Device) -> Result<(Tensor, Tensor)> {
    let (b, s) = (rows.len(), rows.first().map_or(0, |r| r.len()));
    assert!(rows.iter().all(|r| r.len() == s), "rows of one length");
    let ids: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    let positions: Vec<u32> = starts
        .iter()
        .flat_map(|&start| (start..start + s).map(|p| p as u32))
        .collect();
    Ok((
        Tensor::from_vec(ids, (b, s), device)?,
        Tensor::from_vec(positions, (b, s), device)?,
    ))
}

/// Rows of tokens padded to one width, as plain numbers: an [`Input`] before it goes to a
/// device, which callers can extend ([`PaddedRows::then`]) or continue from
/// ([`PaddedRows::right_after`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PaddedRows {
    width: usize,
    ids: Vec<Vec<u32>>,
    positions: Vec<Vec<u32>>,
    key_valid: Vec<Vec<bool>>,
}

impl PaddedRows {
    /// `rows` left-padded to the longest: each row's last token in the last column, its
    /// positions counted from 0 at its first token.
    pub fn left(rows: &[&[u32]]) -> Self {
        let width = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut padded = PaddedRows::empty(width);
        for row in rows {
            let pad = width - row.len();
            padded.push(
                std::iter::repeat_n(0, pad)
                    .chain(row.iter().copied())
                    .collect(),
                (0..width).map(|s| s.saturating_sub(pad) as u32).collect(),
                (0..width).map(|s| s >= pad).collect(),
            );
        }
        padded
    }

    /// `rows` right-padded to the longest, each after the key slots `cached[r]` (true at a
    /// real token) of a cache: row `r`'s first token in the first column, at the position
    /// after the cached real tokens.
    pub fn right_after(rows: &[&[u32]], cached: Vec<Vec<bool>>) -> Self {
        assert_eq!(rows.len(), cached.len(), "one cached row per row");
        let width = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let mut padded = PaddedRows::empty(width);
        for (row, mut valid) in rows.iter().zip(cached) {
            let start = valid.iter().filter(|&&v| v).count();
            valid.extend((0..width).map(|t| t < row.len()));
            padded.push(
                row.iter()
                    .copied()
                    .chain(std::iter::repeat_n(0, width - row.len()))
                    .collect(),
                (0..width)
                    .map(|t| (start + t.min(row.len())) as u32)
                    .collect(),
                valid,
            );
        }
        padded
    }

    /// These rows followed, column for column, by `next`, which continues them (made by
    /// [`PaddedRows::right_after`] from these rows' [`PaddedRows::key_valid`]): one
    /// rectangle for a single forward pass.
    pub fn then(mut self, next: PaddedRows) -> Self {
        assert!(
            self.key_valid.len() == next.key_valid.len()
                && self
                    .key_valid
                    .iter()
                    .zip(&next.key_valid)
                    .all(|(these, after)| after.starts_with(these)),
            "the next rows continue these"
        );
        for ((ids, positions), (more_ids, more_positions)) in self
            .ids
            .iter_mut()
            .zip(&mut self.positions)
            .zip(next.ids.into_iter().zip(next.positions))
        {
            ids.extend(more_ids);
            positions.extend(more_positions);
        }
        self.width += next.width;
        self.key_valid = next.key_valid;
        self
    }

    /// Columns of the rectangle.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Per row, which key slots hold real tokens: any cached ones, then these columns.
    pub fn key_valid(&self) -> &[Vec<bool>] {
        &self.key_valid
    }

    /// The forward pass's [`Input`] on `device`.
    pub fn input(&self, device: &Device) -> Result<Input> {
        let shape = (self.ids.len(), self.width);
        Ok(Input {
            ids: Tensor::from_vec(self.ids.concat(), shape, device)?,
            positions: Tensor::from_vec(self.positions.concat(), shape, device)?,
            key_valid: self.key_valid.clone(),
        })
    }

    fn empty(width: usize) -> Self {
        PaddedRows {
            width,
            ids: Vec::new(),
            positions: Vec::new(),
            key_valid: Vec::new(),
        }
    }

    fn push(&mut self, ids: Vec<u32>, positions: Vec<u32>, valid: Vec<bool>) {
        self.ids.push(ids);
        self.positions.push(positions);
        self.key_valid.push(valid);
    }
}

/// `[rows, width]`: each row's values cut or padded with zeros to `width` columns (a
/// per-token quantity of right-padded rows: target ids, a loss mask, a sampler's
/// log-probabilities).
pub fn right_padded<T: WithDType>(
    rows: &[impl AsRef<[T]>],
    width: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut data = Vec::with_capacity(rows.len() * width);
    for row in rows {
        let row = row.as_ref();
        let n = row.len().min(width);
        data.extend_from_slice(&row[..n]);
        data.extend(std::iter::repeat_n(T::from_f64(0.0), width - n));
    }
    Tensor::from_vec(data, (rows.len(), width), device)
}

/// `[lens.len(), width]` f32: 1 over each row's first `lens[r]` columns (its real tokens
/// when right-padded), 0 after.
pub fn length_mask(lens: &[usize], width: usize, device: &Device) -> Result<Tensor> {
    let mask: Vec<f32> = lens
        .iter()
        .flat_map(|&n| (0..width).map(move |t| if t < n { 1.0 } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (lens.len(), width), device)
}

/// Splits rows of token counts `lengths`, in their order, into consecutive batches, each
/// as long as `fits(rows, width)` holds for its rows padded to its longest (a batch of one
/// row always fits). Rows ordered by length give batches with little padding.
pub fn batches_within(lengths: &[usize], fits: impl Fn(usize, usize) -> bool) -> Vec<Range<usize>> {
    let mut batches = Vec::new();
    let mut start = 0;
    while start < lengths.len() {
        let mut end = start + 1;
        let mut width = lengths[start];
        while end < lengths.len() {
            let w = width.max(lengths[end]);
            if !fits(end + 1 - start, w) {
                break;
            }
            width = w;
            end += 1;
        }
        batches.push(start..end);
        start = end;
    }
    batches
}

/// Additive attention mask `[b, 1, q, k]` (0, or the lowest f32 where hidden: finite, as
/// in transformers, so a padding query that sees no key yields numbers rather than NaN,
/// which would reach real tokens through the values) for queries at key slots
/// `offset .. offset + q` over `key_valid: [b][k]` (false at padding): a query sees valid
/// keys at or before its slot, and with `window`, only the `window` most recent ones
/// (`query - key < window`, as Hugging Face's sliding attention).
pub fn mask(
    key_valid: &[Vec<bool>],
    offset: usize,
    queries: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Tensor> {
    let batch = key_valid.len();
    let keys = key_valid.first().map_or(0, Vec::len);
    let mut values = Vec::with_capacity(batch * queries * keys);
    for valid in key_valid {
        for q in 0..queries {
            let slot = offset + q;
            for (k, &ok) in valid.iter().enumerate() {
                let visible = ok && k <= slot && window.is_none_or(|w| slot - k < w);
                values.push(if visible { 0f32 } else { f32::MIN });
            }
        }
    }
    Tensor::from_vec(values, (batch, 1, queries, keys), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: bool = true;
    const F: bool = false;

    /// Two prompts of 3 and 1 tokens (left-padded), then completions of 1 and 2 tokens
    /// (right-padded): the layout of a batch of pairs scored in one forward pass.
    fn pairs() -> (PaddedRows, PaddedRows) {
        let prompts = PaddedRows::left(&[&[11, 12, 13], &[21]]);
        let completions =
            PaddedRows::right_after(&[&[14], &[22, 23]], prompts.key_valid().to_vec());
        (prompts, completions)
    }

    #[test]
    fn left_padding_ends_every_row_in_the_last_column() {
        let (prompts, _) = pairs();
        assert_eq!(prompts.width(), 3);
        assert_eq!(prompts.ids, [vec![11, 12, 13], vec![0, 0, 21]]);
        assert_eq!(prompts.positions, [vec![0, 1, 2], vec![0, 0, 0]]);
        assert_eq!(prompts.key_valid(), [vec![T, T, T], vec![F, F, T]]);
    }

    #[test]
    fn right_padding_continues_each_row_after_its_cached_tokens() {
        let (_, completions) = pairs();
        assert_eq!(completions.width(), 2);
        assert_eq!(completions.ids, [vec![14, 0], vec![22, 23]]);
        // positions count the real tokens before; padding repeats the count reached
        assert_eq!(completions.positions, [vec![3, 4], vec![1, 2]]);
        assert_eq!(
            completions.key_valid(),
            [vec![T, T, T, T, F], vec![F, F, T, T, T]]
        );
        // after an unpadded cache of 4 keys (a shared few-shot prefix)
        let after = PaddedRows::right_after(&[&[31, 32, 33], &[41]], vec![vec![T; 4]; 2]);
        assert_eq!(after.ids, [vec![31, 32, 33], vec![41, 0, 0]]);
        assert_eq!(after.positions, [vec![4, 5, 6], vec![4, 5, 5]]);
        assert_eq!(after.key_valid()[1], [T, T, T, T, T, F, F]);
    }

    #[test]
    fn prompts_then_completions_make_one_rectangle() {
        let (prompts, completions) = pairs();
        let both = prompts.then(completions.clone());
        assert_eq!(both.width(), 5);
        assert_eq!(both.ids, [vec![11, 12, 13, 14, 0], vec![0, 0, 21, 22, 23]]);
        assert_eq!(both.positions, [vec![0, 1, 2, 3, 4], vec![0, 0, 0, 1, 2]]);
        assert_eq!(both.key_valid(), completions.key_valid());
        let input = both.input(&Device::Cpu).unwrap();
        assert_eq!(
            input.ids.to_vec2::<u32>().unwrap(),
            [vec![11, 12, 13, 14, 0], vec![0, 0, 21, 22, 23]]
        );
        assert_eq!(
            input.positions.to_vec2::<u32>().unwrap(),
            [vec![0, 1, 2, 3, 4], vec![0, 0, 0, 1, 2]]
        );
    }

    #[test]
    #[should_panic(expected = "continue")]
    fn rows_that_do_not_continue_these_are_refused() {
        let (prompts, _) = pairs();
        let other = PaddedRows::right_after(&[&[1], &[2]], vec![vec![T; 3]; 2]);
        prompts.then(other);
    }

    /// `mask`'s `[b][q][k]` as visible (true) or hidden.
    fn visible(mask: &Tensor) -> Vec<Vec<Vec<bool>>> {
        mask.squeeze(1)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap()
            .into_iter()
            .map(|q| {
                q.into_iter()
                    .map(|k| k.into_iter().map(|x| x == 0.0).collect())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn masks_hide_padding_later_keys_and_keys_outside_the_window() {
        let (prompts, completions) = pairs();
        let valid = prompts.then(completions).key_valid;
        let full = visible(&mask(&valid, 0, 5, None, &Device::Cpu).unwrap());
        // row 1: left padding sees nothing, real queries see real keys up to their own
        assert_eq!(full[1][0], [F, F, F, F, F]);
        assert_eq!(full[1][2], [F, F, T, F, F]);
        assert_eq!(full[1][4], [F, F, T, T, T]);
        // row 0: the padding after the completion is never a key
        assert_eq!(full[0][3], [T, T, T, T, F]);
        assert_eq!(full[0][4], [T, T, T, T, F]);
        // two queries after a cache of 3 slots, a window of 2 slots
        let windowed = visible(&mask(&valid, 3, 2, Some(2), &Device::Cpu).unwrap());
        assert_eq!(windowed[0], [vec![F, F, T, T, F], vec![F, F, F, T, F]]);
        assert_eq!(windowed[1], [vec![F, F, T, T, F], vec![F, F, F, T, T]]);
    }

    #[test]
    fn unpadded_rows_continue_from_their_own_lengths() {
        let (ids, positions) = continuing(&[&[1, 2], &[3, 4]], &[5, 0], &Device::Cpu).unwrap();
        assert_eq!(ids.to_vec2::<u32>().unwrap(), [[1, 2], [3, 4]]);
        assert_eq!(positions.to_vec2::<u32>().unwrap(), [[5, 6], [0, 1]]);
        let input = Input::unpadded(&[vec![7, 8, 9]], 2, &Device::Cpu).unwrap();
        assert_eq!(input.positions.to_vec2::<u32>().unwrap(), [[2, 3, 4]]);
        assert_eq!(input.key_valid, [vec![T; 5]]);
    }

    #[test]
    fn per_token_values_are_right_padded_and_masked() {
        let rows: [&[f32]; 3] = [&[0.5, 0.25], &[], &[1.0, 2.0, 3.0]];
        let padded = right_padded(&rows, 3, &Device::Cpu).unwrap();
        assert_eq!(
            padded.to_vec2::<f32>().unwrap(),
            [[0.5, 0.25, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]
        );
        let mask = length_mask(&[2, 0, 3], 3, &Device::Cpu).unwrap();
        assert_eq!(
            mask.to_vec2::<f32>().unwrap(),
            [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]
        );
    }

    #[test]
    fn batches_fill_up_to_the_budget_in_order() {
        // at most 8 padded tokens a batch
        let fits = |rows: usize, width: usize| rows * width <= 8;
        assert_eq!(
            batches_within(&[4, 3, 3, 2, 2, 2, 9, 1], fits),
            [0..2, 2..4, 4..6, 6..7, 7..8]
        );
        assert!(batches_within(&[], fits).is_empty());
    }
}
