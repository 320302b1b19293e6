//! Datasets as LLaMA-Factory reads them: a `dataset_info.json` registry (file_name,
//! formatting, columns, tags), or a .json / .jsonl / .txt path given directly; alpaca,
//! sharegpt (from/value or OpenAI role/content), plain text and pre-tokenized records.

use crate::encode::Encoded;
use crate::template::{Conversation, Message, Role};
use crate::DataError;
use serde_json::{Map, Value};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq)]
pub enum Example {
    Chat(Conversation),
    Text(String),
    Tokens(Encoded),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    /// The dataset's file, for error messages.
    pub file: String,
    /// "line 4" or "record 4" (1-based).
    pub at: String,
    pub example: Example,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Formatting {
    Alpaca,
    Sharegpt,
    Text,
    Tokenized,
}

/// One registry entry (LF's DatasetAttr), with LF's defaults.
#[derive(Debug, Clone)]
pub struct DatasetAttr {
    pub name: String,
    pub file: PathBuf,
    pub formatting: Formatting,
    pub prompt: String,
    pub query: String,
    pub response: String,
    pub history: Option<String>,
    pub system: Option<String>,
    pub messages: String,
    pub tools: Option<String>,
    pub role_tag: String,
    pub content_tag: String,
    pub user_tag: String,
    pub assistant_tag: String,
    pub system_tag: String,
    /// Observation / function-call turns (tool use) are not trained here.
    pub tool_tags: Vec<String>,
}

impl DatasetAttr {
    fn new(name: &str, file: PathBuf, formatting: Formatting) -> Self {
        let s = |x: &str| x.to_string();
        DatasetAttr {
            name: s(name),
            file,
            formatting,
            prompt: s("instruction"),
            query: s("input"),
            response: s("output"),
            history: None,
            system: None,
            messages: s("conversations"),
            tools: None,
            role_tag: s("from"),
            content_tag: s("value"),
            user_tag: s("human"),
            assistant_tag: s("gpt"),
            system_tag: s("system"),
            tool_tags: vec![s("observation"), s("function_call")],
        }
    }

    /// An entry of dataset_info.json (`info` names that file for errors).
    pub fn from_registry(
        name: &str,
        entry: &Value,
        dir: &Path,
        info: &str,
    ) -> Result<Self, DataError> {
        let key = |k: &str| format!("{name}.{k}");
        let bad =
            |k: &str, want: &str| DataError::file(info, format!("key {}: expected {want}", key(k)));
        let Some(file) = entry.get("file_name").and_then(Value::as_str) else {
            for hub in ["hf_hub_url", "ms_hub_url", "om_hub_url", "script_url"] {
                if let Some(url) = entry.get(hub).and_then(Value::as_str) {
                    return Err(DataError::file(
                        info,
                        format!("dataset {name} lives on a hub ({hub} {url}); download it and add a file_name entry"),
                    ));
                }
            }
            return Err(bad("file_name", "a file name under the dataset_dir"));
        };
        if entry.get("ranking").and_then(Value::as_bool) == Some(true) {
            return Err(bad(
                "ranking",
                "false (preference data is not supported by the sft stage)",
            ));
        }
        let columns = entry.get("columns").cloned().unwrap_or(Value::Null);
        let col = |k: &str| columns.get(k).and_then(Value::as_str).map(String::from);
        let formatting = match entry.get("formatting").and_then(Value::as_str) {
            None | Some("alpaca")
                if col("prompt").as_deref() == Some("text") && col("response").is_none() =>
            {
                Formatting::Text
            }
            None | Some("alpaca") => Formatting::Alpaca,
            Some("sharegpt") => Formatting::Sharegpt,
            Some("text") => Formatting::Text,
            Some("tokenized") => Formatting::Tokenized,
            Some(other) => {
                return Err(bad(
                    "formatting",
                    &format!("alpaca, sharegpt, text or tokenized, found {other:?}"),
                ))
            }
        };
        let mut a = DatasetAttr::new(name, dir.join(file), formatting);
        if formatting == Formatting::Text {
            a.prompt = col("prompt").unwrap_or_else(|| "text".into());
        }
        for (k, slot) in [
            ("prompt", &mut a.prompt),
            ("query", &mut a.query),
            ("response", &mut a.response),
            ("messages", &mut a.messages),
        ] {
            if let Some(v) = col(k) {
                *slot = v;
            }
        }
        a.history = col("history");
        a.system = col("system");
        a.tools = col("tools");
        for unsupported in [
            "images", "videos", "audios", "chosen", "rejected", "kto_tag",
        ] {
            if col(unsupported).is_some() {
                return Err(bad(
                    &format!("columns.{unsupported}"),
                    "text-only sft columns (multimodal and preference data are not supported)",
                ));
            }
        }
        let tags = entry.get("tags").cloned().unwrap_or(Value::Null);
        let tag = |k: &str| tags.get(k).and_then(Value::as_str).map(String::from);
        for (k, slot) in [
            ("role_tag", &mut a.role_tag),
            ("content_tag", &mut a.content_tag),
            ("user_tag", &mut a.user_tag),
            ("assistant_tag", &mut a.assistant_tag),
            ("system_tag", &mut a.system_tag),
        ] {
            if let Some(v) = tag(k) {
                *slot = v;
            }
        }
        a.tool_tags = ["observation_tag", "function_tag"]
            .iter()
            .map(|k| {
                tag(k).unwrap_or_else(|| {
                    if *k == "observation_tag" {
                        "observation"
                    } else {
                        "function_call"
                    }
                    .into()
                })
            })
            .collect();
        Ok(a)
    }

