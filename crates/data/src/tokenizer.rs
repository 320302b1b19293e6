//! HF `tokenizers` plus what transformers keeps in tokenizer_config.json: the BOS / EOS / PAD
//! tokens, whether plain text gets a BOS, and the chat template.

use crate::DataError;
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};

/// A special token by text and id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Special {
    pub text: String,
    pub id: u32,
}

pub struct Tok {
    pub inner: tokenizers::Tokenizer,
    pub path: PathBuf,
    pub bos: Option<Special>,
    pub eos: Option<Special>,
    pub pad: Option<Special>,
    /// Whether `tokenizer(text)` in transformers starts plain text with BOS: the config's
    /// `add_bos_token`, else whether the post-processor inserts one (Llama-3 does, in
    /// tokenizer.json only).
    pub adds_bos: bool,
    /// The jinja chat template (tokenizer_config.json's, or chat_template.jinja beside it).
    pub chat_template: Option<String>,
}

/// `"<s>"` or `{"content": "<s>", ...}` (an AddedToken as transformers 4 writes it).
fn token_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

/// The tokenizer file in a model folder: tokenizer.json, else tokenizer.json.gz (large
/// vocabularies ship compressed). The one lookup every binary and the trainer use.
pub fn find(dir: Option<&Path>) -> Option<PathBuf> {
    let dir = dir?;
    ["tokenizer.json", "tokenizer.json.gz"]
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
}

impl Tok {
    /// `path` is a tokenizer.json (or tokenizer.json.gz) or a folder holding one;
    /// tokenizer_config.json and chat_template.jinja are read from the same folder when present.
    pub fn load(path: &Path) -> Result<Tok, DataError> {
        let file = if path.is_dir() {
            find(Some(path)).unwrap_or_else(|| path.join("tokenizer.json"))
        } else {
            path.to_path_buf()
        };
        let bad =
            |e: String| DataError::file(file.display(), format!("cannot load tokenizer: {e}"));
        let inner = if file.extension().is_some_and(|e| e == "gz") {
            // Large vocabularies ship compressed (a 128K-token tokenizer.json is 9 MB).
            let mut bytes = Vec::new();
            std::fs::File::open(&file)
                .and_then(|f| flate2::read::GzDecoder::new(f).read_to_end(&mut bytes))
                .map_err(|e| bad(e.to_string()))?;
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| bad(e.to_string()))?
        } else {
            tokenizers::Tokenizer::from_file(&file).map_err(|e| bad(e.to_string()))?
        };
        let dir = file.parent().unwrap_or(Path::new("."));
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Value = if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path)
                .map_err(|e| DataError::file(cfg_path.display(), format!("cannot read: {e}")))?;
            serde_json::from_str(&text)
                .map_err(|e| DataError::file(cfg_path.display(), format!("not valid JSON: {e}")))?
        } else {
            Value::Null
        };
        let mut tok = Tok {
            inner,
            path: file.clone(),
            bos: None,
            eos: None,
            pad: None,
            adds_bos: false,
            chat_template: None,
        };
        let special = |key: &str| -> Result<Option<Special>, DataError> {
            let Some(text) = cfg.get(key).and_then(token_text) else {
                return Ok(None);
            };
            match tok.inner.token_to_id(&text) {
                Some(id) => Ok(Some(Special { text, id })),
                None => Err(DataError::file(
                    cfg_path.display(),
                    format!("key {key}: {text:?} is not a token of {}", file.display()),
                )),
            }
        };
        let (bos, eos, pad) = (
            special("bos_token")?,
            special("eos_token")?,
            special("pad_token")?,
        );
        tok.bos = bos.or_else(|| tok.post_processor_bos());
        tok.eos = eos;
        tok.pad = pad;
        tok.adds_bos = match cfg.get("add_bos_token").and_then(Value::as_bool) {
            Some(b) => b,
            None => tok.post_processor_bos().is_some(),
        };
        tok.chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // transformers' named templates: the one called "default" is what it renders.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .map(String::from),
            _ => None,
        };
        let jinja = dir.join("chat_template.jinja");
        if tok.chat_template.is_none() && jinja.exists() {
            tok.chat_template = Some(
                std::fs::read_to_string(&jinja)
                    .map_err(|e| DataError::file(jinja.display(), format!("cannot read: {e}")))?,
            );
        }
        Ok(tok)
    }

    /// The id the post-processor puts before plain text, if any: what a tokenizer that adds
    /// BOS on its own would double if a template also wrote one.
    pub fn post_processor_bos(&self) -> Option<Special> {
        let with = self.inner.encode("a", true).ok()?;
        let without = self.inner.encode("a", false).ok()?;
        let (w, wo) = (with.get_ids(), without.get_ids());
        if w.len() > wo.len() && w.ends_with(wo) {
            let id = w[0];
            let text = self.inner.id_to_token(id)?;
            return Some(Special { text, id });
        }
        None
    }

    /// Encodes as `tokenizer(text)` does in transformers: with the tokenizer's own special
    /// tokens (e.g. a BOS added by its post-processor) when `special` is true.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, DataError> {
        self.inner
            .encode(text, special)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| DataError::file(self.path.display(), format!("cannot encode text: {e}")))
    }

    /// Ids with the byte range of `text` each came from, without special tokens added.
    pub fn encode_offsets(&self, text: &str) -> Result<Vec<(u32, usize, usize)>, DataError> {
        let e = self.inner.encode(text, false).map_err(|e| {
            DataError::file(self.path.display(), format!("cannot encode text: {e}"))
        })?;
        Ok(e.get_ids()
            .iter()
            .zip(e.get_offsets())
            .map(|(&id, &(a, b))| (id, a, b))
            .collect())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> String {
        self.inner.decode(ids, skip_special).unwrap_or_default()
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// `token` as a Special, or an error naming the tokenizer file and who asked for it.
    pub fn special(&self, token: &str, wanted_by: &str) -> Result<Special, DataError> {
        self.token_id(token)
            .map(|id| Special {
                text: token.to_string(),
                id,
            })
            .ok_or_else(|| {
                DataError::file(
                    self.path.display(),
                    format!("{wanted_by} needs token {token:?}, which this tokenizer lacks"),
                )
            })
    }

    /// The pad id for batching: PAD, else EOS (padding is masked out of the loss either way).
    pub fn pad_id(&self) -> Option<u32> {
        self.pad.as_ref().or(self.eos.as_ref()).map(|s| s.id)
    }
}
