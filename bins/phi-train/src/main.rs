//! phi-train: LLaMA-Factory-style fine-tuning. `phi-train [config.toml|.yaml] [--flags]`:
//! keys and flags carry LF's names, a flag overrides the file. `--preview_data N` prints how
//! the data is encoded and exits (no model needed).

use anyhow::{bail, Context, Result};
use phi_data::load::prepare;
use phi_data::{encode::ChatFormat, preview, Tok};
use phi_trainer::{eval, predict, TrainArgs};
use std::path::PathBuf;

fn main() {
    phi_model::alloc::tune();
    // One line per error: the context chain joined with ": ".
    let result = TrainArgs::from_cli(std::env::args_os())
        .map_err(anyhow::Error::from)
        .and_then(|a| match a.preview_data {
            Some(n) => preview_data(&a, n),
            None => run(&a),
        });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Training, then evaluation and prediction on the trained model (or the base, alone).
fn run(a: &TrainArgs) -> Result<()> {
    if !(a.do_train || a.do_eval || a.do_predict) {
        bail!("do_train, do_eval and do_predict are all false: nothing to do");
    }
    // Checked before training, so a long run does not end in this error.
    if (a.do_eval || a.do_predict) && a.do_train && a.eval_dataset.is_empty() && a.val_size <= 0.0 {
        bail!("eval_dataset: required for do_eval / do_predict after training (or val_size > 0)");
    }
    if a.do_train {
        phi_trainer::train(a)?;
    }
    if a.do_eval || a.do_predict {
        let m = eval::load_model(a, a.do_train)?;
        let ex = eval::load_examples(a, &m)?;
        if a.do_eval {
            eval::run_eval(a, &m, &ex)?;
        }
        if a.do_predict {
            predict::run_predict(a, &m, &ex)?;
        }
    }
    Ok(())
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