    /// A file named directly: the format is read off the first record's keys.
    pub fn from_path(path: &Path, first: Option<&Value>) -> Self {
        let name = path.display().to_string();
        let Some(Value::Object(o)) = first else {
            return DatasetAttr::new(&name, path.to_path_buf(), Formatting::Text);
        };
        let fmt = if o.contains_key("input_ids") {
            Formatting::Tokenized
        } else if o.contains_key("conversations") || o.contains_key("messages") {
            Formatting::Sharegpt
        } else if o.contains_key("instruction") {
            Formatting::Alpaca
        } else {
            Formatting::Text
        };
        let mut a = DatasetAttr::new(&name, path.to_path_buf(), fmt);
        if fmt == Formatting::Text {
            a.prompt = "text".into();
        }
        if o.contains_key("system") {
            a.system = Some("system".into());
        }
        if o.contains_key("history") {
            a.history = Some("history".into());
        }
        if !o.contains_key("conversations") && o.contains_key("messages") {
            a.messages = "messages".into();
        }
        let turn = o
            .get(&a.messages)
            .and_then(|m| m.get(0))
            .and_then(Value::as_object);
        if turn.is_some_and(|t| t.contains_key("role")) {
            a.role_tag = "role".into();
            a.content_tag = "content".into();
            a.user_tag = "user".into();
            a.assistant_tag = "assistant".into();
            a.tool_tags = vec!["tool".into(), "function".into()];
        }
        a
    }
}

/// What one line or array element of a dataset file holds: a JSON value, or why a JSON Lines
/// line is not one (kept, not raised, so `skip_bad_records` can pass over it like any other
/// bad record).
pub type RawRecord = (String, Result<Value, String>);

/// Raw JSON values of a file with their "line N" / "record N" labels: a JSON array when the
/// content starts with `[`, else JSON Lines (whatever the extension says, as `datasets` reads
/// both); a .txt file gives one text per line. A JSON array that does not parse fails as a
/// whole: past the first syntax error its record boundaries are unknown.
pub fn read_values(path: &Path) -> Result<Vec<RawRecord>, DataError> {
    let f = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| DataError::file(&f, format!("cannot read: {e}")))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if ext == "txt" {
        return Ok(text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                (
                    format!("line {}", i + 1),
                    Ok(serde_json::json!({ "text": l })),
                )
            })
            .collect());
    }
    if text.trim_start().starts_with('[') {
        let v: Value = serde_json::from_str(&text).map_err(|e| {
            DataError::record(
                &f,
                format!("line {}", e.line()),
                format!("not valid JSON: {e}"),
            )
        })?;
        return match v {
            Value::Array(items) => Ok(items
                .into_iter()
                .enumerate()
                .map(|(i, v)| (format!("record {}", i + 1), Ok(v)))
                .collect()),
            _ => Err(DataError::file(
                &f,
                "expected a JSON array of records (or JSON Lines)",
            )),
        };
    }
    Ok(text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let v = serde_json::from_str(line).map_err(|e| format!("not valid JSON: {e}"));
            (format!("line {}", i + 1), v)
        })
        .collect())
}

