//! Helpers shared by the test files: the repository's tokenizers, the LF reference rows and
//! scratch files. Each test binary uses a different subset.
#![allow(dead_code)]

use phi_data::{Conversation, Message, Role, Tok};
use serde_json::Value;
use std::path::{Path, PathBuf};

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// LF's reference rows: tests/fixtures/oracle-data, or any folder of the same layout named by
/// `PHI_ORACLE_DATA_DIR`.
pub fn oracle_dir() -> PathBuf {
    match std::env::var("PHI_ORACLE_DATA_DIR") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => repo().join("tests/fixtures/oracle-data"),
    }
}

pub fn chat_templates_dir() -> PathBuf {
    repo().join("tests/fixtures/chat_templates")
}

pub fn tokenizer(name: &str) -> Tok {
    Tok::load(&repo().join("assets/tokenizers").join(name)).unwrap_or_else(|e| panic!("{e}"))
}

pub fn rows(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: line {}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// (dataset, index): how LF's reference files name a record.
pub fn key(row: &Value) -> (String, i64) {
    (
        row["dataset"].as_str().unwrap().to_string(),
        row["index"].as_i64().unwrap(),
    )
}

pub fn conversation(row: &Value) -> Conversation {
    let mut c = Conversation::default();
    for m in row["messages"].as_array().unwrap() {
        let content = m["content"].as_str().unwrap().to_string();
        match m["role"].as_str().unwrap() {
            "system" => c.system = content,
            "user" => c.messages.push(Message {
                role: Role::User,
                content,
            }),
            "assistant" => c.messages.push(Message {
                role: Role::Assistant,
                content,
            }),
            r => panic!("unexpected role {r}"),
        }
    }
    c
}

pub fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

/// The two-turn conversation of docs/data.md, with an optional system prompt.
pub fn sample(system: &str) -> Conversation {
    Conversation {
        system: system.to_string(),
        messages: [
            ("Hi!", Role::User),
            ("Hello.", Role::Assistant),
            ("2+2?", Role::User),
            ("4", Role::Assistant),
        ]
        .iter()
        .map(|(c, role)| Message {
            role: *role,
            content: c.to_string(),
        })
        .collect(),
    }
}

/// A file in a per-process scratch folder (each test binary is its own process).
pub fn scratch(name: &str, content: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("phi-data-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}
