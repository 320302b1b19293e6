//! A LoRA adapter as llama.cpp's `convert_lora_to_gguf.py` writes it: `general.type`
//! adapter, `adapter.type` lora, `adapter.lora.alpha`, and `<base tensor>.lora_a` [r, in] /
//! `.lora_b` [out, r] under the base architecture's GGUF names, B's rows in llama.cpp's q/k
//! order. llama.cpp scales every pair by alpha / r; where the adapter's own scale differs
//! (rsLoRA's alpha / √r, which the converter ignores, or per-module patterns) alpha is written
//! so the common scale comes out, and any module left over has its B scaled to match.

use crate::config::LoraConfig;
use crate::error::AdapterError;
use phi_model::gguf_export::{
    encode_as, gguf_name, interleave_rows, kv, permuted_heads, tensor_type, type_bytes, OutType,
};
use phi_model::gguf_write::{write_file, MetaValue, TensorPlan};
use phi_model::{CausalLm, ModelConfig};
use std::path::Path;

/// `alpha` for the file: the adapter's scale for its configured rank, times that rank.
pub fn file_alpha(cfg: &LoraConfig) -> f64 {
    let r = cfg.r as f64;
    match cfg.use_rslora {
        true => cfg.alpha * r.sqrt(),
        false => cfg.alpha,
    }
}

/// The adapter held by `model` (loaded with `cfg`) as a GGUF file at `path`.
pub fn write_adapter(
    path: &Path,
    model: &CausalLm,
    c: &ModelConfig,
    cfg: &LoraConfig,
    name: &str,
    out: OutType,
) -> Result<(), AdapterError> {
    let what = path.display().to_string();
    let fail = |m: String| AdapterError::Other(format!("{what}: {m}"));
    if !out.converter_writes() {
        return Err(fail(format!(
            "an adapter is written in f32, f16, bf16 or q8_0 (as llama.cpp's converter), not {out:?}"
        )));
    }
    if !cfg.modules_to_save.is_empty() {
        return Err(fail(format!(
            "modules_to_save ({}) has no place in llama.cpp's LoRA format; merge the adapter \
             instead (--gguf)",
            cfg.modules_to_save.join(", ")
        )));
    }
    let layout = c.arch.gguf().ok_or_else(|| {
        fail(format!(
            "GGUF export of {} is not supported",
            c.arch.hf_class()
        ))
    })?;
    let alpha = file_alpha(cfg);
    let mut tensors = model.lora_tensors();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let mut plans = Vec::new();
    let mut data = Vec::new();
    for (key, t) in tensors {
        let (module, part) = key
            .rsplit_once(".lora_")
            .ok_or_else(|| fail(format!("{key}: not a lora_A / lora_B tensor")))?;
        let base = format!("{module}.weight");
        let g = gguf_name(&base, &layout).ok_or_else(|| {
            fail(format!(
                "{module}: no {} tensor to adapt in GGUF",
                layout.name
            ))
        })?;
        let mut values = t.data;
        let suffix = match part {
            "A.weight" => "lora_a",
            "B.weight" => {
                let rank = t.shape[1] as f64;
                let wanted = cfg.scale_for(module);
                let given = alpha / rank;
                if (wanted - given).abs() > 1e-12 * wanted.abs() {
                    let k = (wanted / given) as f32;
                    values.iter_mut().for_each(|v| *v *= k);
                }
                if let Some(heads) = permuted_heads(&base, &layout, c) {
                    values = interleave_rows(&values, t.shape[0], heads);
                }
                "lora_b"
            }
            _ => return Err(fail(format!("{key}: not a lora_A / lora_B tensor"))),
        };
        let name = format!("{g}.{suffix}");
        let ty = tensor_type(&name, &t.shape, out, false, c.num_hidden_layers);
        plans.push(TensorPlan {
            bytes: type_bytes(ty, values.len()),
            name,
            shape: t.shape,
            ggml_type: ty,
        });
        data.push(values);
    }
    let meta = vec![
        kv("general.architecture", MetaValue::Str(layout.name.into())),
        kv("general.type", MetaValue::Str("adapter".into())),
        kv("adapter.type", MetaValue::Str("lora".into())),
        kv("general.name", MetaValue::Str(name.into())),
        kv("adapter.lora.alpha", MetaValue::F32(alpha as f32)),
        kv("general.quantization_version", MetaValue::U32(2)),
    ];
    write_file(path, &meta, &plans, |i| {
        encode_as(plans[i].ggml_type, &data[i])
            .map_err(|e| phi_model::ModelError::tensor(&what, &plans[i].name, e))
    })
    .map_err(AdapterError::from)
}

