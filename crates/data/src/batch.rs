//! Batches: right padding to the longest row (optionally to a multiple of 8), packing without
//! cross-example attention, seeded shuffling, and the validation split.

use crate::encode::{Encoded, IGNORE};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;

/// Row-major [batch, seq] arrays, ready for the model's `Inputs`.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch: usize,
    pub seq: usize,
    pub input_ids: Vec<i64>,
    /// 0 on padding; on packed rows the 1-based index of the example each token belongs to.
    pub attention_mask: Vec<i64>,
    pub labels: Vec<i64>,
    /// Present for packed rows, where positions restart at every example.
    pub position_ids: Option<Vec<i64>>,
}

impl Batch {
    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Collator {
    pub pad_id: u32,
    pub pad_to_multiple_of: Option<usize>,
}

impl Collator {
    pub fn collate(&self, rows: &[&Encoded]) -> Batch {
        let longest = rows.iter().map(|r| r.len()).max().unwrap_or(0);
        let seq = match self.pad_to_multiple_of {
            Some(m) if m > 1 => longest.div_ceil(m) * m,
            _ => longest,
        };
        let n = rows.len() * seq;
        let mut b = Batch {
            batch: rows.len(),
            seq,
            input_ids: Vec::with_capacity(n),
            attention_mask: Vec::with_capacity(n),
            labels: Vec::with_capacity(n),
            position_ids: rows
                .iter()
                .any(|r| r.position_ids.is_some())
                .then(|| Vec::with_capacity(n)),
        };
        for r in rows {
            let pad = seq - r.len();
            b.input_ids.extend(r.input_ids.iter().map(|&x| x as i64));
            b.input_ids
                .extend(std::iter::repeat_n(self.pad_id as i64, pad));
            match &r.attention_mask {
                Some(m) => b.attention_mask.extend_from_slice(m),
                None => b.attention_mask.extend(std::iter::repeat_n(1, r.len())),
            }
            b.attention_mask.extend(std::iter::repeat_n(0, pad));
            b.labels.extend_from_slice(&r.labels);
            b.labels.extend(std::iter::repeat_n(IGNORE, pad));
            if let Some(p) = &mut b.position_ids {
                match &r.position_ids {
                    Some(rp) => p.extend_from_slice(rp),
                    None => p.extend(0..r.len() as i64),
                }
                p.extend(std::iter::repeat_n(0, pad));
            }
        }
        b
    }
}

/// Packs examples into rows of at most `capacity` tokens with LF's greedy knapsack (take the
/// longest that still fits). Each row's attention mask numbers its examples 1, 2, ... so
/// attention stays inside an example, positions restart per example, and each example's first
/// label is dropped (it would be predicted from the previous example; unpacked, it is never a
/// target), so packing changes no loss. Longer examples are cut to `capacity` first.
pub fn pack(examples: &[Encoded], capacity: usize) -> Vec<Encoded> {
    let mut by_len: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, e) in examples
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, e)| !e.is_empty())
    {
        by_len.entry(e.len().min(capacity)).or_default().push(i);
    }
    let mut rows = Vec::new();
    while !by_len.is_empty() {
        let mut row = Encoded {
            attention_mask: Some(Vec::new()),
            position_ids: Some(Vec::new()),
            ..Encoded::default()
        };
        let mut room = capacity;
        let mut segment = 0;
        while let Some((&len, _)) = by_len.range(..=room).next_back() {
            let list = by_len.get_mut(&len).expect("key from range");
            let i = list.pop().expect("lists are never left empty");
            if list.is_empty() {
                by_len.remove(&len);
            }
            let e = &examples[i];
            segment += 1;
            row.input_ids.extend_from_slice(&e.input_ids[..len]);
            let start = row.labels.len();
            row.labels.extend_from_slice(&e.labels[..len]);
            row.labels[start] = IGNORE;
            let mask = row.attention_mask.as_mut().expect("set above");
            match &e.attention_mask {
                Some(m) => mask.extend(m[..len].iter().map(|&x| if x == 0 { 0 } else { segment })),
                None => mask.extend(std::iter::repeat_n(segment, len)),
            }
            row.position_ids
                .as_mut()
                .expect("set above")
                .extend(0..len as i64);
            room -= len;
        }
        rows.push(row);
    }
    rows
}

/// The order of `n` examples in `epoch`: a seeded permutation, the same on every run and
/// machine, different per epoch.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    idx.shuffle(&mut rng);
    idx
}

/// (train, validation) indices: `val_size` < 1 is a fraction (rounded up, as HF datasets'
/// train_test_split), otherwise a count; picked by a seeded shuffle.
pub fn split_val(n: usize, val_size: f64, seed: u64) -> Result<(Vec<usize>, Vec<usize>), String> {
    if val_size <= 0.0 {
        return Ok(((0..n).collect(), Vec::new()));
    }
    let k = if val_size < 1.0 {
        (val_size * n as f64).ceil() as usize
    } else {
        val_size as usize
    };
    if k == 0 || k >= n {
        return Err(format!(
            "val_size {val_size} leaves {} of {n} examples for training",
            n.saturating_sub(k)
        ));
    }
    // A stream of its own, so the split does not echo epoch 0's order.
    let mut idx = epoch_order(n, seed, u64::MAX);
    let val = idx.split_off(n - k);
    Ok((idx, val))
}
