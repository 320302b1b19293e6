//! Prints one two-turn conversation per template with masked tokens in ⟦ ⟧ (docs/data.md).
//! `cargo run -p phi-data --example render_templates`

use phi_data::encode::{supervised, ChatFormat, EncodeOptions};
use phi_data::{preview, Conversation, Message, Role, Tok};
use std::path::Path;

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let conv = Conversation {
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
    };
    let pairs = [
        ("phi", "phi3"),
        ("phi2", "gpt2"),
        ("llama2", "llama2"),
        ("llama3", "llama3_1"),
        ("chatml", "smollm2"),
        ("smollm2", "smollm2"),
        ("qwen", "smollm2"),
        ("alpaca", "gpt2"),
        ("default", "gpt2"),
        ("jinja", "phi3"),
    ];
    for (template, tokenizer) in pairs {
        let mut tok =
            Tok::load(&root.join("assets/tokenizers").join(tokenizer)).expect("tokenizer");
        let fmt = ChatFormat::new(Some(template), &mut tok).expect("template");
        let e = supervised(
            &fmt.encode_pairs(&tok, &conv).expect("encode"),
            &EncodeOptions::default(),
            None,
        );
        println!(
            "### `{template}` ({tokenizer} tokenizer)\n\n```text\n{}\n```\n",
            preview::marked(&tok, &e)
        );
    }
}
