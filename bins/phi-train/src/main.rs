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
    let result = TrainArgs::from_cli(std::env::args_os())
        .map_err(anyhow::Error::from)
        .and_then(|a| match a.preview_data {
            Some(n) => preview_data(&a, n),
            None => phi_model::on_pool(|| run(&a)),
        });
    phi_cli::exit_on_error(result);
}

/// Training, then evaluation and prediction on the trained model (or the base, alone).
fn run(a: &TrainArgs) -> Result<()> {
    if !(a.do_train || a.do_eval || a.do_predict) {
        bail!("do_train, do_eval and do_predict are all false (each defaults to false, as in LLaMA-Factory): nothing to do; pass --do_train to train");
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
    let dir = match (&a.tokenizer, &a.model_name_or_path) {
        (Some(_), _) => None,
        (None, Some(spec)) => {
            let r = phi_model::resolve::resolve(spec)?;
            phi_model::files_dir(r.dir.as_deref(), r.gguf.as_deref())
        }
        (None, None) => {
            bail!("--tokenizer or --model_name_or_path: one is needed to encode the data")
        }
    };
    phi_trainer::data::tokenizer_path(a, dir.as_deref()).with_context(|| {
        format!(
            "--model_name_or_path {}: no tokenizer.json (or .gz) beside the model; pass --tokenizer",
            a.model_name_or_path.as_deref().unwrap_or_default()
        )
    })
}

fn preview_data(a: &TrainArgs, n: usize) -> Result<()> {
    if a.dataset.is_empty() {
        bail!("--dataset: required (registry names or .json/.jsonl paths)");
    }
    let mut tok = Tok::load(&tokenizer_path(a)?)?;
    let fmt = ChatFormat::new(a.template.as_deref(), &mut tok)?;
    let load = phi_trainer::data::load_options(a);
    let enc = phi_trainer::data::encode_options(a, None);
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
