//! The tokenizer's own chat template, rendered with minijinja as transformers renders it
//! (trim_blocks, lstrip_blocks, `raise_exception`, `strftime_now`, python string methods) and
//! tokenized as one string, as `apply_chat_template(tokenize=True)` does.
//!
//! Jinja templates mark no turn boundaries, so they are found by rendering prefixes of the
//! conversation: a prompt ends where `messages[..=user]` with the generation prompt ends, and
//! a response ends where the whole rendering and `messages[..=assistant]` part ways (trailers a
//! template writes only at the very end, such as Phi-3.5's EOS, are not counted in), and at its
//! EOS when a special token follows (`end_responses_at_eos`).

use crate::template::{Conversation, Role, Turn};
use crate::tokenizer::Tok;
use crate::DataError;
use minijinja::{context, Environment, Error, ErrorKind, Value};

pub struct Jinja {
    env: Environment<'static>,
    /// Where the template came from, for error messages.
    pub origin: String,
}

fn raise_exception(msg: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, msg))
}

/// transformers passes the current local time; a fixed clock keeps encodings reproducible.
fn strftime_now(format: String) -> String {
    const FIXED: [(&str, &str); 6] = [
        ("%d", "26"),
        ("%b", "Jul"),
        ("%B", "July"),
        ("%Y", "2024"),
        ("%m", "07"),
        ("%y", "24"),
    ];
    FIXED.iter().fold(format, |s, (k, v)| s.replace(k, v))
}

impl Jinja {
    pub fn new(source: &str, origin: &str) -> Result<Jinja, DataError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| DataError::file(origin, format!("chat template does not parse: {e}")))?;
        Ok(Jinja {
            env,
            origin: origin.to_string(),
        })
    }

    fn messages(conv: &Conversation, upto: usize) -> Vec<Value> {
        let mut out = Vec::new();
        if !conv.system.is_empty() {
            out.push(context! { role => "system", content => conv.system.clone() });
        }
        for m in &conv.messages[..upto] {
            let role = match m.role {
                Role::User => "user",
                Role::Assistant => "assistant",
            };
            out.push(context! { role => role, content => m.content.clone() });
        }
        out
    }

    /// The text of the first `upto` messages (and the system prompt).
    pub fn render(
        &self,
        tok: &Tok,
        conv: &Conversation,
        upto: usize,
        add_generation_prompt: bool,
    ) -> Result<String, DataError> {
        let text = |s: &Option<crate::tokenizer::Special>| s.as_ref().map(|s| s.text.clone());
        let tmpl = self.env.get_template("chat").expect("added in new");
        tmpl.render(context! {
            messages => Self::messages(conv, upto),
            add_generation_prompt => add_generation_prompt,
            bos_token => text(&tok.bos),
            eos_token => text(&tok.eos),
            pad_token => text(&tok.pad),
            tools => Value::from(()),
            documents => Value::from(()),
        })
        .map_err(|e| DataError::file(&self.origin, format!("chat template failed: {e:#}")))
    }

    /// (prompt ids, response ids) per user/assistant exchange; their concatenation is exactly
    /// what `apply_chat_template(messages, tokenize=True)` gives, less a generation header a
    /// template writes after the last response's EOS (see `end_responses_at_eos`).
    pub fn encode_pairs(&self, tok: &Tok, conv: &Conversation) -> Result<Vec<Turn>, DataError> {
        let n = conv.messages.len();
        let full = self.render(tok, conv, n, false)?;
        let tokens = tok.encode_offsets(&full)?;
        let unstable = |what: &str| {
            DataError::file(
                &self.origin,
                format!("chat template renders {what} differently from the whole conversation, so turns cannot be told apart"),
            )
        };
        // Byte offsets where each prompt and each response ends.
        let mut cuts = Vec::new();
        for (i, m) in conv.messages.iter().enumerate() {
            let end = if i + 1 == n {
                full.len()
            } else if m.role == Role::User {
                let head = self.render(tok, conv, i + 1, true)?;
                if !full.starts_with(&head) {
                    return Err(unstable("a prompt"));
                }
                head.len()
            } else {
                let head = self.render(tok, conv, i + 1, false)?;
                let common = full
                    .bytes()
                    .zip(head.bytes())
                    .take_while(|(a, b)| a == b)
                    .count();
                // Back off to a token edge: a shared "<|" must not pull half a special token in.
                tokens
                    .iter()
                    .map(|&(_, _, e)| e)
                    .filter(|&e| e <= common)
                    .max()
                    .unwrap_or(0)
            };
            if cuts.last().is_some_and(|&c| end < c) {
                return Err(unstable("a turn"));
            }
            cuts.push(end);
        }
        let mut segments: Vec<Vec<u32>> = vec![Vec::new(); n];
        let mut seg = 0;
        for &(id, start, _) in &tokens {
            while seg + 1 < n && start >= cuts[seg] {
                seg += 1;
            }
            segments[seg].push(id);
        }
        end_responses_at_eos(tok, &mut segments);
        Ok(segments
            .chunks(2)
            .map(|c| (c[0].clone(), c.get(1).cloned().unwrap_or_default()))
            .collect())
    }
}

/// Llama-3's first template writes the assistant header after every conversation, with or
/// without `add_generation_prompt`, and that header opens with the same `<|start_header_id|>`
/// as the next user turn, so prefix comparison alone would train each response on the next
/// turn's first token and the last response on a whole unused header. A response therefore
/// ends at its EOS when a special token follows: that token opens a turn. The rest goes to the
/// next prompt (masked), or is dropped after the last response. Text after EOS that is not a
/// special token, such as ChatML's newline after `<|im_end|>`, stays trained, as in LF.
fn end_responses_at_eos(tok: &Tok, segments: &mut [Vec<u32>]) {
    let Some(eos) = tok.eos.as_ref().map(|e| e.id) else {
        return;
    };
    let mut added = None;
    for s in (1..segments.len()).step_by(2) {
        let Some(p) = segments[s].iter().position(|&id| id == eos) else {
            continue;
        };
        let Some(&next) = segments[s].get(p + 1) else {
            continue;
        };
        let added = added.get_or_insert_with(|| tok.inner.get_added_tokens_decoder());
        if !added.get(&next).is_some_and(|t| t.special) {
            continue;
        }
        let tail = segments[s].split_off(p + 1);
        if let Some(prompt) = segments.get_mut(s + 1) {
            prompt.splice(0..0, tail);
        }
    }
}
