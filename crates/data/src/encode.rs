//! Examples to `input_ids` / `labels` as LLaMA-Factory's supervised processor builds them:
//! per-exchange (prompt, response) ids, the cutoff budget split by `infer_seqlen`, prompts
//! masked with -100 unless `train_on_prompt`, history responses masked with `mask_history`.

use crate::jinja::Jinja;
use crate::template::{Conversation, Template, Turn};
use crate::tokenizer::Tok;
use crate::DataError;

/// The label that marks a position as not trained: the loss's own ignore index.
pub use phi_model::loss::IGNORE_INDEX as IGNORE;

/// How records become ids: LF slot templates, or the tokenizer's jinja template.
pub enum ChatFormat {
    Slots(Template),
    Jinja(Jinja),
}

impl ChatFormat {
    /// `name` is an LF template name or `jinja`; none means the tokenizer's own template if it
    /// has one, else LF's `empty` (as LF does without `--template`). Fixes EOS / PAD as LF does.
    pub fn new(name: Option<&str>, tok: &mut Tok) -> Result<ChatFormat, DataError> {
        let jinja = |tok: &Tok| -> Result<ChatFormat, DataError> {
            let src = tok.chat_template.as_deref().ok_or_else(|| {
                DataError::file(
                    tok.path.display(),
                    "template jinja: the tokenizer has no chat_template (tokenizer_config.json or chat_template.jinja)",
                )
            })?;
            Ok(ChatFormat::Jinja(Jinja::new(
                src,
                &tok.path.display().to_string(),
            )?))
        };
        let fmt = match name {
            Some("jinja") => jinja(tok)?,
            None if tok.chat_template.is_some() => jinja(tok)?,
            None => ChatFormat::Slots(Template::named("empty").expect("built in")),
            Some(n) => {
                ChatFormat::Slots(Template::named(n).map_err(|e| DataError::file("--template", e))?)
            }
        };
        match &fmt {
            ChatFormat::Slots(t) => t.fix_tokenizer(tok)?,
            ChatFormat::Jinja(_) => {
                if tok.pad.is_none() {
                    tok.pad = tok.eos.clone();
                }
            }
        }
        Ok(fmt)
    }

    pub fn name(&self) -> &str {
        match self {
            ChatFormat::Slots(t) => &t.name,
            ChatFormat::Jinja(_) => "jinja",
        }
    }

    /// Ids that end a generated answer: EOS and the template's stop words.
    pub fn stop_ids(&self, tok: &Tok) -> Vec<u32> {
        match self {
            ChatFormat::Slots(t) => t.stop_ids(tok),
            ChatFormat::Jinja(_) => tok.eos.iter().map(|s| s.id).collect(),
        }
    }

    /// (prompt, response) ids per exchange; the conversation must end with a response.
    pub fn encode_pairs(&self, tok: &Tok, conv: &Conversation) -> Result<Vec<Turn>, DataError> {
        match self {
            ChatFormat::Slots(t) => {
                let msgs = t.encode_messages(tok, conv)?;
                Ok(msgs
                    .chunks(2)
                    .map(|c| (c[0].clone(), c.get(1).cloned().unwrap_or_default()))
                    .collect())
            }
            ChatFormat::Jinja(j) => j.encode_pairs(tok, conv),
        }
    }

