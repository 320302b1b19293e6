//! From `--dataset a,b --dataset_dir D` to encoded examples: registry lookup, reading,
//! `max_samples` per dataset (as LF selects the first N), placeholder filling, encoding, and
//! bad records either failing the run or, with `skip_bad_records`, counted and reported once.

use crate::dataset::{read_values, DatasetAttr, Example, Record};
use crate::encode::{pretrain, supervised, ChatFormat, EncodeOptions, Encoded};
use crate::tokenizer::Tok;
use crate::DataError;
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub dataset_dir: PathBuf,
    pub max_samples: Option<usize>,
    /// `{{name}}` → value pairs (LF's identity.json recipe).
    pub placeholders: Vec<(String, String)>,
    pub skip_bad_records: bool,
}

/// Bad records passed over under `skip_bad_records`.
#[derive(Debug, Clone, Default)]
pub struct Skipped {
    pub count: usize,
    pub first: Option<String>,
}

impl Skipped {
    fn note(&mut self, e: DataError, skip: bool) -> Result<(), DataError> {
        if !skip {
            return Err(e);
        }
        self.count += 1;
        self.first.get_or_insert_with(|| e.to_string());
        Ok(())
    }

    /// The one line reported after loading, if anything was skipped.
    pub fn summary(&self) -> Option<String> {
        self.first.as_ref().map(|f| {
            format!(
                "skipped {} bad record(s) (--skip_bad_records); first: {f}",
                self.count
            )
        })
    }
}

fn looks_like_file(name: &str) -> bool {
    [".json", ".jsonl", ".txt"]
        .iter()
        .any(|e| name.ends_with(e))
}

fn direct_path(name: &str, dir: &Path) -> Option<PathBuf> {
    if !looks_like_file(name) {
        return None;
    }
    [PathBuf::from(name), dir.join(name)]
        .into_iter()
        .find(|p| p.is_file())
}

/// The files behind one `--dataset` entry and how to read them.
pub fn resolve(name: &str, dir: &Path) -> Result<Vec<(DatasetAttr, PathBuf)>, DataError> {
    if let Some(p) = direct_path(name, dir) {
        let values = read_values(&p)?;
        // A malformed first line must not decide the format: it is a bad record of its own.
        let first = values.iter().find_map(|(_, v)| v.as_ref().ok());
        return Ok(vec![(DatasetAttr::from_path(&p, first), p)]);
    }
    let info = dir.join("dataset_info.json");
    let shown = info.display().to_string();
    // A name that looks like a file and is not registered is a missing file, not a registry
    // problem.
    let missing_file = || {
        DataError::file(
            name,
            format!(
                "no such file (looked here and in dataset_dir {}), and {shown} has no dataset of that name",
                dir.display()
            ),
        )
    };
    let text = std::fs::read_to_string(&info).map_err(|_| {
        if looks_like_file(name) {
            return missing_file();
        }
        DataError::file(
            &shown,
            format!(
                "dataset {name:?} is not a .json/.jsonl/.txt file and this registry cannot be read"
            ),
        )
    })?;
    let reg: Value = serde_json::from_str(&text)
        .map_err(|e| DataError::file(&shown, format!("not valid JSON: {e}")))?;
    if looks_like_file(name) && reg.get(name).is_none() {
        return Err(missing_file());
    }
    let entry = reg.get(name).ok_or_else(|| {
        DataError::file(
            &shown,
            format!("no dataset named {name:?} (and no such file)"),
        )
    })?;
    let attr = DatasetAttr::from_registry(name, entry, dir, &shown)?;
    let files = if attr.file.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&attr.file)
            .map_err(|e| DataError::file(attr.file.display(), format!("cannot list: {e}")))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file())
            .collect();
        v.sort();
        v
    } else if attr.file.is_file() {
        vec![attr.file.clone()]
    } else {
        return Err(DataError::file(
            &shown,
            format!(
                "key {name}.file_name: {} does not exist",
                attr.file.display()
            ),
        ));
    };
    Ok(files.into_iter().map(|f| (attr.clone(), f)).collect())
}

