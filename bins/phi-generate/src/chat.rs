//! `--chat` (a conversation read from stdin, one user turn per line, history kept) and
//! `--compare-base` (the base's and the adapter's answers, one after the other, labelled).
//! Each model keeps its own history, so a compared conversation is two conversations.

use crate::Args;
use anyhow::{bail, Context, Result};
use phi_data::{ChatFormat, Conversation, Message, Role, Tok};
use phi_model::generate::{generate, GenerateConfig};
use phi_model::CausalLm;
use std::io::{BufRead, Write};

struct Session {
    label: String,
    model: CausalLm,
    conv: Conversation,
    /// The adapter's BOS scaling; the base of --compare-base runs without it.
    bos_scale: Option<f64>,
}

impl Session {
    /// The answer to `user` given this session's history; both are added to the history.
    fn turn(&mut self, user: &str, chat: &Chat) -> Result<String> {
        self.conv.messages.push(Message {
            role: Role::User,
            content: user.to_string(),
        });
        let ids: Vec<i64> = match &chat.fmt {
            Some(f) => f.encode_prompt(&chat.tok, &self.conv)?,
            None => chat.tok.encode(user, true)?,
        }
        .into_iter()
        .map(i64::from)
        .collect();
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= chat.vocab) {
            bail!(
                "prompt: token id {bad} is outside the vocabulary (0..{}); is --tokenizer the model's?",
                chat.vocab
            );
        }
        let cfg = GenerateConfig {
            bos_scale: self.bos_scale,
            ..chat.cfg.clone()
        };
        let mut out: Vec<u32> = generate(&self.model, &ids, &cfg, |_| {})
            .into_iter()
            .map(|x| x as u32)
            .collect();
        if out
            .last()
            .is_some_and(|l| chat.cfg.eos_token_ids.contains(l))
        {
            out.pop();
        }
        let text = chat.tok.decode(&out, true);
        self.conv.messages.push(Message {
            role: Role::Assistant,
            content: text.clone(),
        });
        Ok(text)
    }
}

struct Chat {
    tok: Tok,
    /// None: --prompt used as written (compare mode without --template).
    fmt: Option<ChatFormat>,
    cfg: GenerateConfig,
    vocab: usize,
}

pub fn run(a: &Args, device: &burn::tensor::Device, mut cfg: GenerateConfig) -> Result<()> {
    let base = phi_model::load(&a.model, device)?;
    let tok_path = a
        .tokenizer
        .clone()
        .or_else(|| phi_data::tokenizer::find(base.files_dir().as_deref()))
        .context("--tokenizer: no tokenizer.json beside the model; pass --tokenizer")?;
    let mut tok = Tok::load(&tok_path)?;
    // A chat always has a template: the named one, else the tokenizer's own (or LF's empty).
    let fmt = if a.chat || a.template.is_some() {
        Some(ChatFormat::new(a.template.as_deref(), &mut tok)?)
    } else {
        None
    };
    cfg.eos_token_ids.extend(base.eos_token_ids());
    if let Some(f) = &fmt {
        cfg.eos_token_ids.extend(f.stop_ids(&tok));
    }
    cfg.eos_token_ids.sort_unstable();
    cfg.eos_token_ids.dedup();
    let vocab = base.config.vocab_size;
    let conv = || Conversation {
        system: a.system.clone().unwrap_or_default(),
        messages: vec![],
    };
    let mut sessions = Vec::new();
    if a.compare_base {
        let Some(adapter) = &a.adapter else {
            bail!("--compare-base: needs --adapter (it compares the base's answers with the adapter's)");
        };
        let second = phi_model::load(&a.model, device)?.model;
        let (tuned, _, _) = phi_adapters::peft::load(second, adapter)?;
        sessions.push(Session {
            label: "base".into(),
            model: base.model,
            conv: conv(),
            bos_scale: None,
        });
        sessions.push(Session {
            label: format!("adapter {}", adapter.display()),
            model: tuned,
            conv: conv(),
            bos_scale: cfg.bos_scale,
        });
    } else {
        let model = match &a.adapter {
            Some(d) => phi_adapters::peft::load(base.model, d)?.0,
            None => base.model,
        };
        sessions.push(Session {
            label: String::new(),
            model,
            conv: conv(),
            bos_scale: cfg.bos_scale,
        });
    }
    let chat = Chat {
        tok,
        fmt,
        cfg,
        vocab,
    };
    let mut stdout = std::io::stdout();
    let mut answer_all = |user: &str, sessions: &mut Vec<Session>| -> Result<()> {
        let labelled = sessions.len() > 1;
        for s in sessions.iter_mut() {
            let text = s.turn(user, &chat)?;
            if labelled {
                writeln!(stdout, "=== {} ===", s.label)?;
            }
            writeln!(stdout, "{text}")?;
        }
        stdout.flush()?;
        Ok(())
    };
    if !a.chat {
        let prompt = a
            .prompt
            .as_deref()
            .context("--compare-base: needs --prompt, or --chat")?;
        return answer_all(prompt, &mut sessions);
    }
    eprintln!("[phi-generate] chat: one user turn per line; \"exit\" or end of input quits");
    for line in std::io::stdin().lock().lines() {
        let line = line.context("stdin")?;
        let user = line.trim();
        if user == "exit" {
            break;
        }
        if user.is_empty() {
            continue;
        }
        answer_all(user, &mut sessions)?;
    }
    Ok(())
}
