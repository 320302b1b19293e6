//! phi-merge: fold a PEFT LoRA adapter into its base model and write a folder transformers
//! loads as is (or, with --adapter-only, re-write the adapter itself), and/or GGUF files for
//! llama.cpp and Ollama: the merged model (--gguf), the adapter alone (--adapter-gguf).

mod gguf_out;

use anyhow::{bail, Result};
use clap::Parser;
use phi_adapters::gguf::write_adapter;
use phi_adapters::merge::{merge, split_fused, split_target_names};
use phi_adapters::peft::{self, PREFIX};
use phi_adapters::targets::leaf_names;
use phi_model::export::{config_dtype, parse_size, source_config, write_model_folder, OutDtype};
use phi_model::gguf_export::{write_model, OutType};
use phi_model::io::prepare_out_dir;
use phi_model::Loaded;
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
    /// The merged model's folder (safetensors); optional with --gguf / --adapter-gguf.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Write the merged model as a GGUF file (llama.cpp, Ollama, LM Studio).
    #[arg(long)]
    gguf: Option<PathBuf>,
    /// --gguf's weight type: f32, f16, bf16, q8_0 (as llama.cpp's converter); q4_0, q4_1,
    /// q5_0, q5_1, q4_k_s, q4_k_m (q4_k), q5_k_s, q5_k_m (q5_k), q6_k (as llama-quantize).
    #[arg(long, default_value = "f16")]
    outtype: String,
    /// Write the adapter alone as llama.cpp's LoRA GGUF.
    #[arg(long)]
    adapter_gguf: Option<PathBuf>,
    /// --adapter-gguf's type: f32, f16, bf16 or q8_0 (llama.cpp's converter writes f32).
    #[arg(long, default_value = "f32")]
    adapter_outtype: String,
    /// Tokenizer folder for --gguf (default: the model folder, or a GGUF base's own keys).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// general.name in the GGUF files (default: each file's name).
    #[arg(long)]
    gguf_name: Option<String>,
    /// f32, f16 or bf16 (LLaMA-Factory's export_dtype); default: the base config's dtype.
    #[arg(long)]
    dtype: Option<String>,
    /// Largest shard, e.g. 2GB or 500MB (LLaMA-Factory's export_size, in GB when bare).
    #[arg(long, default_value = "5GB")]
    shard_size: String,
    /// Write fused projections (Phi-3's qkv_proj / gate_up_proj) as q/k/v and gate/up.
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
    phi_model::alloc::tune();
    phi_cli::exit_on_error(phi_model::on_pool(|| run(phi_cli::parse())));
}