    /// The ids of a prompt that ends with a user turn, with the generation header appended.
    pub fn encode_prompt(&self, tok: &Tok, conv: &Conversation) -> Result<Vec<u32>, DataError> {
        match self {
            ChatFormat::Slots(t) => Ok(t.encode_messages(tok, conv)?.concat()),
            ChatFormat::Jinja(j) => {
                let text = j.render(tok, conv, conv.messages.len(), true)?;
                tok.encode(&text, false)
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct EncodeOptions {
    pub cutoff_len: usize,
    pub train_on_prompt: bool,
    pub mask_history: bool,
    /// Put the tokenizer's BOS first when the template does not (label masked).
    pub add_bos: bool,
    /// The model's vocabulary size: ids and labels at or above it are refused per record.
    pub vocab_size: Option<usize>,
}

impl Default for EncodeOptions {
    /// LF's defaults: cutoff_len 2048, prompts masked, history trained.
    fn default() -> Self {
        EncodeOptions {
            cutoff_len: 2048,
            train_on_prompt: false,
            mask_history: false,
            add_bos: false,
            vocab_size: None,
        }
    }
}

/// One encoded example; `attention_mask` only when a pre-tokenized record brought one.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Encoded {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    pub attention_mask: Option<Vec<i64>>,
    /// Only on packed rows: positions restarting at each example.
    pub position_ids: Option<Vec<i64>>,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    /// Why the ids or labels cannot be trained on: an id outside `0..vocab`, or a label that
    /// is neither -100 (ignored) nor such an id. Checked before training starts, so a bad
    /// record is named by file and line instead of failing mid-run.
    pub fn check_ids(&self, vocab: Option<usize>) -> Result<(), String> {
        let v = vocab.map_or(i64::MAX, |v| v as i64);
        let range = vocab.map_or("a token id (>= 0)".to_string(), |v| format!("in 0..{v}"));
        if let Some((i, id)) = self
            .input_ids
            .iter()
            .enumerate()
            .find(|(_, &x)| x as i64 >= v)
        {
            return Err(format!(
                "input id {id} at position {i} is outside the model's vocabulary (expected {range})"
            ));
        }
        match self
            .labels
            .iter()
            .enumerate()
            .find(|(_, &l)| l != IGNORE && (l < 0 || l >= v))
        {
            Some((i, l)) => Err(format!(
                "label {l} at position {i}: expected {IGNORE} (ignored) or a token id {range}"
            )),
            None => Ok(()),
        }
    }

    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE).count()
    }
}

/// LF's `infer_seqlen`: how many prompt and response tokens fit in `budget`.
pub fn infer_seqlen(source: usize, target: usize, budget: usize) -> (usize, usize) {
    let max_target = if 2 * target < budget {
        budget
    } else if 2 * source < budget {
        budget - source
    } else {
        // Python's int() of the float product, as LF computes it.
        (budget as f64 * (target as f64 / (source + target) as f64)) as usize
    };
    let new_target = max_target.min(target);
    let new_source = budget.saturating_sub(new_target).min(source);
    (new_source, new_target)
}

/// LF's `_encode_data_example` on (prompt, response) id pairs.
pub fn supervised(pairs: &[Turn], opts: &EncodeOptions, bos: Option<u32>) -> Encoded {
    let mut pairs: Vec<Turn> = pairs.to_vec();
    if let (true, Some(b), Some(first)) = (opts.add_bos, bos, pairs.first_mut()) {
        if first.0.first() != Some(&b) {
            first.0.insert(0, b);
        }
    }
    let n = pairs.len();
    // With mask_history LF walks the turns from the last, so truncation spares the last one.
    let order: Vec<usize> = if opts.mask_history {
        (0..n).rev().collect()
    } else {
        (0..n).collect()
    };
    let mut parts: Vec<(Vec<u32>, Vec<i64>)> = Vec::with_capacity(n);
    let mut total = 0;
    for (k, &i) in order.iter().enumerate() {
        if total >= opts.cutoff_len {
            break;
        }
        let (src, tgt) = &pairs[i];
        let (sl, tl) = infer_seqlen(src.len(), tgt.len(), opts.cutoff_len - total);
        total += sl + tl;
        let (src, tgt) = (&src[..sl], &tgt[..tl]);
        let src_labels: Vec<i64> = if opts.train_on_prompt {
            src.iter().map(|&x| x as i64).collect()
        } else {
            vec![IGNORE; sl]
        };
        let tgt_labels: Vec<i64> = if opts.mask_history && k != 0 {
            vec![IGNORE; tl]
        } else {
            tgt.iter().map(|&x| x as i64).collect()
        };
        let mut ids = src.to_vec();
        ids.extend_from_slice(tgt);
        let mut labels = src_labels;
        labels.extend(tgt_labels);
        parts.push((ids, labels));
    }
    if opts.mask_history {
        parts.reverse();
    }
    let mut out = Encoded::default();
    for (ids, labels) in parts {
        out.input_ids.extend(ids);
        out.labels.extend(labels);
    }
    // A forced BOS is never a target, even with train_on_prompt.
    if opts.add_bos && !out.labels.is_empty() && bos == out.input_ids.first().copied() {
        out.labels[0] = IGNORE;
    }
    out
}

/// Continued pre-training text: BOS when the tokenizer would add one (or `add_bos`), the text,
/// EOS; every token is a label; cut at `cutoff_len` (LF's pt processor without packing).
pub fn pretrain(tok: &Tok, text: &str, opts: &EncodeOptions) -> Result<Encoded, DataError> {
    let mut ids = tok.encode(text, false)?;
    if let Some(b) = &tok.bos {
        if (tok.adds_bos || opts.add_bos) && ids.first() != Some(&b.id) {
            ids.insert(0, b.id);
        }
    }
    if let Some(e) = &tok.eos {
        ids.push(e.id);
    }
    ids.truncate(opts.cutoff_len);
    let mut labels: Vec<i64> = ids.iter().map(|&x| x as i64).collect();
    if opts.add_bos && tok.bos.as_ref().map(|b| b.id) == ids.first().copied() {
        labels[0] = IGNORE;
    }
    Ok(Encoded {
        input_ids: ids,
        labels,
        ..Encoded::default()
    })
}