fn string_field(o: &Map<String, Value>, key: &str, required: bool) -> Result<String, String> {
    match o.get(key) {
        Some(Value::String(s)) => Ok(s.clone()),
        None | Some(Value::Null) if !required => Ok(String::new()),
        None | Some(Value::Null) => Err(format!("missing field {key:?}")),
        Some(other) => Err(format!("field {key:?}: expected a string, found {other}")),
    }
}

fn ids_field(o: &Map<String, Value>, key: &str) -> Result<Option<Vec<i64>>, String> {
    match o.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => a
            .iter()
            .map(Value::as_i64)
            .collect::<Option<Vec<_>>>()
            .map(Some)
            .ok_or_else(|| format!("field {key:?}: expected a list of integers")),
        Some(other) => Err(format!(
            "field {key:?}: expected a list of integers, found {other}"
        )),
    }
}

/// Replaces `{{name}}`-style placeholders (LF's identity recipe) in every string.
fn fill(s: &str, placeholders: &[(String, String)]) -> String {
    placeholders.iter().fold(s.to_string(), |acc, (k, v)| {
        acc.replace(&format!("{{{{{k}}}}}"), v)
    })
}

impl DatasetAttr {
    /// One record to an example, or why it cannot be one.
    pub fn parse(&self, v: &Value, placeholders: &[(String, String)]) -> Result<Example, String> {
        let Value::Object(o) = v else {
            return Err(format!("expected a JSON object, found {v}"));
        };
        let f = |s: String| fill(&s, placeholders);
        match self.formatting {
            Formatting::Text => Ok(Example::Text(f(string_field(o, &self.prompt, true)?))),
            Formatting::Tokenized => {
                let ids = ids_field(o, "input_ids")?.ok_or("missing field \"input_ids\"")?;
                if ids.iter().any(|&x| x < 0 || x > u32::MAX as i64) {
                    return Err("field \"input_ids\": token ids must be non-negative".into());
                }
                let labels = ids_field(o, "labels")?.unwrap_or_else(|| ids.clone());
                let mask = ids_field(o, "attention_mask")?;
                for (k, len) in [
                    ("labels", Some(labels.len())),
                    ("attention_mask", mask.as_ref().map(Vec::len)),
                ] {
                    if len.is_some_and(|l| l != ids.len()) {
                        return Err(format!(
                            "field {k:?}: {} values for {} input_ids",
                            len.unwrap(),
                            ids.len()
                        ));
                    }
                }
                Ok(Example::Tokens(Encoded {
                    input_ids: ids.iter().map(|&x| x as u32).collect(),
                    labels,
                    attention_mask: mask,
                    position_ids: None,
                }))
            }
            Formatting::Alpaca => {
                let mut messages = Vec::new();
                if let Some(h) = &self.history {
                    if let Some(Value::Array(turns)) = o.get(h) {
                        for t in turns {
                            let pair = t.as_array().filter(|p| p.len() == 2);
                            let (Some(q), Some(a)) = (
                                pair.and_then(|p| p[0].as_str()),
                                pair.and_then(|p| p[1].as_str()),
                            ) else {
                                return Err(format!(
                                    "field {h:?}: expected [prompt, response] pairs"
                                ));
                            };
                            messages.push(Message {
                                role: Role::User,
                                content: f(q.into()),
                            });
                            messages.push(Message {
                                role: Role::Assistant,
                                content: f(a.into()),
                            });
                        }
                    }
                }
                // LF joins instruction and input with a newline, skipping empty ones.
                let parts: Vec<String> = [
                    string_field(o, &self.prompt, true)?,
                    string_field(o, &self.query, false)?,
                ]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect();
                messages.push(Message {
                    role: Role::User,
                    content: f(parts.join("\n")),
                });
                messages.push(Message {
                    role: Role::Assistant,
                    content: f(string_field(o, &self.response, true)?),
                });
                let system = match &self.system {
                    Some(k) => f(string_field(o, k, false)?),
                    None => String::new(),
                };
                Ok(Example::Chat(Conversation { system, messages }))
            }
            Formatting::Sharegpt => self.parse_sharegpt(o, &f),
        }
    }