fn run(a: Args) -> Result<()> {
    let device = phi_model::device_from_name(&a.device)?;
    // Everything a user can get wrong is checked before the (slow) load and before any write.
    let want_dtype = a.dtype.as_deref().map(OutDtype::parse).transpose()?;
    let shard = parse_size(&a.shard_size)?;
    if !a.adapter.is_file() && !a.adapter.join("adapter_config.json").exists() {
        bail!(
            "{}: no adapter_config.json (expected a PEFT adapter folder)",
            a.adapter.display()
        );
    }
    if a.out.is_none() && a.gguf.is_none() && a.adapter_gguf.is_none() {
        bail!("nothing to write: give --out, --gguf or --adapter-gguf");
    }
    if a.gguf.is_some() && (a.adapter_only || a.split_fused) {
        bail!("--gguf writes the merged model with Phi-3's projections fused as llama.cpp reads them; it does not go with --adapter-only or --split-fused");
    }
    let outtype = OutType::parse(&a.outtype)?;
    let adapter_outtype = OutType::parse(&a.adapter_outtype)
        .map_err(|e| anyhow::anyhow!("--adapter-outtype: {e}"))?;
    if !adapter_outtype.converter_writes() {
        bail!(
            "--adapter-outtype {}: expected f32, f16, bf16 or q8_0",
            a.adapter_outtype
        );
    }
    let folder = Path::new(&a.model);
    if a.gguf.is_some()
        && a.tokenizer.is_none()
        && folder.is_dir()
        && !folder.join("tokenizer.json").exists()
    {
        bail!(
            "--gguf: {} has no tokenizer.json (llama.cpp needs the tokenizer in the file; pass --tokenizer FOLDER)",
            folder.display()
        );
    }
    if let Some(t) = &a.tokenizer {
        if !t.join("tokenizer.json").exists() {
            bail!("--tokenizer {}: no tokenizer.json there", t.display());
        }
    }
    for (p, flag) in [(&a.gguf, "--gguf"), (&a.adapter_gguf, "--adapter-gguf")] {
        if let Some(p) = p {
            gguf_out::check_new(p, flag, a.overwrite)?;
        }
    }
    // The Modelfile too, before anything is written: a refusal after the merge would leave
    // the GGUF without it.
    if let Some(at) = a.gguf.as_ref().or(a.adapter_gguf.as_ref()) {
        gguf_out::check_new(&gguf_out::modelfile_path(at), "Modelfile", a.overwrite)?;
    }
    if let Some(out) = &a.out {
        prepare_out_dir(out, a.overwrite)?;
    }
    let Loaded {
        model,
        config: mcfg,
        dir,
        gguf,
    } = phi_model::load(&a.model, &device)?;
    if (a.gguf.is_some() || a.adapter_gguf.is_some()) && mcfg.arch.gguf().is_none() {
        bail!(
            "GGUF export of {} is not supported (llama, phi3, phi2 are)",
            mcfg.arch.hf_class()
        );
    }
    if a.split_fused && mcfg.arch.fused(&mcfg).is_empty() {
        bail!(
            "--split-fused: {} has no fused projections (Phi-3 has)",
            mcfg.arch.hf_class()
        );
    }
    let mut config = match a.adapter_only {
        true => Value::Null,
        false => source_config(dir.as_deref(), gguf.as_deref())?,
    };
    if a.split_fused && !a.adapter_only {
        let arch = mcfg.arch;
        arch.unfused_config(&mut config, &mcfg)
            .map_err(|e| anyhow::anyhow!("--split-fused: {e}"))?;
    }
    let (model, mut cfg, paths) = peft::load_any(model, &a.adapter, &mcfg)?;
    eprintln!(
        "adapter on {} modules, scale {}",
        paths.len(),
        cfg.scale_for(&paths[0])
    );
    let named = |p: &Path| a.gguf_name.clone().unwrap_or_else(|| gguf_out::name_of(p));
    if let Some(p) = &a.adapter_gguf {
        write_adapter(p, &model, &mcfg, &cfg, &named(p), adapter_outtype)?;
        eprintln!(
            "wrote the adapter as llama.cpp's LoRA GGUF ({}, adapter.lora.alpha {}) to {}",
            a.adapter_outtype,
            phi_adapters::gguf::file_alpha(&cfg),
            p.display()
        );
    }
    if a.adapter_only {
        let Some(out) = &a.out else {
            return Ok(());
        };
        let mut tensors: Vec<_> = model.lora_tensors();
        let mut targets = leaf_names(&paths);
        if a.split_fused {
            tensors = split_fused(&mcfg, tensors);
            targets = split_target_names(&mcfg, &targets);
            if let phi_adapters::Targets::Regex(_) = cfg.targets {
                cfg.targets = phi_adapters::Targets::Names(targets.clone());
            }
        }
        let map = tensors
            .into_iter()
            .map(|(k, t)| (format!("{PREFIX}{k}"), (t.shape, t.data)))
            .collect();
        peft::write_adapter(out, &cfg, &targets, &map)?;
        eprintln!("wrote adapter to {}", out.display());
        return Ok(());
    }
    let dtype = want_dtype.unwrap_or_else(|| config_dtype(&config));
    let q = model.quant_summary();
    if q.weights > 0 && (a.out.is_some() || a.gguf.is_some()) {
        let written = match &a.out {
            Some(_) => dtype.hf_name().to_string(),
            None => a.outtype.clone(),
        };
        eprintln!(
            "base: {} linear weights stored quantized ({}): merged into their dequantized values, written as {written}",
            q.weights,
            q.types.join(", "),
        );
    }
    let vocab = match &a.gguf {
        // Read before merging, so a missing tokenizer fails before the slow part.
        Some(_) => {
            let layout = mcfg.arch.gguf().expect("checked after the load");
            let tok = a.tokenizer.as_deref();
            gguf_out::vocab(tok, dir.as_deref(), gguf.as_deref(), &mcfg, layout.name)?
        }
        None => vec![],
    };
    let template = gguf_out::chat_template(&vocab).map(str::to_string);
    if a.out.is_some() || a.gguf.is_some() {
        let merged = merge(model);
        if let Some(out) = &a.out {
            let mut tensors = merged.hf_tensors();
            if a.split_fused {
                tensors = split_fused(&mcfg, tensors);
            }
            let from = dir
                .clone()
                .or_else(|| gguf.as_ref()?.parent().map(Path::to_path_buf));
            let files = write_model_folder(out, &tensors, config, dtype, shard, from.as_deref())?;
            eprintln!(
                "merged {} modules; wrote {} ({}) to {}",
                paths.len(),
                files.join(", "),
                dtype.hf_name(),
                out.display()
            );
        }
        if let Some(g) = &a.gguf {
            write_model(g, &merged, &mcfg, &named(g), vocab, outtype)?;
            eprintln!(
                "merged {} modules; wrote {} ({})",
                paths.len(),
                g.display(),
                a.outtype
            );
        }
    }
    let modelfile = match (&a.gguf, &a.adapter_gguf) {
        (Some(g), _) => Some(gguf_out::write_modelfile(
            g,
            g,
            None,
            template.as_deref(),
            a.overwrite,
        )?),
        (None, Some(ad)) => {
            let base = gguf
                .clone()
                .or(dir.clone())
                .unwrap_or_else(|| PathBuf::from(&a.model));
            Some(gguf_out::write_modelfile(
                ad,
                &base,
                Some(ad),
                template.as_deref(),
                a.overwrite,
            )?)
        }
        _ => None,
    };
    if let Some(m) = modelfile {
        eprintln!(
            "wrote {} (ollama create NAME -f {})",
            m.display(),
            m.display()
        );
    }
    Ok(())
}