/// Every record of every named dataset, in order (LF's `concat` mix).
pub fn load_records(
    names: &[String],
    opts: &LoadOptions,
    skipped: &mut Skipped,
) -> Result<Vec<Record>, DataError> {
    let mut out = Vec::new();
    for name in names {
        let mut taken = 0;
        for (attr, path) in resolve(name, &opts.dataset_dir)? {
            let file = path.display().to_string();
            for (at, v) in read_values(&path)? {
                if opts.max_samples.is_some_and(|m| taken >= m) {
                    break;
                }
                taken += 1;
                match v.and_then(|v| attr.parse(&v, &opts.placeholders)) {
                    Ok(example) => out.push(Record {
                        file: file.clone(),
                        at,
                        example,
                    }),
                    Err(what) => {
                        skipped.note(DataError::record(&file, &at, what), opts.skip_bad_records)?
                    }
                }
            }
        }
    }
    Ok(out)
}

/// A tokenizer and a chat format; pre-tokenized records need neither.
pub type Chat<'a> = Option<(&'a Tok, &'a ChatFormat)>;

/// One record to ids and labels under the chat format.
pub fn encode_record(chat: Chat, rec: &Record, opts: &EncodeOptions) -> Result<Encoded, DataError> {
    let bad = |what: &str| DataError::record(&rec.file, &rec.at, what);
    let need = || {
        bad("this record is text, so it needs a tokenizer: none was found beside the model (set --tokenizer)")
    };
    let enc = match &rec.example {
        Example::Chat(conv) => {
            let (tok, fmt) = chat.ok_or_else(need)?;
            let pairs = fmt.encode_pairs(tok, conv)?;
            supervised(&pairs, opts, tok.bos.as_ref().map(|b| b.id))
        }
        Example::Text(t) => pretrain(chat.ok_or_else(need)?.0, t, opts)?,
        Example::Tokens(e) => {
            let mut e = e.clone();
            if e.len() > opts.cutoff_len {
                e.input_ids.truncate(opts.cutoff_len);
                e.labels.truncate(opts.cutoff_len);
                if let Some(m) = &mut e.attention_mask {
                    m.truncate(opts.cutoff_len);
                }
            }
            e
        }
    };
    enc.check_ids(opts.vocab_size).map_err(|e| bad(&e))?;
    if enc.trained_tokens() == 0 {
        return Err(bad(&format!(
            "every label is -100 after cutting to cutoff_len {} ({} tokens): nothing to train on",
            opts.cutoff_len,
            enc.len()
        )));
    }
    Ok(enc)
}

/// Encodes every record; an empty result is an error naming the datasets.
pub fn encode_records(
    chat: Chat,
    records: &[Record],
    opts: &EncodeOptions,
    skip_bad_records: bool,
    skipped: &mut Skipped,
) -> Result<Vec<Encoded>, DataError> {
    let mut out = Vec::with_capacity(records.len());
    for r in records {
        match encode_record(chat, r, opts) {
            Ok(e) => out.push(e),
            Err(e) => skipped.note(e, skip_bad_records)?,
        }
    }
    Ok(out)
}

/// Loads and encodes `names`; the one entry point the trainer and the preview use. Each
/// dataset must keep at least one example: one that bad records (or nothing) left empty is
/// an error naming it, even when the others would fill a run.
pub fn prepare(
    names: &[String],
    chat: Chat,
    load: &LoadOptions,
    enc: &EncodeOptions,
) -> Result<(Vec<Encoded>, Skipped), DataError> {
    let mut skipped = Skipped::default();
    let mut out = Vec::new();
    for name in names {
        // Per dataset, so an empty one can say why with its own first bad record.
        let mut here = Skipped::default();
        let records = load_records(std::slice::from_ref(name), load, &mut here)?;
        let unreadable = here.count;
        let encoded = encode_records(chat, &records, enc, load.skip_bad_records, &mut here)?;
        if encoded.is_empty() {
            let seen = records.len() + unreadable;
            let why = match &here.first {
                Some(first) => format!(
                    "all {seen} record(s) were bad and skipped (--skip_bad_records); first: {first}"
                ),
                None => "it holds no records".to_string(),
            };
            return Err(DataError::file(
                name,
                format!("dataset left without usable examples: {why}"),
            ));
        }
        skipped.count += here.count;
        if skipped.first.is_none() {
            skipped.first = here.first;
        }
        out.extend(encoded);
    }
    Ok((out, skipped))
}
