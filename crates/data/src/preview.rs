//! LLaMA-Factory's `print_supervised_dataset_example`, for the first N encoded examples.

use crate::encode::{Encoded, IGNORE};
use crate::tokenizer::Tok;
use std::fmt::Write;

fn list<T: std::fmt::Display>(xs: &[T]) -> String {
    let items: Vec<String> = xs.iter().map(|x| x.to_string()).collect();
    format!("[{}]", items.join(", "))
}

/// input_ids, inputs (decoded with special tokens), label_ids, labels (decoded, -100 dropped).
pub fn render(tok: &Tok, e: &Encoded) -> String {
    let trained: Vec<u32> = e
        .labels
        .iter()
        .filter(|&&l| l != IGNORE)
        .map(|&l| l as u32)
        .collect();
    let mut s = String::new();
    let _ = writeln!(s, "input_ids:\n{}", list(&e.input_ids));
    let _ = writeln!(s, "inputs:\n{}", tok.decode(&e.input_ids, false));
    let _ = writeln!(s, "label_ids:\n{}", list(&e.labels));
    let _ = writeln!(s, "labels:\n{}", tok.decode(&trained, false));
    s
}

/// One JSON line: `{"input_ids": [...], "labels": [...]}`.
pub fn json_line(e: &Encoded) -> String {
    serde_json::json!({ "input_ids": e.input_ids, "labels": e.labels }).to_string()
}

/// The decoded example with every run of masked (-100) tokens wrapped in `⟦ ⟧`, so prompt
/// masking can be read at a glance.
pub fn marked(tok: &Tok, e: &Encoded) -> String {
    let mut out = String::new();
    let mut start = 0;
    for i in 1..=e.len() {
        let masked = |k: usize| e.labels[k] == IGNORE;
        if i == e.len() || masked(i) != masked(start) {
            let text = tok.decode(&e.input_ids[start..i], false);
            if masked(start) {
                let _ = write!(out, "⟦{text}⟧");
            } else {
                out.push_str(&text);
            }
            start = i;
        }
    }
    out
}
