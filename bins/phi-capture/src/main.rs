//! phi-capture: one forward pass with every per-layer tap, saved for analysis.

use anyhow::{bail, Context, Result};
use clap::Parser;
use phi_data::Tok;
use phi_model::capture::capture;
use phi_model::io::{prepare_out_dir, write_atomic, write_safetensors};
use phi_model::weights::read_i64;
use phi_model::Inputs;
use phi_regularizers::BosScale;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(about = "Dump logits, hidden states and norm outputs of every layer")]
struct Args {
    /// Model folder, hub id, or .gguf file.
    #[arg(long)]
    model: String,
    /// safetensors file with `input_ids` [B,T] (int64) and optional `attention_mask`.
    #[arg(long, group = "input")]
    input_ids: Option<PathBuf>,
    /// Text to tokenize (one sequence).
    #[arg(long, group = "input")]
    text: Option<String>,
    /// Text file (one sequence per line) or JSON/JSONL with a "text" field per record.
    #[arg(long, group = "input")]
    dataset: Option<PathBuf>,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Truncate every sequence to this many tokens.
    #[arg(long)]
    seq_len: Option<usize>,
    /// PEFT adapter folder.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// BOS scaling of the position-0 embedding: `auto` applies the adapter folder's
    /// bos_zero_config.json (written by BOS-scaling training) when it has one, `off` never
    /// scales, a number is the factor.
    #[arg(long, default_value = "auto")]
    bos_scaling: String,
    #[arg(long)]
    out: PathBuf,
    /// Replace files in a non-empty output folder.
    #[arg(long)]
    overwrite: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn dataset_texts(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    let field = |v: &serde_json::Value, where_: String| -> Result<String> {
        v.get("text")
            .and_then(|t| t.as_str())
            .map(str::to_string)
            .with_context(|| {
                format!(
                    "{}: {where_}: expected a record with a string \"text\" field",
                    path.display()
                )
            })
    };
    match ext {
        "jsonl" => text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                let v: serde_json::Value = serde_json::from_str(l)
                    .with_context(|| format!("{}: line {}: invalid JSON", path.display(), i + 1))?;
                field(&v, format!("line {}", i + 1))
            })
            .collect(),
        "json" => {
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid JSON", path.display()))?;
            let arr = v
                .as_array()
                .with_context(|| format!("{}: expected a JSON array of records", path.display()))?;
            arr.iter()
                .enumerate()
                .map(|(i, r)| field(r, format!("record {i}")))
                .collect()
        }
        _ => Ok(text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()),
    }
}

/// Right-pads token rows into one batch with an attention mask.
fn pad_rows(rows: Vec<Vec<i64>>, pad: i64) -> Inputs {
    let t = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::new();
    let mut mask = Vec::new();
    for r in &rows {
        ids.extend(
            r.iter()
                .copied()
                .chain(std::iter::repeat_n(pad, t - r.len())),
        );
        mask.extend(std::iter::repeat_n(1, r.len()).chain(std::iter::repeat_n(0, t - r.len())));
    }
    Inputs::new(rows.len(), t, ids).with_mask(mask)
}

fn main() {
    phi_model::alloc::tune();
    phi_cli::exit_on_error(phi_model::on_pool(|| run(phi_cli::parse())));
}

fn run(a: Args) -> Result<()> {
    let device = phi_model::device_from_name(&a.device)?;
    let base = phi_model::load(&a.model, &device)?;
    if let Some(line) = base.model.quant_summary().line() {
        eprintln!("[phi-capture] {line}");
    }
    let loaded = phi_adapters::peft::with_adapter(base, a.adapter.as_deref())?;
    let tok = || -> Result<Tok> {
        let p = a
            .tokenizer
            .clone()
            .or_else(|| phi_data::tokenizer::find(loaded.files_dir().as_deref()))
            .context("--tokenizer: no tokenizer.json beside the model; pass --tokenizer")?;
        Ok(Tok::load(&p)?)
    };
    let pad = loaded.config.pad_id() as i64;
    let mut inp = if let Some(p) = &a.input_ids {
        let (shape, ids) = read_i64(p, "input_ids")?.with_context(|| {
            format!(
                "{}: tensor input_ids: missing (expected int64 [B,T])",
                p.display()
            )
        })?;
        if shape.len() != 2 {
            bail!(
                "{}: tensor input_ids: expected shape [B,T], found {shape:?}",
                p.display()
            );
        }
        let mut inp = Inputs::new(shape[0], shape[1], ids);
        if let Some((ms, m)) = read_i64(p, "attention_mask")? {
            if ms != shape {
                bail!(
                    "{}: tensor attention_mask: expected shape {shape:?}, found {ms:?}",
                    p.display()
                );
            }
            inp = inp.with_mask(m);
        }
        inp
    } else if let Some(t) = &a.text {
        let ids = tok()?.encode(t, true)?;
        pad_rows(vec![ids.into_iter().map(i64::from).collect()], pad)
    } else if let Some(d) = &a.dataset {
        let tk = tok()?;
        let rows = dataset_texts(d)?
            .iter()
            .map(|t| Ok(tk.encode(t, true)?.into_iter().map(i64::from).collect()))
            .collect::<Result<Vec<Vec<i64>>>>()?;
        if rows.is_empty() {
            bail!("{}: no sequences found", d.display());
        }
        pad_rows(rows, pad)
    } else {
        bail!("one of --input-ids, --text or --dataset is required");
    };
    if let Some(n) = a.seq_len {
        if n < inp.seq {
            let keep = |v: &[i64]| -> Vec<i64> {
                v.chunks(inp.seq).flat_map(|r| r[..n].to_vec()).collect()
            };
            inp = Inputs {
                input_ids: keep(&inp.input_ids),
                attention_mask: inp.attention_mask.as_deref().map(keep),
                position_ids: None,
                seq: n,
                batch: inp.batch,
            };
        }
    }
    loaded.check_ids("input_ids", &inp.input_ids)?;
    prepare_out_dir(&a.out, a.overwrite)?;
    let (bos, note) = BosScale::from_flag(&a.bos_scaling, a.adapter.as_deref())?;
    if let Some(n) = note {
        eprintln!("[phi-capture] {n}");
    }
    let (tensors, summary) = capture(&loaded.model, &inp, bos.map(|b| b.factor));
    write_safetensors(&a.out.join("capture.safetensors"), &tensors, None)?;
    write_atomic(
        &a.out.join("summary.json"),
        serde_json::to_string_pretty(&summary)?.as_bytes(),
    )?;
    eprintln!(
        "wrote {} tensors to {}",
        tensors.len(),
        a.out.join("capture.safetensors").display()
    );
    Ok(())
}
