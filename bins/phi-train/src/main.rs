//! phi-train: LLaMA-Factory-style fine-tuning. `phi-train [config.toml|.yaml] [--flags]`:
//! keys and flags carry LF's names, a flag overrides the file. `--preview_data N` prints how
//! the data is encoded and exits (no model needed).

use anyhow::{bail, Context, Result};
use phi_data::load::prepare;
use phi_data::{encode::ChatFormat, preview, Tok};
use phi_trainer::TrainArgs;
use std::path::PathBuf;

fn main() {
    // One line per error: the context chain joined with ": ".
    let result = TrainArgs::from_cli(std::env::args_os())
        .map_err(anyhow::Error::from)
        .and_then(|a| match a.preview_data {
            Some(n) => preview_data(&a, n),
            None if !a.do_train => bail!(
                "do_train is false: nothing to do (evaluation-only runs are not available yet)"
            ),
            None => phi_trainer::train(&a).map(|_| ()).map_err(Into::into),
        });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn tokenizer_path(a: &TrainArgs) -> Result<PathBuf> {
    if let Some(t) = &a.tokenizer {
        return Ok(PathBuf::from(t));
    }
    let Some(spec) = &a.model_name_or_path else {
        bail!("--tokenizer or --model_name_or_path: one is needed to encode the data");
    };
    let r = phi_model::resolve::resolve(spec)?;
    r.dir
        .or_else(|| r.gguf.as_ref()?.parent().map(PathBuf::from))
        .with_context(|| {
            format!("--model_name_or_path {spec}: no folder to find tokenizer.json in")
        })
}

fn preview_data(a: &TrainArgs, n: usize) -> Result<()> {
    if a.dataset.is_empty() {
        bail!("--dataset: required (registry names or .json/.jsonl paths)");
    }
    let mut tok = Tok::load(&tokenizer_path(a)?)?;
    let fmt = ChatFormat::new(a.template.as_deref(), &mut tok)?;
    let load = phi_trainer::data::load_options(a);
    let enc = phi_trainer::data::encode_options(a);
    let (examples, skipped) = prepare(&a.dataset, Some((&tok, &fmt)), &load, &enc)?;
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
