//! A tokenizer folder's GGUF keys (`tokenizer.ggml.*`, `tokenizer.chat_template`) as
//! llama.cpp's converter writes them from tokenizer.json / tokenizer_config.json / config.json:
//! byte-level BPE vocabularies as "gpt2" (with the pre-tokenizer named by the hash of how the
//! tokenizer splits a check text), SentencePiece vocabularies converted to tokenizer.json as
//! "llama" (the converter's path for a folder without tokenizer.model), then the special
//! token ids, the add_* flags and the chat template (gguf-py's `SpecialVocab`).

use crate::error::DataError;
use phi_model::gguf_write::MetaValue;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::path::Path;

const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// Special-token kinds in gguf-py's order, with their key names.
const SPECIAL: [(&str, &str); 7] = [
    ("bos", "bos_token_id"),
    ("eos", "eos_token_id"),
    ("unk", "unknown_token_id"),
    ("sep", "seperator_token_id"),
    ("pad", "padding_token_id"),
    ("cls", "cls_token_id"),
    ("mask", "mask_token_id"),
];

/// Keys in insertion order, a repeated key overwriting in place (as gguf-py's writer does).
#[derive(Default)]
pub struct Keys(pub Vec<(String, MetaValue)>);

impl Keys {
    pub fn set(&mut self, key: &str, v: MetaValue) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = v,
            None => self.0.push((key.to_string(), v)),
        }
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, DataError> {
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| DataError::file(path.display(), e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| DataError::file(path.display(), format!("not JSON: {e}")))
}

/// The tokenizer keys for a model of GGUF architecture `arch` (llama, phi3, phi2) whose
/// folder `dir` holds tokenizer.json; `config` is its config.json, `vocab_size` its rows.
pub fn tokenizer_keys(
    dir: &Path,
    arch: &str,
    config: &Value,
    vocab_size: usize,
) -> Result<Vec<(String, MetaValue)>, DataError> {
    let tj_path = dir.join("tokenizer.json");
    let tj = read_json(&tj_path)?.ok_or_else(|| {
        DataError::file(
            dir.display(),
            "no tokenizer.json (a GGUF file needs the tokenizer; pass a folder that has one)",
        )
    })?;
    let tc = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
    let model = &tj["model"];
    let added = added_tokens(&tj);
    let mut keys = Keys::default();
    if arch == "llama" {
        if let Some(b) = tc["add_prefix_space"].as_bool() {
            keys.set("tokenizer.ggml.add_space_prefix", MetaValue::Bool(b));
        }
    }
    let spm = model["type"] == "BPE" && model["byte_fallback"].as_bool() == Some(true);
    let limit = match spm {
        true => {
            let (tokens, scores, types) = spm_tokens(&tj, &tc, &added, vocab_size);
            keys.set("tokenizer.ggml.model", MetaValue::Str("llama".into()));
            keys.set("tokenizer.ggml.pre", MetaValue::Str("default".into()));
            let n = tokens.len();
            keys.set("tokenizer.ggml.tokens", MetaValue::Strs(tokens));
            keys.set("tokenizer.ggml.scores", MetaValue::F32s(scores));
            keys.set("tokenizer.ggml.token_type", MetaValue::I32s(types));
            Some(n)
        }
        false => {
            if model["type"] != "BPE" {
                return Err(DataError::file(
                    tj_path.display(),
                    format!(
                        "model.type {}: GGUF export reads BPE tokenizers",
                        model["type"]
                    ),
                ));
            }
            let pre = pre_name(&tj_path)?;
            let (tokens, types) = bpe_tokens(&tj, &added, vocab_size);
            keys.set("tokenizer.ggml.model", MetaValue::Str("gpt2".into()));
            keys.set("tokenizer.ggml.pre", MetaValue::Str(pre));
            keys.set("tokenizer.ggml.tokens", MetaValue::Strs(tokens));
            keys.set("tokenizer.ggml.token_type", MetaValue::I32s(types));
            keys.set("tokenizer.ggml.merges", MetaValue::Strs(merges(model)));
            None
        }
    };
    special_vocab(&mut keys, &tj, &tc, config, &added, limit, dir);
    // The converter's Llama class turns BOS off for 49152-token vocabularies (SmolLM's).
    if arch == "llama" && vocab_size == 49152 {
        keys.set("tokenizer.ggml.add_bos_token", MetaValue::Bool(false));
    }
    Ok(keys.0)
}

struct Added {
    id: usize,
    content: String,
    special: bool,
}

