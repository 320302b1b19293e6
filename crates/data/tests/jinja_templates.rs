//! Every chat template in tests/fixtures/chat_templates rendered through the jinja path: the
//! sample conversation against each template's known format, and every LF reference record
//! against what the reference files in hf_apply_chat_template/ (transformers' own renderings)
//! imply for the templates that have no reference file of their own.

mod common;
use common::{chat_templates_dir, conversation, ints, key, oracle_dir, rows, sample, tokenizer};
use phi_data::encode::ChatFormat;
use phi_data::{Conversation, Tok};
use serde_json::Value;
use std::collections::HashMap;

const SYSTEM: &str = "You are terse.";

const LLAMA31_HEAD: &str = "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n\
    Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n";
const LLAMA3_TURNS: &str = "<|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>\
    <|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>\
    <|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>\
    <|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>";
const LLAMA3_SYSTEM: &str =
    "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>";
const LLAMA3_GEN: &str = "<|start_header_id|>assistant<|end_header_id|>\n\n";
const PHI3_TURNS: &str = "<|user|>\nHi!<|end|>\n<|assistant|>\nHello.<|end|>\n\
    <|user|>\n2+2?<|end|>\n<|assistant|>\n4<|end|>\n";
const CHATML_TURNS: &str =
    "<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n\
    <|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n";

struct Case {
    file: &'static str,
    tokenizer: &'static str,
    /// The sample conversation rendered without and with the system prompt `SYSTEM`.
    plain: String,
    with_system: String,
    /// What each response trains on, decoded.
    responses: [&'static str; 2],
    /// What the rendering ends with that no example keeps (a header after the last EOS).
    dropped: &'static str,
}

fn cases() -> Vec<Case> {
    let llama31 = |file| Case {
        file,
        tokenizer: "llama3_1",
        plain: format!("{LLAMA31_HEAD}<|eot_id|>{LLAMA3_TURNS}"),
        with_system: format!("{LLAMA31_HEAD}{SYSTEM}<|eot_id|>{LLAMA3_TURNS}"),
        responses: ["Hello.<|eot_id|>", "4<|eot_id|>"],
        dropped: "",
    };
    vec![
        Case {
            file: "microsoft-Phi-3.5-mini-instruct.jinja",
            tokenizer: "phi3",
            plain: format!("{PHI3_TURNS}<|endoftext|>"),
            with_system: format!("<|system|>\n{SYSTEM}<|end|>\n{PHI3_TURNS}<|endoftext|>"),
            responses: ["Hello.<|end|>", "4<|end|><|endoftext|>"],
            dropped: "",
        },
        // The early Phi-3-mini template: BOS, no system block, no EOS at the end.
        Case {
            file: "phi-3-mini-4k-instruct.from-ggml-vocab-phi-3.gguf.jinja",
            tokenizer: "phi3",
            plain: format!("<s>{PHI3_TURNS}"),
            with_system: format!("<s>{PHI3_TURNS}"),
            responses: ["Hello.<|end|>", "4<|end|>"],
            dropped: "",
        },
        llama31("meta-llama-Llama-3.1-8B-Instruct.jinja"),
        // strftime_now is fixed at 26 Jul 2024, so 3.2's date line is 3.1's default one.
        llama31("meta-llama-Llama-3.2-3B-Instruct.jinja"),
        llama31("llama3_2.from-lenml-tokenizer_config.jinja"),
        Case {
            file: "llama3_1.from-lenml-tokenizer_config.jinja",
            tokenizer: "llama3_1",
            plain: format!("<|begin_of_text|>{LLAMA3_TURNS}"),
            with_system: format!("<|begin_of_text|>{LLAMA3_SYSTEM}{LLAMA3_TURNS}"),
            responses: ["Hello.<|eot_id|>", "4<|eot_id|>"],
            dropped: "",
        },
        // Llama-3's first template: the assistant header after every conversation.
        Case {
            file: "llama3.from-lenml-tokenizer_config.jinja",
            tokenizer: "llama3_1",
            plain: format!("<|begin_of_text|>{LLAMA3_TURNS}{LLAMA3_GEN}"),
            with_system: format!("<|begin_of_text|>{LLAMA3_SYSTEM}{LLAMA3_TURNS}{LLAMA3_GEN}"),
            responses: ["Hello.<|eot_id|>", "4<|eot_id|>"],
            dropped: LLAMA3_GEN,
        },
        // ChatML with SmolLM's default system prompt, without LF's final period.
        Case {
            file: "smollm2-135m-instruct.from-gguf.jinja",
            tokenizer: "smollm2",
            plain: format!(
                "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by \
                 Hugging Face<|im_end|>\n{CHATML_TURNS}"
            ),
            with_system: format!("<|im_start|>system\n{SYSTEM}<|im_end|>\n{CHATML_TURNS}"),
            responses: ["Hello.<|im_end|>\n", "4<|im_end|>\n"],
            dropped: "",
        },
    ]
}

fn with_template(tok_name: &str, file: &str) -> (Tok, ChatFormat) {
    let mut tok = tokenizer(tok_name);
    let path = chat_templates_dir().join(file);
    tok.chat_template =
        Some(std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())));
    let fmt = ChatFormat::new(Some("jinja"), &mut tok).unwrap_or_else(|e| panic!("{file}: {e}"));
    (tok, fmt)
}

