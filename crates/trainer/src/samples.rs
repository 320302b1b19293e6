//! Sample answers during training (`generate_every` N steps): a few fixed prompts generated
//! greedily (or as do_sample says) with dropout off, appended to `samples.jsonl` as
//! `{"step", "prompt", "output"}`, so a run's progress can be read, not just its loss.

use crate::args::TrainArgs;
use crate::data::Examples;
use crate::error::TrainError;
use crate::generation::{answer, gen_config, split_prompt, stop_ids};
use burn::module::Module;
use phi_data::template::{Conversation, Message, Role};
use phi_model::generate::GenerateConfig;
use phi_model::CausalLm;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

pub const FILE: &str = "samples.jsonl";

pub struct Sampler {
    every: usize,
    /// (what `prompt` shows, the ids generated from).
    prompts: Vec<(Value, Vec<u32>)>,
    cfg: GenerateConfig,
    path: PathBuf,
}

impl Sampler {
    /// None unless `generate_every` > 0. `sample_prompts` are user turns rendered with the
    /// template; without them the prompts of the first 3 validation (else training) examples.
    /// A resumed run keeps the lines of steps up to `start`; a new run starts the file anew.
    pub fn new(
        a: &TrainArgs,
        ex: &Examples,
        eos: &[u32],
        vocab: usize,
        bos_scale: Option<f64>,
        out: &Path,
        start: usize,
    ) -> Result<Option<Sampler>, TrainError> {
        if a.generate_every == 0 {
            return Ok(None);
        }
        let chat = ex.tok.as_ref().map(|(t, f)| (t, f));
        let mut prompts = Vec::new();
        if !a.sample_prompts.is_empty() {
            let Some((tok, fmt)) = chat else {
                return Err(TrainError::arg(
                    "sample_prompts",
                    a.sample_prompts.join(" | "),
                    "a tokenizer (--tokenizer or tokenizer.json beside the model) to encode them",
                ));
            };
            for p in &a.sample_prompts {
                let conv = Conversation {
                    system: String::new(),
                    messages: vec![Message {
                        role: Role::User,
                        content: p.clone(),
                    }],
                };
                prompts.push((json!(p), fmt.encode_prompt(tok, &conv)?));
            }
        } else {
            let source = if ex.val.is_empty() {
                &ex.train
            } else {
                &ex.val
            };
            for e in source.iter().take(3) {
                let (ids, _) = split_prompt(e);
                let shown = match chat {
                    Some((t, _)) => json!(t.decode(&ids, false)),
                    None => json!(ids),
                };
                prompts.push((shown, ids));
            }
        }
        if let Some(bad) = prompts
            .iter()
            .flat_map(|p| &p.1)
            .find(|&&i| i as usize >= vocab)
        {
            return Err(TrainError::arg(
                "sample_prompts",
                a.sample_prompts.join(" | "),
                format!("token ids inside the model's vocabulary (0..{vocab}); the tokenizer gave {bad}"),
            ));
        }
        let path = out.join(FILE);
        let kept: String = if start == 0 {
            String::new()
        } else {
            std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter(|l| {
                    serde_json::from_str::<Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s as usize <= start)
                })
                .map(|l| format!("{l}\n"))
                .collect()
        };
        phi_model::io::write_atomic(&path, kept.as_bytes())?;
        Ok(Some(Sampler {
            every: a.generate_every,
            prompts,
            cfg: gen_config(a, a.sample_max_new_tokens, stop_ids(eos, chat), bos_scale),
            path,
        }))
    }

    /// Generates and appends this step's samples when `step` is a multiple of N.
    pub fn maybe_run(
        &self,
        model: &CausalLm,
        step: usize,
        ex: &Examples,
    ) -> Result<(), TrainError> {
        if !step.is_multiple_of(self.every) {
            return Ok(());
        }
        let m = model.valid();
        let mut text = std::fs::read_to_string(&self.path).unwrap_or_default();
        for (shown, ids) in &self.prompts {
            let new = answer(&m, ids, &self.cfg);
            let output = match &ex.tok {
                Some((t, _)) => json!(t.decode(&new, true)),
                None => json!(new),
            };
            let row = json!({"step": step, "prompt": shown, "output": output});
            text.push_str(&format!("{row}\n"));
        }
        phi_model::io::write_atomic(&self.path, text.as_bytes())?;
        Ok(())
    }
}