fn added_tokens(tj: &Value) -> Vec<Added> {
    tj["added_tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| {
                    Some(Added {
                        id: t["id"].as_u64()? as usize,
                        content: t["content"].as_str()?.to_string(),
                        special: t["special"].as_bool().unwrap_or(false),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Added tokens some models leave unmarked that the converter treats as control tokens.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// Every id below `vocab_size`: the vocabulary's or an added token's text, `[PAD{i}]` for a
/// hole; types normal, control (special or special-looking added tokens), user-defined (other
/// added tokens, their ▁ as spaces), unused (holes).
fn bpe_tokens(tj: &Value, added: &[Added], vocab_size: usize) -> (Vec<String>, Vec<i32>) {
    let mut text: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    if let Some(v) = tj["model"]["vocab"].as_object() {
        for (t, id) in v {
            if let Some(slot) = id.as_u64().and_then(|i| text.get_mut(i as usize)) {
                *slot = Some((t.clone(), NORMAL));
            }
        }
    }
    for a in added {
        if let Some(slot) = text.get_mut(a.id) {
            *slot = Some(if a.special || looks_special(&a.content) {
                (a.content.clone(), CONTROL)
            } else {
                (a.content.replace('▁', " "), USER_DEFINED)
            });
        }
    }
    text.into_iter()
        .enumerate()
        .map(|(i, t)| t.unwrap_or_else(|| (format!("[PAD{i}]"), UNUSED)))
        .unzip()
}

/// A SentencePiece vocabulary converted to tokenizer.json, as gguf-py's `LlamaHfVocab` lists
/// it: base ids in order (bytes typed byte, the tokenizer's special tokens control), then the
/// added tokens past the base vocabulary, every score −1000; padded to `vocab_size` with
/// `[PAD{i}]` (the converter's SentencePiece path does, and llama.cpp needs one token per
/// embedding row).
fn spm_tokens(
    tj: &Value,
    tc: &Value,
    added: &[Added],
    vocab_size: usize,
) -> (Vec<String>, Vec<f32>, Vec<i32>) {
    let vocab = tj["model"]["vocab"].as_object();
    let base = vocab.map_or(0, |v| v.len());
    let mut by_id: Vec<Option<String>> = vec![None; base];
    for (t, id) in vocab.into_iter().flatten() {
        if let Some(slot) = id.as_u64().and_then(|i| by_id.get_mut(i as usize)) {
            *slot = Some(t.clone());
        }
    }
    let specials = special_texts(tc, added);
    let is_byte = |t: &str| {
        t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') && {
            t[3..5].chars().all(|c| c.is_ascii_hexdigit())
        }
    };
    let (mut tokens, mut types) = (Vec::new(), Vec::new());
    let past_base: Vec<&Added> = added.iter().filter(|a| a.id >= base).collect();
    for (i, t) in by_id.into_iter().enumerate() {
        let t = t.unwrap_or_else(|| format!("[PAD{i}]"));
        types.push(if is_byte(&t) {
            BYTE
        } else if specials.contains(&t) {
            CONTROL
        } else {
            NORMAL
        });
        tokens.push(t);
    }
    let mut past = past_base;
    past.sort_by_key(|a| a.id);
    for a in past {
        types.push(match specials.contains(&a.content) {
            true => CONTROL,
            false => USER_DEFINED,
        });
        tokens.push(a.content.clone());
    }
    // Ids past the model's rows are left out, as the converter's SentencePiece path does.
    tokens.truncate(vocab_size);
    types.truncate(vocab_size);
    for i in tokens.len()..vocab_size {
        tokens.push(format!("[PAD{i}]"));
        types.push(UNUSED);
    }
    let scores = vec![-1000.0; tokens.len()];
    (tokens, scores, types)
}

/// The texts transformers counts as special tokens: the config's named ones and its
/// additional_special_tokens, plus added tokens marked special.
fn special_texts(tc: &Value, added: &[Added]) -> Vec<String> {
    let text = |v: &Value| {
        v.as_str()
            .map(str::to_string)
            .or_else(|| v["content"].as_str().map(str::to_string))
    };
    let mut out: Vec<String> = SPECIAL
        .iter()
        .filter_map(|(k, _)| text(&tc[format!("{k}_token")]))
        .collect();
    if let Some(extra) = tc["additional_special_tokens"].as_array() {
        out.extend(extra.iter().filter_map(text));
    }
    out.extend(
        added
            .iter()
            .filter(|a| a.special)
            .map(|a| a.content.clone()),
    );
    out
}

/// tokenizer.json's merges as "a b" (pairs joined, a space inside a part written as Ġ).
fn merges(model: &Value) -> Vec<String> {
    let Some(m) = model["merges"].as_array() else {
        return vec![];
    };
    m.iter()
        .filter_map(|e| match e {
            Value::String(s) => Some(s.clone()),
            Value::Array(p) if p.len() == 2 => {
                let part = |v: &Value| v.as_str().map(|s| s.replace(' ', "Ġ"));
                Some(format!("{} {}", part(&p[0])?, part(&p[1])?))
            }
            _ => None,
        })
        .collect()
}

/// The converter's name for how the tokenizer pre-splits text: the sha256 of its ids for a
/// check text (written as Python prints a list), looked up in llama.cpp's table.
fn pre_name(tj_path: &Path) -> Result<String, DataError> {
    let table: Value = serde_json::from_str(include_str!("gguf_pre.json")).expect("bundled");
    let tok = tokenizers::Tokenizer::from_file(tj_path)
        .map_err(|e| DataError::file(tj_path.display(), e))?;
    let text = table["chktxt"].as_str().expect("bundled");
    let ids = tok
        .encode(text, true)
        .map_err(|e| DataError::file(tj_path.display(), e))?;
    let listed: Vec<String> = ids.get_ids().iter().map(u32::to_string).collect();
    let hash = Sha256::digest(format!("[{}]", listed.join(", ")).as_bytes());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    let rows = table["table"].as_array().expect("bundled");
    rows.iter()
        .find(|r| r[0] == hex.as_str())
        .and_then(|r| r[1].as_str())
        .map(str::to_string)
        .ok_or_else(|| {
            DataError::file(
                tj_path.display(),
                format!(
                    "pre-tokenizer not recognized (hash {hex}): llama.cpp's converter would \
                     refuse it too"
                ),
            )
        })
}

/// gguf-py's `SpecialVocab`: merges were written already; the special ids (tokenizer files
/// first, then config.json; the first found wins), the add_* flags (the post-processor's,
/// then tokenizer_config's for kinds it left unset) and the chat template.
fn special_vocab(
    keys: &mut Keys,
    tj: &Value,
    tc: &Value,
    config: &Value,
    added: &[Added],
    limit: Option<usize>,
    dir: &Path,
) {
    let mut ids: Vec<(&str, u32)> = Vec::new();
    let mut add: Vec<(&str, bool)> = Vec::new();
    let set_add = |add: &mut Vec<(&str, bool)>, k, v, overwrite: bool| match add
        .iter_mut()
        .find(|(n, _)| *n == k)
    {
        Some(slot) if overwrite => slot.1 = v,
        Some(_) => {}
        None => add.push((k, v)),
    };
    let content = |v: &Value| {
        v.as_str()
            .map(str::to_string)
            .or_else(|| v["content"].as_str().map(str::to_string))
    };
    let bos = content(&tc["bos_token"]).or_else(|| content(&tc["cls_token"]));
    let eos = content(&tc["eos_token"]).or_else(|| content(&tc["sep_token"]));
    let cls = content(&tc["cls_token"]);
    let pp = &tj["post_processor"];
    let procs: Vec<&Value> = match pp["processors"].as_array() {
        Some(list) => list.iter().collect(),
        None if !pp.is_null() => vec![pp],
        None => vec![],
    };
    for p in procs {
        match p["type"].as_str() {
            Some("ByteLevel") => {
                set_add(&mut add, "bos", false, false);
                set_add(&mut add, "eos", false, false);
            }
            Some("RobertaProcessing") => {
                for k in ["bos", "eos", "sep"] {
                    set_add(&mut add, k, true, true);
                }
            }
            Some("TemplateProcessing") => {
                let single = p["single"].as_array().cloned().unwrap_or_default();
                let special_id = |v: &Value| v["SpecialToken"]["id"].as_str().map(str::to_string);
                let first = (single.len() > 1).then(|| special_id(&single[0])).flatten();
                let last = (single.len() > 1)
                    .then(|| special_id(&single[single.len() - 1]))
                    .flatten();
                if let Some(f) = &first {
                    let is_bos = Some(f) == bos.as_ref() || Some(f) == cls.as_ref();
                    set_add(&mut add, "bos", is_bos, true);
                }
                if let Some(l) = &last {
                    set_add(&mut add, "eos", Some(l) == eos.as_ref(), true);
                }
                let pair = p["pair"].as_array().cloned().unwrap_or_default();
                let start =
                    usize::from(first.is_some() && pair.first().and_then(special_id) == first);
                let stop = match last.is_some() && pair.last().and_then(special_id) == last {
                    true => pair.len().saturating_sub(1),
                    false => pair.len(),
                };
                let inner = pair.get(start..stop).unwrap_or(&[]);
                let seq = |v: &Value| v["Sequence"]["id"].as_str().map(str::to_string);
                if inner.len() >= 2
                    && inner.first().and_then(seq).as_deref() == Some("A")
                    && inner.last().and_then(seq).as_deref() == Some("B")
                {
                    let middle = &inner[1..inner.len() - 1];
                    let sep_or_eos = |v: &Value| {
                        let id = special_id(v);
                        id.is_some() && (id == content(&tc["sep_token"]) || id == eos)
                    };
                    let mut add_sep = false;
                    if let Some(m0) = middle.first() {
                        if sep_or_eos(m0) && last.is_none() {
                            add_sep = true;
                        }
                    }
                    if middle.len() == 2 && sep_or_eos(&middle[1]) {
                        add_sep = true;
                    }
                    if !middle.is_empty() {
                        set_add(&mut add, "sep", add_sep, true);
                    }
                }
            }
            _ => {}
        }
    }
    let fits = |id: u64| limit.is_none_or(|n| (id as usize) < n);
    let set_id = |ids: &mut Vec<(&str, u32)>, k: &'static str, id: Option<u64>| {
        if let Some(id) = id.filter(|&i| fits(i)) {
            if !ids.iter().any(|(n, _)| *n == k) {
                ids.push((k, id as u32));
            }
        }
    };
    for (k, _) in SPECIAL {
        if let Some(b) = tc[format!("add_{k}_token")].as_bool() {
            set_add(&mut add, k, b, false);
        }
        let want = match k {
            "bos" => bos.clone(),
            "eos" => eos.clone(),
            _ => content(&tc[format!("{k}_token")]),
        };
        if let Some(want) = want {
            let id = added
                .iter()
                .find(|a| a.content == want)
                .map(|a| a.id as u64);
            set_id(&mut ids, k, id);
        }
    }
    for (k, _) in SPECIAL {
        set_id(&mut ids, k, config[format!("{k}_token_id")].as_u64());
    }
    for (k, v) in ids {
        let key = SPECIAL
            .iter()
            .find(|(n, _)| *n == k)
            .map_or(k, |(_, key)| *key);
        keys.set(&format!("tokenizer.ggml.{key}"), MetaValue::U32(v));
    }
    for (k, v) in add {
        keys.set(&format!("tokenizer.ggml.add_{k}_token"), MetaValue::Bool(v));
    }
    let template = match tc["chat_template"].as_str() {
        Some(t) => Some(t.to_string()),
        None => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
    };
    if let Some(t) = template {
        keys.set("tokenizer.chat_template", MetaValue::Str(t));
    }
}

/// A GGUF base's own tokenizer keys, to write again with a model made from it. The reader
/// keeps values, not their exact GGUF types: these are written with the types the converter
/// gives each key.
pub fn keys_from_gguf(file: &phi_model::gguf::GgufFile) -> Vec<(String, MetaValue)> {
    use phi_model::gguf::GgufValue as G;
    let strs = |a: &[G]| {
        a.iter()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect()
    };
    file.metadata()
        .iter()
        .filter(|(k, _)| k.starts_with("tokenizer."))
        .filter_map(|(k, v)| {
            let value = match v {
                G::Str(s) => MetaValue::Str(s.clone()),
                G::Bool(b) => MetaValue::Bool(*b),
                G::U64(_) | G::I64(_) => MetaValue::U32(v.as_u64()? as u32),
                G::F64(x) => MetaValue::F32(*x as f32),
                G::Array(a) => match a.first() {
                    Some(G::Str(_)) | None => MetaValue::Strs(strs(a)),
                    Some(G::F64(_)) => {
                        MetaValue::F32s(a.iter().filter_map(G::as_f64).map(|x| x as f32).collect())
                    }
                    Some(_) => MetaValue::I32s(
                        a.iter()
                            .map(|v| match v {
                                G::I64(i) => *i as i32,
                                other => other.as_u64().unwrap_or(0) as i32,
                            })
                            .collect(),
                    ),
                },
            };
            Some((k.clone(), value))
        })
        .collect()
}
