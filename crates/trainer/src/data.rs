//! The run's examples: encoded, split into train / validation, packed if asked, and cut into
//! the micro-batches of each optimizer step in a deterministic order.

use crate::args::{Stage, TrainArgs};
use crate::error::TrainError;
use phi_data::batch::{epoch_order, pack, split_val, Batch, Collator};
use phi_data::encode::{ChatFormat, EncodeOptions, Encoded};
use phi_data::load::{prepare, LoadOptions};
use phi_data::Tok;
use std::path::{Path, PathBuf};

pub struct Examples {
    pub train: Vec<Encoded>,
    pub val: Vec<Encoded>,
    pub collator: Collator,
    /// The tokenizer and template, when the data needed them (kept for samples and logs).
    pub tok: Option<(Tok, ChatFormat)>,
}

/// `--tokenizer`, else the model folder's tokenizer, else none (pre-tokenized data only).
pub fn tokenizer_path(a: &TrainArgs, model_dir: Option<&Path>) -> Option<PathBuf> {
    match &a.tokenizer {
        Some(t) => Some(PathBuf::from(t)),
        None => phi_data::tokenizer::find(model_dir),
    }
}

/// Where records come from and how bad ones are handled, from the settings.
pub fn load_options(a: &TrainArgs) -> LoadOptions {
    let mut placeholders = Vec::new();
    for (k, v) in [("name", &a.identity_name), ("author", &a.identity_author)] {
        if let Some(v) = v {
            placeholders.push((k.to_string(), v.clone()));
        }
    }
    LoadOptions {
        dataset_dir: a.dataset_dir.clone(),
        max_samples: a.max_samples,
        placeholders,
        skip_bad_records: a.skip_bad_records,
    }
}

/// How records become ids and labels; `stage pt` trains on every token.
pub fn encode_options(a: &TrainArgs, vocab_size: Option<usize>) -> EncodeOptions {
    EncodeOptions {
        cutoff_len: a.cutoff_len,
        train_on_prompt: a.train_on_prompt || a.stage == Stage::Pt,
        mask_history: a.mask_history,
        add_bos: a.add_bos,
        vocab_size,
    }
}

/// What one load of examples reads from the settings (LF's DataArguments, with the split's
/// seed): evaluation loads its datasets by changing these, not a copy of every setting.
#[derive(Debug, Clone)]
pub struct DataArgs {
    pub dataset: Vec<String>,
    pub template: Option<String>,
    pub load: LoadOptions,
    pub encode: EncodeOptions,
    pub val_size: f64,
    pub seed: u64,
    pub packing: bool,
}

impl DataArgs {
    pub fn of(a: &TrainArgs) -> DataArgs {
        DataArgs {
            dataset: a.dataset.clone(),
            template: a.template.clone(),
            load: load_options(a),
            encode: encode_options(a, None),
            val_size: a.val_size,
            seed: a.seed,
            packing: a.packing,
        }
    }
}

/// Every record encoded and checked against the model's `vocab_size` (ids and labels), so a
/// bad record stops the run before its first step, named by file and line.
pub fn load(
    d: &DataArgs,
    tokenizer: Option<&Path>,
    fallback_pad: u32,
    vocab_size: usize,
) -> Result<Examples, TrainError> {
    if d.dataset.is_empty() {
        return Err(TrainError::arg(
            "dataset",
            "(none)",
            "registry names or .json/.jsonl paths",
        ));
    }
    let mut tok = match tokenizer {
        Some(p) => {
            let mut t = Tok::load(p)?;
            let f = ChatFormat::new(d.template.as_deref(), &mut t)?;
            Some((t, f))
        }
        None => None,
    };
    let enc = EncodeOptions {
        vocab_size: Some(vocab_size),
        ..d.encode.clone()
    };
    let chat = tok.as_mut().map(|(t, f)| (&*t, &*f));
    let (examples, skipped) = prepare(&d.dataset, chat, &d.load, &enc)?;
    if let Some(s) = skipped.summary() {
        eprintln!("{s}");
    }
    let (train_idx, val_idx) = if d.val_size > 0.0 {
        split_val(examples.len(), d.val_size, d.seed)
            .map_err(|e| TrainError::arg("val_size", d.val_size, e))?
    } else {
        ((0..examples.len()).collect(), vec![])
    };
    let pick = |ix: &[usize]| -> Vec<Encoded> { ix.iter().map(|&i| examples[i].clone()).collect() };
    let (mut train, val) = (pick(&train_idx), pick(&val_idx));
    if d.packing {
        train = pack(&train, d.encode.cutoff_len);
    }
    let pad_id = tok
        .as_ref()
        .and_then(|(t, _)| t.pad_id())
        .unwrap_or(fallback_pad);
    Ok(Examples {
        train,
        val,
        collator: Collator {
            pad_id,
            pad_to_multiple_of: None,
        },
        tok,
    })
}

/// Which examples each micro-batch of each optimizer step holds: epoch after epoch, a fresh
/// seeded order per epoch (or dataset order), `accum` micro-batches per step, the last step
/// of an epoch taking what is left (as HF's loop).
#[derive(Debug, Clone)]
pub struct Plan {
    pub n: usize,
    pub batch: usize,
    pub accum: usize,
    pub seed: u64,
    pub shuffle: bool,
    /// Micro-batches per epoch.
    pub batches_per_epoch: usize,
    pub steps_per_epoch: usize,
}

impl Plan {
    pub fn new(n: usize, batch: usize, accum: usize, seed: u64, shuffle: bool) -> Plan {
        let batches_per_epoch = n.div_ceil(batch);
        Plan {
            n,
            batch,
            accum,
            seed,
            shuffle,
            batches_per_epoch,
            steps_per_epoch: batches_per_epoch.div_ceil(accum).max(1),
        }
    }

    /// Example indices of every micro-batch of optimizer step `step` (0-based).
    pub fn step(&self, step: usize) -> Vec<Vec<usize>> {
        let epoch = step / self.steps_per_epoch;
        let within = step % self.steps_per_epoch;
        let order: Vec<usize> = if self.shuffle {
            epoch_order(self.n, self.seed, epoch as u64)
        } else {
            (0..self.n).collect()
        };
        let first = within * self.accum;
        let last = ((within + 1) * self.accum).min(self.batches_per_epoch);
        (first..last)
            .map(|b| order[b * self.batch..((b + 1) * self.batch).min(self.n)].to_vec())
            .collect()
    }

    /// HF's fractional epoch after step `step` (0-based) completes.
    pub fn epoch_after(&self, step: usize) -> f64 {
        (step + 1) as f64 / self.steps_per_epoch as f64
    }
}

pub fn collate(ex: &[Encoded], idx: &[usize], c: &Collator) -> Batch {
    let rows: Vec<&Encoded> = idx.iter().map(|&i| &ex[i]).collect();
    c.collate(&rows)
}
