//! Encoding throughput of the data pipeline: read, template, tokenize, mask, as phi-train does.
//! `cargo run --release -p phi-bench --bin phi-bench-data -- --dataset alpaca_en_demo
//!  --tokenizer assets/tokenizers/phi3 --template phi`; prints one JSON line.

use anyhow::Result;
use clap::Parser;
use phi_data::encode::{ChatFormat, EncodeOptions};
use phi_data::load::{encode_records, load_records, LoadOptions, Skipped};
use phi_data::Tok;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "alpaca_en_demo")]
    dataset: String,
    #[arg(long, default_value = "data")]
    dataset_dir: PathBuf,
    #[arg(long, default_value = "assets/tokenizers/phi3")]
    tokenizer: PathBuf,
    #[arg(long, default_value = "phi")]
    template: String,
    #[arg(long, default_value_t = 2048)]
    cutoff_len: usize,
    #[arg(long, default_value_t = 5)]
    repeats: usize,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut tok = Tok::load(&a.tokenizer)?;
    let fmt = ChatFormat::new(Some(&a.template), &mut tok)?;
    let load = LoadOptions {
        dataset_dir: a.dataset_dir.clone(),
        ..LoadOptions::default()
    };
    let enc = EncodeOptions {
        cutoff_len: a.cutoff_len,
        ..EncodeOptions::default()
    };
    let mut times = Vec::new();
    let (mut examples, mut tokens) = (0, 0);
    for _ in 0..a.repeats {
        let t0 = Instant::now();
        let mut sk = Skipped::default();
        let records = load_records(std::slice::from_ref(&a.dataset), &load, &mut sk)?;
        let out = encode_records(Some((&tok, &fmt)), &records, &enc, false, &mut sk)?;
        times.push(t0.elapsed().as_secs_f64());
        examples = out.len();
        tokens = out.iter().map(|e| e.len()).sum::<usize>();
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "dataset": a.dataset, "template": a.template, "examples": examples, "tokens": tokens,
            "seconds_median": median, "examples_per_s": examples as f64 / median,
            "tokens_per_s": tokens as f64 / median,
        })
    );
    Ok(())
}
