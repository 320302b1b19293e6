//! Chat templates as LLaMA-Factory defines them (data/template.py): slot lists per role, where
//! each text slot is tokenized on its own without the tokenizer's special tokens, and BOS / EOS
//! slots add the id directly. Names are LF's, so an LF config selects the same rendering.

use crate::tokenizer::{Special, Tok};
use crate::DataError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    User,
    Assistant,
}

/// The (prompt ids, response ids) of one user/assistant exchange.
pub type Turn = (Vec<u32>, Vec<u32>);

#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

/// A conversation that alternates user / assistant, starting with the user.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Conversation {
    /// Empty means the template's default system prompt.
    pub system: String,
    pub messages: Vec<Message>,
}

impl Conversation {
    pub fn single(system: &str, prompt: &str, response: &str) -> Self {
        Conversation {
            system: system.to_string(),
            messages: vec![
                Message {
                    role: Role::User,
                    content: prompt.to_string(),
                },
                Message {
                    role: Role::Assistant,
                    content: response.to_string(),
                },
            ],
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Slot {
    /// Text with an optional `{{content}}` placeholder.
    Text(String),
    Bos,
    Eos,
}

fn t(s: &str) -> Slot {
    Slot::Text(s.to_string())
}

#[derive(Debug, Clone)]
pub struct Template {
    pub name: String,
    pub prefix: Vec<Slot>,
    pub system: Vec<Slot>,
    pub user: Vec<Slot>,
    pub assistant: Vec<Slot>,
    pub default_system: String,
    /// The first becomes EOS when `replace_eos` (LF's fix_special_tokens).
    pub stop_words: Vec<String>,
    pub replace_eos: bool,
    /// Llama-2 style: the system text goes inside the first user slot.
    pub fuse_system: bool,
}

/// Templates by LF name, plus `phi2` (Phi-2's "Instruct:/Output:" QA format, which LF lacks).
pub const NAMES: &[&str] = &[
    "alpaca",
    "chatml",
    "default",
    "empty",
    "gemma",
    "llama2",
    "llama3",
    "mistral",
    "phi",
    "phi2",
    "phi_small",
    "qwen",
    "smollm",
    "smollm2",
    "vicuna",
    "zephyr",
];

const CHATML_USER: &str = "<|im_start|>user\n{{content}}<|im_end|>\n<|im_start|>assistant\n";
const CHATML_ASSISTANT: &str = "{{content}}<|im_end|>\n";
const CHATML_SYSTEM: &str = "<|im_start|>system\n{{content}}<|im_end|>\n";

impl Template {
    fn base(name: &str) -> Template {
        Template {
            name: name.to_string(),
            prefix: vec![],
            system: vec![t("{{content}}")],
            user: vec![t("{{content}}")],
            assistant: vec![t("{{content}}"), Slot::Eos],
            default_system: String::new(),
            stop_words: vec![],
            replace_eos: false,
            fuse_system: false,
        }
    }

    fn chatml(name: &str, default_system: &str, stop: &[&str], replace_eos: bool) -> Template {
        Template {
            system: vec![t(CHATML_SYSTEM)],
            user: vec![t(CHATML_USER)],
            assistant: vec![t(CHATML_ASSISTANT)],
            default_system: default_system.to_string(),
            stop_words: stop.iter().map(|s| s.to_string()).collect(),
            replace_eos,
            ..Template::base(name)
        }
    }

    pub fn named(name: &str) -> Result<Template, String> {
        let b = Template::base(name);
        let tpl = match name {
            "alpaca" => Template {
                user: vec![t("### Instruction:\n{{content}}\n\n### Response:\n")],
                assistant: vec![t("{{content}}"), Slot::Eos, t("\n\n")],
                default_system: "Below is an instruction that describes a task. Write a response \
                                 that appropriately completes the request.\n\n"
                    .into(),
                ..b
            },
            "chatml" => Template::chatml(name, "", &["<|im_end|>", "<|im_start|>"], true),
            "qwen" => Template::chatml(
                name,
                "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
                &["<|im_end|>"],
                true,
            ),
            "smollm" => Template::chatml(name, "", &["<|im_end|>"], false),
            "smollm2" => Template::chatml(
                name,
                "You are a helpful AI assistant named SmolLM, trained by Hugging Face.",
                &["<|im_end|>"],
                false,
            ),
            "default" => Template {
                user: vec![t("Human: {{content}}"), Slot::Eos, t("\nAssistant:")],
                assistant: vec![t("{{content}}"), Slot::Eos, t("\n")],
                system: vec![t("System: {{content}}"), Slot::Eos, t("\n")],
                ..b
            },
            "empty" => Template {
                assistant: vec![t("{{content}}")],
                ..b
            },
            "gemma" => Template {
                user: vec![t(
                    "<start_of_turn>user\n{{content}}<end_of_turn>\n<start_of_turn>model\n",
                )],
                assistant: vec![t("{{content}}<end_of_turn>\n")],
                system: vec![t("{{content}}\n\n")],
                prefix: vec![Slot::Bos],
                stop_words: vec!["<end_of_turn>".into()],
                replace_eos: true,
                fuse_system: true,
                ..b
            },
            "llama2" => Template {
                user: vec![Slot::Bos, t("[INST] {{content}} [/INST]")],
                system: vec![t("<<SYS>>\n{{content}}\n<</SYS>>\n\n")],
                fuse_system: true,
                ..b
            },
            "llama3" => Template {
                user: vec![t(
                    "<|start_header_id|>user<|end_header_id|>\n\n{{content}}<|eot_id|>\
                               <|start_header_id|>assistant<|end_header_id|>\n\n",
                )],
                assistant: vec![t("{{content}}<|eot_id|>")],
                system: vec![t(
                    "<|start_header_id|>system<|end_header_id|>\n\n{{content}}<|eot_id|>",
                )],
                prefix: vec![Slot::Bos],
                stop_words: vec!["<|eot_id|>".into(), "<|eom_id|>".into()],
                replace_eos: true,
                ..b
            },
            "mistral" => Template {
                user: vec![t("[INST] {{content}}[/INST]")],
                assistant: vec![t(" {{content}}"), Slot::Eos],
                system: vec![t("{{content}}\n\n")],
                prefix: vec![Slot::Bos],
                fuse_system: true,
                ..b
            },
            "phi" | "phi_small" => Template {
                user: vec![t("<|user|>\n{{content}}<|end|>\n<|assistant|>\n")],
                assistant: vec![t("{{content}}<|end|>\n")],
                system: vec![t("<|system|>\n{{content}}<|end|>\n")],
                stop_words: vec!["<|end|>".into()],
                replace_eos: true,
                // phi_small's prefix is a set naming neither bos nor eos: LF emits nothing.
                ..b
            },
            "phi2" => Template {
                user: vec![t("Instruct: {{content}}\nOutput:")],
                assistant: vec![t(" {{content}}"), Slot::Eos, t("\n")],
                system: vec![t("{{content}}\n")],
                ..b
            },
            "vicuna" => Template {
                user: vec![t("USER: {{content}} ASSISTANT:")],
                default_system: "A chat between a curious user and an artificial intelligence \
                                 assistant. The assistant gives helpful, detailed, and polite \
                                 answers to the user's questions."
                    .into(),
                ..b
            },
            "zephyr" => Template {
                user: vec![t("<|user|>\n{{content}}"), Slot::Eos, t("<|assistant|>\n")],
                system: vec![t("<|system|>\n{{content}}"), Slot::Eos],
                default_system: "You are Zephyr, a helpful assistant.".into(),
                ..b
            },
            _ => {
                return Err(format!(
                    "unknown template {name:?} (known: {}, jinja)",
                    NAMES.join(", ")
                ))
            }
        };
        Ok(tpl)
    }

    /// LF's fix_special_tokens: the first stop word becomes EOS when `replace_eos`, a missing
    /// EOS becomes `<|endoftext|>`, a missing PAD becomes EOS. Unlike LF, tokens keep their
    /// flags (LF re-registers Phi-3's `<|end|>` without rstrip; see docs/data.md).
    pub fn fix_tokenizer(&self, tok: &mut Tok) -> Result<(), DataError> {
        let who = format!("template {}", self.name);
        if self.replace_eos {
            if let Some(first) = self.stop_words.first() {
                tok.eos = Some(tok.special(first, &who)?);
            }
        }
        if tok.eos.is_none() {
            tok.eos = Some(tok.special("<|endoftext|>", &format!("{who} (no eos_token)"))?);
        }
        if tok.pad.is_none() {
            tok.pad = tok.eos.clone();
        }
        Ok(())
    }

    /// Ids that end generation: EOS and every stop word the tokenizer knows.
    pub fn stop_ids(&self, tok: &Tok) -> Vec<u32> {
        let mut ids: Vec<u32> = tok.eos.iter().map(|s| s.id).collect();
        for w in &self.stop_words {
            if let Some(id) = tok.token_id(w) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    fn render(
        &self,
        tok: &Tok,
        slots: &[Slot],
        content: &str,
        out: &mut Vec<u32>,
    ) -> Result<(), DataError> {
        let need = |s: &Option<Special>, what: &str| {
            s.as_ref().map(|s| s.id).ok_or_else(|| {
                DataError::file(
                    tok.path.display(),
                    format!(
                        "template {} needs a {what} token; the tokenizer has none",
                        self.name
                    ),
                )
            })
        };
        for slot in slots {
            match slot {
                Slot::Text(s) => {
                    let text = s.replacen("{{content}}", content, 1);
                    if !text.is_empty() {
                        out.extend(tok.encode(&text, false)?);
                    }
                }
                Slot::Bos => out.push(need(&tok.bos, "BOS")?),
                Slot::Eos => out.push(need(&tok.eos, "EOS")?),
            }
        }
        Ok(())
    }

    /// Token ids per message, as LF's `Template._encode`: turn 0 carries the prefix and the
    /// system slot (data system, else the default, only when non-empty).
    pub fn encode_messages(
        &self,
        tok: &Tok,
        conv: &Conversation,
    ) -> Result<Vec<Vec<u32>>, DataError> {
        let system = if conv.system.is_empty() {
            &self.default_system
        } else {
            &conv.system
        };
        let mut out = Vec::with_capacity(conv.messages.len());
        for (i, m) in conv.messages.iter().enumerate() {
            let mut ids = Vec::new();
            let mut fused = String::new();
            if i == 0 {
                self.render(tok, &self.prefix, "", &mut ids)?;
                if !system.is_empty() {
                    if self.fuse_system {
                        // LF takes the system slot's first element as the text to fuse.
                        if let Some(Slot::Text(s)) = self.system.first() {
                            fused = s.replacen("{{content}}", system, 1);
                        }
                    } else {
                        self.render(tok, &self.system, system, &mut ids)?;
                    }
                }
            }
            match m.role {
                Role::User => {
                    self.render(tok, &self.user, &format!("{fused}{}", m.content), &mut ids)?
                }
                Role::Assistant => self.render(tok, &self.assistant, &m.content, &mut ids)?,
            }
            out.push(ids);
        }
        Ok(out)
    }
}