fn render(tok: &Tok, fmt: &ChatFormat, conv: &Conversation) -> String {
    let ChatFormat::Jinja(j) = fmt else {
        unreachable!("built as jinja")
    };
    j.render(tok, conv, conv.messages.len(), false).unwrap()
}

fn ids(fmt: &ChatFormat, tok: &Tok, conv: &Conversation) -> Vec<i64> {
    let pairs = fmt.encode_pairs(tok, conv).unwrap();
    pairs
        .iter()
        .flat_map(|(p, r)| p.iter().chain(r))
        .map(|&x| x as i64)
        .collect()
}

#[test]
fn every_template_renders_its_known_format() {
    let cases = cases();
    let mut files: Vec<String> = std::fs::read_dir(chat_templates_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|f| f.ends_with(".jinja"))
        .collect();
    files.sort();
    for f in &files {
        assert!(
            cases.iter().any(|c| c.file == f),
            "tests/fixtures/chat_templates/{f} has no expected rendering in jinja_templates.rs"
        );
    }
    assert_eq!(
        files.len(),
        cases.len(),
        "a case names a template that is not there"
    );
    for c in &cases {
        let (tok, fmt) = with_template(c.tokenizer, c.file);
        for (system, want) in [("", &c.plain), (SYSTEM, &c.with_system)] {
            let conv = sample(system);
            let text = render(&tok, &fmt, &conv);
            assert_eq!(&text, want, "{} (system {system:?})", c.file);
            let pairs = fmt.encode_pairs(&tok, &conv).unwrap();
            let responses: Vec<String> = pairs.iter().map(|(_, r)| tok.decode(r, false)).collect();
            assert_eq!(responses, c.responses, "{}: trained text", c.file);
            let kept = text.strip_suffix(c.dropped).unwrap();
            let all: Vec<u32> = pairs
                .iter()
                .flat_map(|(p, r)| p.iter().chain(r))
                .copied()
                .collect();
            assert_eq!(all, tok.encode(kept, false).unwrap(), "{}: ids", c.file);
        }
    }
}

/// LF's conversations for a tokenizer's records, by (dataset, index), with the sft rows.
fn lf_records(tok_name: &str, template: &str) -> HashMap<(String, i64), Value> {
    let path = oracle_dir().join(format!("{template}__{tok_name}__sft.jsonl"));
    rows(&path).into_iter().map(|r| (key(&r), r)).collect()
}

fn reference(name: &str) -> Vec<Value> {
    rows(
        &oracle_dir()
            .join("hf_apply_chat_template")
            .join(format!("{name}.jsonl")),
    )
}

