//! phi-train: LLaMA-Factory-style fine-tuning. Flags carry LF's names (`--dataset_dir`,
//! `--cutoff_len`, ...). Today it runs the data pipeline's preview (`--preview_data N`), which
//! needs no model; training lands with the trainer.

use anyhow::{bail, Context, Result};
use clap::Parser;
use phi_data::encode::{ChatFormat, EncodeOptions};
use phi_data::load::{prepare, LoadOptions};
use phi_data::{preview, Tok};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "phi-train",
    rename_all = "snake_case",
    about = "Fine-tune Hugging Face causal LMs (LLaMA-Factory flag names)"
)]
struct Args {
    /// Print the first N encoded examples as LLaMA-Factory does, then exit.
    #[arg(long)]
    preview_data: Option<usize>,
    /// With --preview_data: one JSON line per example ({"input_ids", "labels"}).
    #[arg(long)]
    json: bool,
    /// tokenizer.json, or a folder holding it (default: the model's).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Model folder, .gguf file or hub id; its tokenizer is used when --tokenizer is absent.
    #[arg(long)]
    model_name_or_path: Option<String>,
    /// LF template name (phi, llama3, smollm2, ...) or `jinja` for the tokenizer's own.
    #[arg(long)]
    template: Option<String>,
    /// Registry names from dataset_info.json or .json/.jsonl/.txt paths, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    dataset: Vec<String>,
    #[arg(long, default_value = "data")]
    dataset_dir: PathBuf,
    #[arg(long, default_value_t = 2048)]
    cutoff_len: usize,
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    train_on_prompt: bool,
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    mask_history: bool,
    /// Put BOS at position 0 of every example when the template does not (label masked).
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    add_bos: bool,
    /// First N records of each dataset.
    #[arg(long)]
    max_samples: Option<usize>,
    /// Count and skip bad records instead of stopping at the first.
    #[arg(long, num_args = 0..=1, default_value_t = false, default_missing_value = "true", action = clap::ArgAction::Set)]
    skip_bad_records: bool,
    /// Fills {{name}} in datasets (LF's identity.json recipe).
    #[arg(long)]
    identity_name: Option<String>,
    /// Fills {{author}} in datasets.
    #[arg(long)]
    identity_author: Option<String>,
}

fn main() {
    // One line per error: the context chain joined with ": ".
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn tokenizer_path(a: &Args) -> Result<PathBuf> {
    if let Some(t) = &a.tokenizer {
        return Ok(t.clone());
    }
    let Some(spec) = &a.model_name_or_path else {
        bail!("--tokenizer or --model_name_or_path: one is needed to encode the data");
    };
    let r = phi_model::resolve::resolve(spec)?;
    let dir = r
        .dir
        .or_else(|| r.gguf.as_ref()?.parent().map(PathBuf::from))
        .with_context(|| {
            format!("--model_name_or_path {spec}: no folder to find tokenizer.json in")
        })?;
    Ok(dir)
}

fn run(a: Args) -> Result<()> {
    let Some(n) = a.preview_data else {
        bail!("training is not available yet; --preview_data N shows how the data is encoded");
    };
    let mut tok = Tok::load(&tokenizer_path(&a)?)?;
    let fmt = ChatFormat::new(a.template.as_deref(), &mut tok)?;
    let mut placeholders = Vec::new();
    for (k, v) in [("name", &a.identity_name), ("author", &a.identity_author)] {
        if let Some(v) = v {
            placeholders.push((k.to_string(), v.clone()));
        }
    }
    let load = LoadOptions {
        dataset_dir: a.dataset_dir.clone(),
        max_samples: a.max_samples,
        placeholders,
        skip_bad_records: a.skip_bad_records,
    };
    let enc = EncodeOptions {
        cutoff_len: a.cutoff_len,
        train_on_prompt: a.train_on_prompt,
        mask_history: a.mask_history,
        add_bos: a.add_bos,
    };
    let (examples, skipped) = prepare(&a.dataset, &tok, &fmt, &load, &enc)?;
    if let Some(s) = skipped.summary() {
        eprintln!("{s}");
    }
    eprintln!(
        "{} examples, template {}, cutoff_len {}",
        examples.len(),
        fmt.name(),
        a.cutoff_len
    );
    for e in examples.iter().take(n) {
        if a.json {
            println!("{}", preview::json_line(e));
        } else {
            println!("{}", preview::render(&tok, e));
        }
    }
    Ok(())
}
