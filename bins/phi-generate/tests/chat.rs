//! `--chat` reads user turns from stdin and keeps the history; `--compare-base` prints the
//! base's and the adapter's answers, labelled. Run on an oracle case with a word-level
//! tokenizer made here whose 320 words are the case's ids, so every id stays in range.

use phi_data::{ChatFormat, Conversation, Message, Role, Tok};
use phi_model::generate::{generate, GenerateConfig};
use phi_testkit::oracle::{cases, Case};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

const NEW: usize = 5;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("phi-generate-chat-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A WordLevel tokenizer: `<unk>` 0, `<s>` 1, `</s>` 2, then `w3` … `w{vocab-1}`.
fn word_tokenizer(dir: &Path, vocab: usize) -> PathBuf {
    let mut words = serde_json::Map::new();
    for (i, w) in ["<unk>", "<s>", "</s>"].iter().enumerate() {
        words.insert(w.to_string(), i.into());
    }
    for i in 3..vocab {
        words.insert(format!("w{i}"), i.into());
    }
    let special = |id: usize, content: &str| {
        serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
            "rstrip": false, "normalized": false, "special": true})
    };
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [special(0, "<unk>"), special(1, "<s>"), special(2, "</s>")],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>"}"#,
    )
    .unwrap();
    dir.join("tokenizer.json")
}

fn phi_generate(args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_phi-generate"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

fn case() -> Case {
    let dir = cases()
        .into_iter()
        .find(|d| d.join("lora").exists())
        .expect("an oracle case with lora/");
    Case::open(&dir)
}

/// What the conversation's next answer should be, computed with the library directly.
fn expected(
    case: &Case,
    tok_path: &Path,
    adapter: bool,
    turns: &[(&str, &str)],
    user: &str,
) -> String {
    let device = phi_model::cpu_device();
    let loaded = phi_model::load(&case.dir.display().to_string(), &device).unwrap();
    let mut stops = loaded.eos_token_ids();
    let model = if adapter {
        phi_adapters::peft::load(loaded.model, &case.dir.join("lora"))
            .unwrap()
            .0
    } else {
        loaded.model
    };
    let mut tok = Tok::load(tok_path).unwrap();
    let fmt = ChatFormat::new(Some("default"), &mut tok).unwrap();
    stops.extend(fmt.stop_ids(&tok));
    let mut conv = Conversation {
        system: String::new(),
        messages: vec![],
    };
    for (u, a) in turns {
        conv.messages.push(Message {
            role: Role::User,
            content: u.to_string(),
        });
        conv.messages.push(Message {
            role: Role::Assistant,
            content: a.to_string(),
        });
    }
    conv.messages.push(Message {
        role: Role::User,
        content: user.to_string(),
    });
    let ids: Vec<i64> = fmt
        .encode_prompt(&tok, &conv)
        .unwrap()
        .into_iter()
        .map(i64::from)
        .collect();
    let cfg = GenerateConfig {
        max_new_tokens: NEW,
        sampling: None,
        eos_token_ids: stops,
        use_cache: true,
        bos_scale: None,
    };
    let mut out: Vec<u32> = generate(&model, &ids, &cfg, |_| {})
        .into_iter()
        .map(|x| x as u32)
        .collect();
    if out.last().is_some_and(|l| cfg.eos_token_ids.contains(l)) {
        out.pop();
    }
    tok.decode(&out, true)
}

#[test]
fn chat_keeps_history_and_stops_at_exit() {
    let case = case();
    let dir = tmp("chat");
    let tok = word_tokenizer(&dir, 320);
    let (m, t) = (case.dir.display().to_string(), tok.display().to_string());
    let n = NEW.to_string();
    let args = [
        "--model",
        &m,
        "--tokenizer",
        &t,
        "--chat",
        "--template",
        "default",
        "--max-new-tokens",
        &n,
    ];
    let (ok, out, err) = phi_generate(&args, "w5 w6\n\nw7\nexit\nw9\n");
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let first = expected(&case, &tok, false, &[], "w5 w6");
    assert_eq!(lines[0], first);
    let second = expected(&case, &tok, false, &[("w5 w6", &first)], "w7");
    assert_eq!(lines[1], second);
    // End of input ends the chat too.
    let (ok, out, _) = phi_generate(&args, "w5 w6");
    assert!(ok);
    assert_eq!(out.lines().collect::<Vec<_>>(), [first.as_str()]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn compare_base_prints_both_answers_labelled() {
    let case = case();
    let dir = tmp("compare");
    let tok = word_tokenizer(&dir, 320);
    let (m, t) = (case.dir.display().to_string(), tok.display().to_string());
    let lora = case.dir.join("lora").display().to_string();
    let n = NEW.to_string();
    let base = [
        "--model",
        &m,
        "--tokenizer",
        &t,
        "--template",
        "default",
        "--max-new-tokens",
        &n,
    ];
    let args = [
        &base[..],
        &["--adapter", &lora, "--compare-base", "--prompt", "w5 w6"],
    ]
    .concat();
    let (ok, out, err) = phi_generate(&args, "");
    assert!(ok, "{err}");
    let want = format!(
        "=== base ===\n{}\n=== adapter {lora} ===\n{}\n",
        expected(&case, &tok, false, &[], "w5 w6"),
        expected(&case, &tok, true, &[], "w5 w6")
    );
    assert_eq!(out, want);
    // In a chat, every turn is answered by both.
    let args = [&base[..], &["--adapter", &lora, "--compare-base", "--chat"]].concat();
    let (ok, out, err) = phi_generate(&args, "w5 w6\nw8\n");
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("=== ")).count(),
        4,
        "{out}"
    );
    // Without --adapter it is a one-line error.
    let (ok, _, err) = phi_generate(
        &[&base[..], &["--compare-base", "--prompt", "w5"]].concat(),
        "",
    );
    assert!(
        !ok && err.lines().count() == 1 && err.contains("adapter"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
