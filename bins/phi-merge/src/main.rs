//! phi-merge: fold a PEFT LoRA adapter into its base model and write a folder transformers
//! loads as is (or, with --adapter-only, re-write the adapter itself).

use anyhow::{bail, Context, Result};
use clap::Parser;
use phi_adapters::merge::{merge, split_fused, split_target_names};
use phi_adapters::peft::{self, PREFIX};
use phi_adapters::targets::leaf_names;
use phi_model::export::{parse_size, write_checkpoint, OutDtype};
use phi_model::gguf::GgufFile;
use phi_model::io::{prepare_out_dir, write_atomic};
use phi_model::{Arch, Loaded, ModelConfig, RopeScaling};
use serde_json::Value;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(about = "Merge a LoRA adapter into its base model and export safetensors")]
struct Args {
    /// Base model: folder, hub id, or .gguf file.
    #[arg(long)]
    model: String,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// f32, f16 or bf16 (LLaMA-Factory's export_dtype); default: the base config's dtype.
    #[arg(long)]
    dtype: Option<String>,
    /// Largest shard, e.g. 2GB or 500MB (LLaMA-Factory's export_size, in GB when bare).
    #[arg(long, default_value = "5GB")]
    shard_size: String,
    /// Write Phi-3's fused qkv_proj / gate_up_proj as q/k/v and gate/up.
    #[arg(long)]
    split_fused: bool,
    /// Write the (possibly split) adapter instead of a merged model.
    #[arg(long)]
    adapter_only: bool,
    /// Replace files in a non-empty output folder.
    #[arg(long)]
    overwrite: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
}

fn main() {
    if let Err(e) = run(Args::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// The base's config.json, or one built from GGUF metadata.
fn source_config(dir: &Option<PathBuf>, gguf: &Option<PathBuf>) -> Result<Value> {
    if let Some(dir) = dir {
        let p = dir.join("config.json");
        let text =
            std::fs::read_to_string(&p).with_context(|| format!("{}: cannot read", p.display()))?;
        return serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", p.display()));
    }
    if let Some(g) = gguf {
        return Ok(GgufFile::open(g)?.hf_config()?);
    }
    bail!("--model: no config.json to export")
}

fn config_dtype(cfg: &Value) -> OutDtype {
    ["dtype", "torch_dtype"]
        .iter()
        .find_map(|k| cfg[*k].as_str())
        .and_then(|s| OutDtype::parse(s).ok())
        .unwrap_or(OutDtype::F32)
}

/// Phi-3 with split projections is a Llama checkpoint; longrope has no such form.
fn as_llama(mut cfg: Value, model: &ModelConfig) -> Result<Value> {
    if let RopeScaling::LongRope { .. } = model.rope_scaling {
        bail!("--split-fused: a longrope Phi-3 has no split-projection form in transformers; export it fused");
    }
    if model.partial_rotary_factor != 1.0 {
        bail!("--split-fused: partial rotary Phi-3 has no split-projection form in transformers");
    }
    cfg["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    cfg["model_type"] = serde_json::json!("llama");
    cfg["head_dim"] = serde_json::json!(model.head_dim);
    for k in [
        "auto_map",
        "sliding_window",
        "embd_pdrop",
        "resid_pdrop",
        "original_max_position_embeddings",
    ] {
        if let Some(o) = cfg.as_object_mut() {
            o.remove(k);
        }
    }
    Ok(cfg)
}

const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
];

fn copy_beside(from: &Path, out: &Path) -> Result<Vec<String>> {
    let mut copied = Vec::new();
    for f in TOKENIZER_FILES {
        let src = from.join(f);
        if src.exists() {
            let bytes =
                std::fs::read(&src).with_context(|| format!("{}: cannot read", src.display()))?;
            write_atomic(&out.join(f), &bytes)?;
            copied.push(f.to_string());
        }
    }
    Ok(copied)
}

fn run(a: Args) -> Result<()> {
    let device = phi_model::device_from_name(&a.device)?;
    // Everything a user can get wrong is checked before the (slow) load and before any write.
    let want_dtype = a.dtype.as_deref().map(OutDtype::parse).transpose()?;
    let shard = parse_size(&a.shard_size)?;
    if !a.adapter.join("adapter_config.json").exists() {
        bail!(
            "{}: no adapter_config.json (expected a PEFT adapter folder)",
            a.adapter.display()
        );
    }
    prepare_out_dir(&a.out, a.overwrite)?;
    let Loaded {
        model,
        config: mcfg,
        dir,
        gguf,
    } = phi_model::load(&a.model, &device)?;
    if a.split_fused && mcfg.arch != Arch::Phi3 {
        bail!(
            "--split-fused: only Phi-3 has fused projections (this model is {})",
            mcfg.arch.hf_class()
        );
    }
    let mut config = match a.adapter_only {
        true => Value::Null,
        false => source_config(&dir, &gguf)?,
    };
    if a.split_fused && !a.adapter_only {
        config = as_llama(config, &mcfg)?;
    }
    let (model, mut cfg, paths) = peft::load(model, &a.adapter)?;
    eprintln!(
        "adapter on {} modules, scale {}",
        paths.len(),
        cfg.scale_for(&paths[0])
    );
    if a.adapter_only {
        let mut tensors: Vec<_> = model.lora_tensors();
        let mut targets = leaf_names(&paths);
        if a.split_fused {
            tensors = split_fused(&mcfg, tensors);
            targets = split_target_names(&targets);
            if let phi_adapters::Targets::Regex(_) = cfg.targets {
                cfg.targets = phi_adapters::Targets::Names(targets.clone());
            }
        }
        let map = tensors
            .into_iter()
            .map(|(k, t)| (format!("{PREFIX}{k}"), (t.shape, t.data)))
            .collect();
        peft::write_adapter(&a.out, &cfg, &targets, &map)?;
        eprintln!("wrote adapter to {}", a.out.display());
        return Ok(());
    }
    let dtype = want_dtype.unwrap_or_else(|| config_dtype(&config));
    let merged = merge(model);
    let mut tensors = merged.hf_tensors();
    if a.split_fused {
        tensors = split_fused(&mcfg, tensors);
    }
    let files = write_checkpoint(&a.out, &tensors, dtype, shard)?;
    // transformers 5 reads `dtype`, 4 `torch_dtype`: keep whichever the base had.
    let keys: Vec<&str> = ["dtype", "torch_dtype"]
        .into_iter()
        .filter(|k| config.get(*k).is_some())
        .collect();
    for k in if keys.is_empty() { vec!["dtype"] } else { keys } {
        config[k] = Value::from(dtype.hf_name());
    }
    write_atomic(
        &a.out.join("config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    let from = dir.or_else(|| gguf.as_ref()?.parent().map(Path::to_path_buf));
    let copied = match from {
        Some(d) => copy_beside(&d, &a.out)?,
        None => vec![],
    };
    eprintln!(
        "merged {} modules; wrote {} ({}), config.json{}{} to {}",
        paths.len(),
        files.join(", "),
        dtype.hf_name(),
        if copied.is_empty() { "" } else { ", " },
        copied.join(", "),
        a.out.display()
    );
    Ok(())
}
