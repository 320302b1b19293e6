//! phi-generate: continue a prompt with a checkpoint (greedy or sampled), streaming text.

mod chat;
mod ids;

use anyhow::{bail, Context, Result};
use clap::Parser;
use phi_data::{ChatFormat, Conversation, Message, Role, Tok};
use phi_model::generate::{generate, new_token_budget, GenerateConfig, Sampling};
use phi_regularizers::BosScale;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(about = "Generate text from a model folder, hub id or .gguf file")]
pub struct Args {
    #[arg(long)]
    model: String,
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Prompt text, used as written (special tokens included).
    #[arg(long, group = "input")]
    prompt: Option<String>,
    /// Wrap --prompt as one user turn in this chat template (LF name, or `jinja` for the
    /// tokenizer's own); without it the prompt is used as written.
    #[arg(long)]
    template: Option<String>,
    /// System prompt for --template (default: the template's own).
    #[arg(long, requires = "template")]
    system: Option<String>,
    /// safetensors file with prompt ids [B,T] (int64) under --key; padding is dropped using
    /// --mask-key, or `attention_mask` beside `input_ids` (`x.attention_mask` beside
    /// `x.input_ids`) when the file has one.
    #[arg(long, group = "input")]
    prompt_ids: Option<PathBuf>,
    #[arg(long, default_value = "input_ids")]
    key: String,
    /// Mask tensor [B,T] in the --prompt-ids file, 1 for real tokens.
    #[arg(long, requires = "prompt_ids")]
    mask_key: Option<String>,
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Greedy decoding (the default unless --temperature is given).
    #[arg(long, conflicts_with = "temperature")]
    greedy: bool,
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Print one line of new token ids per sequence instead of text.
    #[arg(long)]
    ids: bool,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Interactive: user turns from stdin, one per line, rendered with --template (or the
    /// tokenizer's own) with the conversation so far; "exit" or end of input quits.
    #[arg(long, conflicts_with_all = ["prompt_ids", "prompt", "ids"])]
    chat: bool,
    /// With --adapter: print the base model's answer and the adapter's, labelled.
    #[arg(long, conflicts_with_all = ["prompt_ids", "ids"])]
    compare_base: bool,
    /// BOS scaling of the position-0 embedding: `auto` applies the adapter folder's
    /// bos_zero_config.json (written by BOS-scaling training) when it has one, `off` never
    /// scales, a number is the factor.
    #[arg(long, default_value = "auto")]
    bos_scaling: String,
}

fn main() {
    phi_model::alloc::tune();
    phi_cli::exit_on_error(phi_model::on_pool(|| run(phi_cli::parse())));
}

fn run(a: Args) -> Result<()> {
    let device = phi_model::device_from_name(&a.device)?;
    // Read before the (slow) load, so a bad file fails at once.
    let file_prompts = match &a.prompt_ids {
        Some(p) => Some(ids::prompt_rows(p, &a.key, a.mask_key.as_deref())?),
        None => None,
    };
    let sampling = a.temperature.map(|temperature| Sampling {
        temperature,
        top_p: a.top_p,
        seed: a.seed,
    });
    let (bos, note) = BosScale::from_flag(&a.bos_scaling, a.adapter.as_deref())?;
    if let Some(n) = note {
        eprintln!("[phi-generate] {n}");
    }
    let bos_scale = bos.map(|b| b.factor);
    if a.chat || a.compare_base {
        let cfg = GenerateConfig {
            max_new_tokens: a.max_new_tokens,
            sampling,
            eos_token_ids: vec![],
            use_cache: true,
            bos_scale,
        };
        return chat::run(&a, &device, cfg);
    }
    let t0 = Instant::now();
    let base = phi_model::load(&a.model, &device)?;
    if let Some(line) = base.model.quant_summary().line() {
        eprintln!("[phi-generate] {line}");
    }
    let loaded = phi_adapters::peft::with_adapter(base, a.adapter.as_deref())?;
    let load_s = t0.elapsed().as_secs_f64();
    let mut tok = match a
        .tokenizer
        .clone()
        .or_else(|| phi_data::tokenizer::find(loaded.files_dir().as_deref()))
    {
        Some(p) => Some(Tok::load(&p)?),
        None => None,
    };
    let mut stop_ids = loaded.eos_token_ids();
    let prompts: Vec<Vec<i64>> = if let Some(text) = &a.prompt {
        let tk = tok
            .as_mut()
            .context("--tokenizer: no tokenizer.json beside the model; pass --tokenizer")?;
        let ids = match &a.template {
            // The prompt is one user turn in the template; the answer stops at its stop words.
            Some(t) => {
                let fmt = ChatFormat::new(Some(t), tk)?;
                let conv = Conversation {
                    system: a.system.clone().unwrap_or_default(),
                    messages: vec![Message {
                        role: Role::User,
                        content: text.clone(),
                    }],
                };
                for id in fmt.stop_ids(tk) {
                    if !stop_ids.contains(&id) {
                        stop_ids.push(id);
                    }
                }
                fmt.encode_prompt(tk, &conv)?
            }
            None => tk.encode(text, true)?,
        };
        vec![ids.into_iter().map(i64::from).collect()]
    } else if let Some(rows) = file_prompts {
        rows
    } else {
        bail!("one of --prompt or --prompt-ids is required");
    };
    let what = match &a.prompt_ids {
        Some(p) => format!("{}: tensor {}", p.display(), a.key),
        None => "prompt".into(),
    };
    for p in &prompts {
        loaded.check_ids(&what, p)?;
    }
    let cfg = GenerateConfig {
        max_new_tokens: a.max_new_tokens,
        sampling,
        eos_token_ids: stop_ids,
        use_cache: true,
        bos_scale,
    };
    let mut stdout = std::io::stdout();
    let limit = loaded.model.max_positions;
    for prompt in &prompts {
        let budget = new_token_budget(&loaded.model, prompt.len(), cfg.max_new_tokens);
        if budget < cfg.max_new_tokens {
            if budget == 0 {
                bail!(
                    "{what}: the prompt has {} tokens; the model's max_position_embeddings ({limit}) leaves no room for a new one",
                    prompt.len()
                );
            }
            eprintln!(
                "[phi-generate] the model's max_position_embeddings is {limit}: at most {budget} new tokens after this {}-token prompt (asked {})",
                prompt.len(),
                cfg.max_new_tokens
            );
        }
        let t1 = Instant::now();
        let mut shown = String::new();
        let mut new_ids: Vec<u32> = Vec::new();
        let mut first = true;
        let out = generate(&loaded.model, prompt, &cfg, |id| {
            // Ids stream as they are chosen, like text does.
            if a.ids || tok.is_none() {
                let _ = write!(stdout, "{}{id}", if first { "" } else { " " });
                let _ = stdout.flush();
                first = false;
                return;
            }
            if let Some(tk) = &tok {
                new_ids.push(id as u32);
                let text = tk.decode(&new_ids, true);
                // Print only the settled suffix; a partial UTF-8 sequence decodes to U+FFFD.
                if text.len() > shown.len()
                    && text.starts_with(&shown)
                    && !text.ends_with('\u{FFFD}')
                {
                    let _ = write!(stdout, "{}", &text[shown.len()..]);
                    let _ = stdout.flush();
                    shown = text;
                }
            }
        });
        println!();
        let s = t1.elapsed().as_secs_f64();
        eprintln!(
            "[phi-generate] load {load_s:.2}s; prompt {} tokens; {} new tokens in {s:.2}s ({:.1} tokens/s)",
            prompt.len(),
            out.len(),
            out.len() as f64 / s.max(1e-9)
        );
    }
    Ok(())
}