/// A llama.cpp LoRA GGUF read back as factors per HF module, B's rows in HF's order again,
/// with a config giving each module llama.cpp's scale alpha / r.
pub fn read_adapter(
    path: &Path,
    c: &ModelConfig,
) -> Result<(LoraConfig, crate::peft::Factors), AdapterError> {
    use phi_model::gguf::{hf_name, GgufFile};
    let what = path.display().to_string();
    let fail = |m: String| AdapterError::Other(format!("{what}: {m}"));
    let file = GgufFile::open(path).map_err(phi_model::ModelError::from)?;
    let meta = file.metadata();
    let s = |k: &str| {
        meta.get(k)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    if s("general.type") != "adapter" || s("adapter.type") != "lora" {
        return Err(fail(format!(
            "key general.type / adapter.type: expected adapter / lora, found {:?} / {:?}",
            s("general.type"),
            s("adapter.type")
        )));
    }
    let layout = c
        .arch
        .gguf()
        .ok_or_else(|| fail(format!("{} has no GGUF layout", c.arch.hf_class())))?;
    if s("general.architecture") != layout.name {
        return Err(fail(format!(
            "key general.architecture: expected {:?} (the base model's), found {:?}",
            layout.name,
            s("general.architecture")
        )));
    }
    let alpha = meta
        .get("adapter.lora.alpha")
        .and_then(|v| v.as_f64())
        .ok_or_else(|| fail("key adapter.lora.alpha: expected a number (missing)".into()))?;
    let mut factors = crate::peft::Factors::new();
    let mut ranks = std::collections::BTreeMap::new();
    for (name, info) in file.tensor_infos() {
        let (base, is_a) = match (name.strip_suffix(".lora_a"), name.strip_suffix(".lora_b")) {
            (Some(b), _) => (b, true),
            (_, Some(b)) => (b, false),
            _ => {
                return Err(fail(format!(
                    "tensor {name}: not a .lora_a / .lora_b tensor"
                )))
            }
        };
        let hf = hf_name(base, &layout)
            .ok_or_else(|| fail(format!("tensor {name}: names no {} weight", layout.name)))?;
        let module = hf.trim_end_matches(".weight").to_string();
        let shape: Vec<usize> = info.dims.iter().rev().copied().collect();
        let mut data = file
            .gguf_tensor_f32(name)
            .map_err(phi_model::ModelError::from)?
            .unwrap_or_default();
        if is_a {
            ranks.insert(module.clone(), shape[0]);
        } else {
            if let Some(heads) = permuted_heads(&hf, &layout, c) {
                data = phi_model::gguf::unpermute_rows(&data, shape[0], heads);
            }
        }
        let t = phi_model::weights::HostTensor { shape, data };
        factors.entry(module).or_default()[usize::from(!is_a)] = Some(t);
    }
    let r = ranks
        .values()
        .copied()
        .next()
        .ok_or_else(|| fail("no LoRA tensors".into()))?;
    let cfg = LoraConfig {
        r,
        alpha,
        targets: crate::Targets::Names(crate::targets::leaf_names(
            &factors.keys().cloned().collect::<Vec<_>>(),
        )),
        rank_pattern: ranks.into_iter().filter(|&(_, k)| k != r).collect(),
        ..LoraConfig::default()
    };
    Ok((cfg, factors))
}