    fn parse_sharegpt(
        &self,
        o: &Map<String, Value>,
        f: &dyn Fn(String) -> String,
    ) -> Result<Example, String> {
        if let Some(k) = &self.tools {
            if o.get(k)
                .is_some_and(|t| !(t.is_null() || t == "" || t == &Value::Array(vec![])))
            {
                return Err(format!("field {k:?}: tool definitions are not supported"));
            }
        }
        let turns = match o.get(&self.messages) {
            Some(Value::Array(a)) => a,
            None => return Err(format!("missing field {:?}", self.messages)),
            Some(other) => {
                return Err(format!(
                    "field {:?}: expected a list of turns, found {other}",
                    self.messages
                ))
            }
        };
        let mut system = match &self.system {
            Some(k) => f(string_field(o, k, false)?),
            None => String::new(),
        };
        let mut messages = Vec::new();
        for (i, t) in turns.iter().enumerate() {
            let Some(t) = t.as_object() else {
                return Err(format!("turn {}: expected an object", i + 1));
            };
            let role = string_field(t, &self.role_tag, true)
                .map_err(|e| format!("turn {}: {e}", i + 1))?;
            let content = string_field(t, &self.content_tag, true)
                .map_err(|e| format!("turn {}: {e}", i + 1))?;
            if i == 0 && role == self.system_tag {
                system = f(content);
                continue;
            }
            let role = if role == self.user_tag {
                Role::User
            } else if role == self.assistant_tag {
                Role::Assistant
            } else if self.tool_tags.contains(&role) {
                return Err(format!(
                    "turn {}: role {role:?} (tool use) is not supported",
                    i + 1
                ));
            } else {
                return Err(format!(
                    "turn {}: unknown role {role:?} (expected {:?} or {:?})",
                    i + 1,
                    self.user_tag,
                    self.assistant_tag
                ));
            };
            let want = if messages.len() % 2 == 0 {
                Role::User
            } else {
                Role::Assistant
            };
            if role != want {
                return Err(format!(
                    "turn {}: conversation does not alternate {} / {} (found {} twice in a row or first)",
                    i + 1,
                    self.user_tag,
                    self.assistant_tag,
                    if role == Role::User { &self.user_tag } else { &self.assistant_tag }
                ));
            }
            messages.push(Message {
                role,
                content: f(content),
            });
        }
        if messages.is_empty() || messages.len() % 2 != 0 {
            return Err(format!(
                "conversation must end with an {:?} turn ({} turns after the system turn)",
                self.assistant_tag,
                messages.len()
            ));
        }
        Ok(Example::Chat(Conversation { system, messages }))
    }
}
