//! One two-turn conversation per template with masked tokens in ⟦ ⟧: the blocks of
//! docs/data.md's "Each template, rendered" (crates/data/tests/docs_templates.rs keeps the two
//! equal). `cargo run -p phi-data --example render_templates` prints them; add `-- --write` to
//! replace them in docs/data.md.

use phi_data::encode::{supervised, ChatFormat, EncodeOptions};
use phi_data::{preview, Conversation, Message, Role, Special, Tok};
use std::path::{Path, PathBuf};

/// (template, tokenizer under assets/tokenizers, what the heading adds): every name
/// `ChatFormat` accepts, with the closest tokenizer in this repository.
pub const CASES: &[(&str, &str, &str)] = &[
    ("phi", "phi3", ""),
    ("phi_small", "phi3", "; Phi-3-small's own is not in assets/"),
    ("phi2", "gpt2", ""),
    ("llama2", "llama2", ""),
    ("llama3", "llama3_1", ""),
    (
        "mistral",
        "llama2",
        "; Mistral's is not in assets/, both have `<s>` / `</s>`",
    ),
    ("vicuna", "llama2", ""),
    (
        "zephyr",
        "llama2",
        "; its role tags are plain text there, as in Mistral's",
    ),
    (
        "gemma",
        "gpt2",
        " plus Gemma's `<bos>`, `<start_of_turn>`, `<end_of_turn>`; Gemma's is not in assets/",
    ),
    ("chatml", "smollm2", ""),
    ("smollm", "smollm2", ""),
    ("smollm2", "smollm2", ""),
    ("qwen", "smollm2", ""),
    ("alpaca", "gpt2", ""),
    ("default", "gpt2", ""),
    ("empty", "gpt2", ""),
    ("jinja", "phi3", ", its Phi-3.5 chat template"),
];

pub const SECTION: &str = "## Each template, rendered";

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn conversation() -> Conversation {
    Conversation {
        system: String::new(),
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

fn tokenizer(template: &str, name: &str) -> Tok {
    let mut tok = Tok::load(&repo().join("assets/tokenizers").join(name)).expect("tokenizer");
    if template == "gemma" {
        let added = ["<bos>", "<start_of_turn>", "<end_of_turn>"]
            .map(|t| tokenizers::AddedToken::from(t, true));
        tok.inner
            .add_special_tokens(added)
            .expect("Gemma's turn tokens");
        tok.bos = Some(Special {
            text: "<bos>".into(),
            id: tok.token_id("<bos>").expect("just added"),
        });
    }
    tok
}

/// The markdown blocks, one per template, as docs/data.md holds them.
pub fn blocks() -> String {
    let conv = conversation();
    let mut out = Vec::new();
    for (template, tokenizer_name, note) in CASES {
        let mut tok = tokenizer(template, tokenizer_name);
        let fmt = ChatFormat::new(Some(template), &mut tok).expect("template");
        let e = supervised(
            &fmt.encode_pairs(&tok, &conv).expect("encode"),
            &EncodeOptions::default(),
            None,
        );
        out.push(format!(
            "#### `{template}` ({tokenizer_name} tokenizer{note})\n\n```text\n{}\n```\n",
            preview::marked(&tok, &e)
        ));
    }
    out.join("\n")
}

/// The byte range of the blocks in docs/data.md: from the first `####` under `SECTION` to the
/// next `## ` heading or the end.
pub fn blocks_range(doc: &str) -> Option<std::ops::Range<usize>> {
    let section = doc.find(SECTION)?;
    let start = section + doc[section..].find("\n#### ")? + 1;
    let end = doc[start..]
        .find("\n## ")
        .map_or(doc.len(), |i| start + i + 1);
    Some(start..end)
}

fn main() {
    let text = blocks();
    if std::env::args().any(|a| a == "--write") {
        let path = repo().join("docs/data.md");
        let mut doc = std::fs::read_to_string(&path).expect("docs/data.md");
        let range = blocks_range(&doc).expect("docs/data.md has the section and a #### block");
        let tail = if range.end == doc.len() { "" } else { "\n" };
        doc.replace_range(range, &format!("{text}{tail}"));
        std::fs::write(&path, doc).expect("write docs/data.md");
        eprintln!("wrote {}", path.display());
    } else {
        print!("{text}");
    }
}