#[test]
fn templates_without_reference_follow_from_the_references() {
    let mut checked = 0;
    // Llama-3.2 adds nothing to 3.1 without tools, and its date is 3.1's default: transformers'
    // Llama-3.1 renderings are its renderings.
    let lf = lf_records("llama3_1", "llama3");
    let refs = reference("llama3_1__Llama-3.1-8B-Instruct");
    for file in [
        "meta-llama-Llama-3.2-3B-Instruct.jinja",
        "llama3_2.from-lenml-tokenizer_config.jinja",
    ] {
        let (tok, fmt) = with_template("llama3_1", file);
        for r in &refs {
            let conv = conversation(&lf[&key(r)]);
            assert_eq!(
                render(&tok, &fmt, &conv),
                r["text"].as_str().unwrap(),
                "{file} {:?}",
                key(r)
            );
            assert_eq!(
                ids(&fmt, &tok, &conv),
                ints(&r["input_ids"]),
                "{file} {:?}",
                key(r)
            );
            checked += 1;
        }
    }
    // Llama-3's first template is the lenml Llama-3.1 one plus the assistant header at the end,
    // which no example keeps.
    let (tok, fmt) = with_template("llama3_1", "llama3.from-lenml-tokenizer_config.jinja");
    for r in reference("llama3_1__tokenizer_config") {
        let conv = conversation(&lf[&key(&r)]);
        let want = format!("{}{LLAMA3_GEN}", r["text"].as_str().unwrap());
        assert_eq!(render(&tok, &fmt, &conv), want, "{:?}", key(&r));
        assert_eq!(
            ids(&fmt, &tok, &conv),
            ints(&r["input_ids"]),
            "{:?}",
            key(&r)
        );
        checked += 1;
    }
    // The early Phi-3-mini template writes BOS, drops the system turn and the final EOS, and
    // otherwise renders turns as Phi-3.5's does.
    let lf = lf_records("phi3", "phi");
    let (tok, fmt) = with_template(
        "phi3",
        "phi-3-mini-4k-instruct.from-ggml-vocab-phi-3.gguf.jinja",
    );
    for r in reference("phi3__Phi-3.5-mini-instruct") {
        let conv = conversation(&lf[&key(&r)]);
        let text = r["text"]
            .as_str()
            .unwrap()
            .strip_suffix("<|endoftext|>")
            .unwrap();
        let text = match text.strip_prefix("<|system|>\n") {
            Some(rest) => &rest[rest.find("<|end|>\n").unwrap() + "<|end|>\n".len()..],
            None => text,
        };
        assert_eq!(
            render(&tok, &fmt, &conv),
            format!("<s>{text}"),
            "{:?}",
            key(&r)
        );
        let mut want = ints(&r["input_ids"]);
        assert_eq!(want.pop(), Some(32000), "Phi-3.5 ends with <|endoftext|>");
        if want[0] == 32006 {
            // <|system|> … <|end|>, the newline swallowed by <|end|>'s rstrip.
            want.drain(..=want.iter().position(|&x| x == 32007).unwrap());
        }
        want.insert(0, 1);
        assert_eq!(ids(&fmt, &tok, &conv), want, "{:?}", key(&r));
        checked += 1;
    }
    // SmolLM2's GGUF template is LF's smollm2 but for the period after the default system prompt;
    // LF's text for a byte-level tokenizer is the rendering itself.
    let (tok, fmt) = with_template("smollm2", "smollm2-135m-instruct.from-gguf.jinja");
    let (mut own_system, mut default_system) = (0, 0);
    for r in lf_records("smollm2", "smollm2").values() {
        let conv = conversation(r);
        let lf_text = r["text"].as_str().unwrap();
        let text = render(&tok, &fmt, &conv);
        if conv.system.is_empty() {
            let want = lf_text.replacen(
                "trained by Hugging Face.<|im_end|>",
                "trained by Hugging Face<|im_end|>",
                1,
            );
            assert_ne!(want, lf_text);
            assert_eq!(text, want, "{:?}", key(r));
            default_system += 1;
        } else {
            assert_eq!(text, lf_text, "{:?}", key(r));
            assert_eq!(
                ids(&fmt, &tok, &conv),
                ints(&r["input_ids"]),
                "{:?}",
                key(r)
            );
            own_system += 1;
        }
        checked += 1;
    }
    assert!(
        own_system > 0 && default_system > 0,
        "{own_system} / {default_system}"
    );
    assert!(checked >= 4 * 30, "{checked} records");
}
