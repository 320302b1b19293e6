//! `--split-fused` on every Phi-3 oracle case, with every expectation derived from the case's
//! config.json and lora/adapter_config.json: which modules are fused, their row blocks, which
//! merged exports transformers' Llama can represent, and the split adapter's numbers.

mod common;

use burn::tensor::Tensor;
use common::{logits, merge_into, s, tmp};
use phi_model::weights::{HostTensor, SafetensorsSource, TensorSource};
use phi_model::{Arch, ModelConfig, RopeScaling, TapRequest};
use phi_testkit::oracle::{cases_where, Case, Report};
use std::collections::BTreeMap;
use std::path::Path;

/// Fused leaf → its parts with their row counts, from the model config alone.
fn parts(cfg: &ModelConfig) -> BTreeMap<&'static str, Vec<(&'static str, usize)>> {
    let d = cfg.head_dim;
    let (q, kv, i) = (
        cfg.num_attention_heads * d,
        cfg.num_key_value_heads * d,
        cfg.intermediate_size,
    );
    BTreeMap::from([
        (
            "qkv_proj",
            vec![("q_proj", q), ("k_proj", kv), ("v_proj", kv)],
        ),
        ("gate_up_proj", vec![("gate_proj", i), ("up_proj", i)]),
    ])
}

fn tensors(file: &Path) -> BTreeMap<String, HostTensor> {
    let src = SafetensorsSource::open_files(&[file.to_path_buf()]).unwrap();
    src.names()
        .into_iter()
        .map(|n| {
            let t = src.load(&n).unwrap();
            (n, t)
        })
        .collect()
}

/// `name` with fused leaf `fused` (found as `.fused.`) split: (part name, row range) each.
fn split_name(
    name: &str,
    parts: &BTreeMap<&str, Vec<(&str, usize)>>,
) -> Option<Vec<(String, usize, usize)>> {
    let (fused, ps) = parts
        .iter()
        .find(|(f, _)| name.contains(&format!(".{f}.")))?;
    let mut start = 0;
    Some(
        ps.iter()
            .map(|(p, n)| {
                start += n;
                (
                    name.replacen(&format!(".{fused}."), &format!(".{p}."), 1),
                    start - n,
                    *n,
                )
            })
            .collect(),
    )
}

fn rows(t: &HostTensor, start: usize, n: usize) -> Vec<f32> {
    let cols: usize = t.shape[1..].iter().product();
    t.data[start * cols..(start + n) * cols].to_vec()
}

/// Each fused tensor of `fused` split by rows (`share_a`: LoRA A kept whole for every part),
/// the others as they are: what a faithful split must hold, key by key.
fn expected_split(
    fused: &BTreeMap<String, HostTensor>,
    parts: &BTreeMap<&str, Vec<(&str, usize)>>,
    share_a: bool,
) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut out = BTreeMap::new();
    for (name, t) in fused {
        match split_name(name, parts) {
            None => {
                out.insert(name.clone(), (t.shape.clone(), t.data.clone()));
            }
            Some(ps) => {
                for (p, start, n) in ps {
                    let v = if share_a && name.contains(".lora_A.") {
                        (t.shape.clone(), t.data.clone())
                    } else {
                        let mut shape = t.shape.clone();
                        shape[0] = n;
                        (shape, rows(t, start, n))
                    };
                    out.insert(p, v);
                }
            }
        }
    }
    out
}

fn compare(
    r: &mut Report,
    case: &str,
    what: &str,
    got: &BTreeMap<String, HostTensor>,
    want: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    tol: f32,
) {
    let gk: Vec<&String> = got.keys().collect();
    let wk: Vec<&String> = want.keys().collect();
    r.equal(case, &format!("{what}: key set"), &gk, &wk);
    for (k, (shape, data)) in want {
        if let Some(t) = got.get(k) {
            r.equal(case, &format!("{what}: {k} shape"), &t.shape, shape);
            r.close(case, &format!("{what}: {k}"), &t.data, data, tol);
        }
    }
}

#[test]
fn split_fused_follows_each_phi3_case() {
    let mut r = Report::default();
    let phi3 = cases_where("a Phi-3 model with lora/", |d| {
        d.join("lora/adapter_config.json").exists()
            && ModelConfig::from_file(&d.join("config.json")).is_ok_and(|c| c.arch == Arch::Phi3)
    });
    for case in phi3.iter().map(|d| Case::open(d)) {
        let cfg = ModelConfig::from_file(&case.dir.join("config.json")).unwrap();
        let parts = parts(&cfg);
        let longrope = matches!(cfg.rope_scaling, RopeScaling::LongRope { .. });
        let partial = cfg.partial_rotary_factor != 1.0;

        // The merged export: LlamaForCausalLM, unless Llama cannot compute what Phi-3 does.
        let out = tmp(&format!("split-{}", case.name));
        let (ok, err) = merge_into(&case, &case.dir.join("lora"), &out, &["--split-fused"]);
        if longrope || partial {
            r.equal(&case.name, "merged split refused", &[ok], &[false]);
            let why = if longrope { "longrope" } else { "partial" };
            if err.lines().count() != 1
                || !err.contains("--split-fused")
                || !err.contains(why)
                || !err.contains("--adapter-only")
            {
                r.fail(format!(
                    "{}: refusal should be one line saying why: {err}",
                    case.name
                ));
            }
        } else if !ok {
            r.fail(format!("{}: --split-fused failed: {err}", case.name));
        } else {
            let want = expected_split(
                &tensors(&case.dir.join("lora_merged/model.safetensors")),
                &parts,
                false,
            );
            compare(
                &mut r,
                &case.name,
                "split merge vs PEFT's merge, split here",
                &tensors(&out.join("model.safetensors")),
                &want,
                1e-6,
            );
            let c: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                    .unwrap();
            r.equal(
                &case.name,
                "architectures",
                &[c["architectures"][0].as_str()],
                &[Some("LlamaForCausalLM")],
            );
            r.close(
                &case.name,
                "split merged logits vs lora.logits",
                &logits(&out, &case),
                &case.f32("lora.logits").1,
                1e-4,
            );
        }

        // The adapter alone, split, works for every Phi-3: A shared by the parts, B by rows.
        let ad = tmp(&format!("split-adapter-{}", case.name));
        let (ok, err) = merge_into(
            &case,
            &case.dir.join("lora"),
            &ad,
            &["--split-fused", "--adapter-only"],
        );
        if !ok {
            r.fail(format!(
                "{}: --split-fused --adapter-only failed: {err}",
                case.name
            ));
            continue;
        }
        let fused = tensors(&case.dir.join("lora/adapter_model.safetensors"));
        let split = tensors(&ad.join("adapter_model.safetensors"));
        compare(
            &mut r,
            &case.name,
            "split adapter",
            &split,
            &expected_split(&fused, &parts, true),
            0.0,
        );

        let read = |p: &Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap())
                .unwrap()
        };
        let names = |v: &serde_json::Value| -> Vec<String> {
            v["target_modules"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_string())
                .collect()
        };
        let mut want: Vec<String> = names(&read(&case.dir.join("lora")))
            .into_iter()
            .flat_map(|n| match parts.get(n.as_str()) {
                Some(ps) => ps.iter().map(|p| p.0.to_string()).collect(),
                None => vec![n],
            })
            .collect();
        want.sort();
        want.dedup();
        let mut got = names(&read(&ad));
        got.sort();
        r.equal(&case.name, "split target_modules", &got, &want);

        // Numbers: the split adapter on a split (Llama-layout) base gives PEFT's lora.logits.
        // Our Llama runs longrope exactly as our Phi-3 does in a forward; partial rotary it
        // does not have, so that check is left to the fused model.
        if !partial && case.has("lora.logits") {
            r.close(
                &case.name,
                "split adapter on split base vs lora.logits",
                &split_base_logits(&case, &parts, &ad),
                &case.f32("lora.logits").1,
                1e-4,
            );
        }
        let _ = std::fs::remove_dir_all(&out);
        let _ = std::fs::remove_dir_all(&ad);
    }
    r.finish();
}

/// The case's base split into q/k/v and gate/up as a Llama folder, with `adapter` loaded.
fn split_base_logits(
    case: &Case,
    parts: &BTreeMap<&str, Vec<(&str, usize)>>,
    adapter: &Path,
) -> Vec<f32> {
    let dir = tmp(&format!("split-base-{}", case.name));
    std::fs::create_dir_all(&dir).unwrap();
    let base = expected_split(&tensors(&case.dir.join("model.safetensors")), parts, false);
    phi_model::io::write_safetensors(&dir.join("model.safetensors"), &base, None).unwrap();
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.dir.join("config.json")).unwrap())
            .unwrap();
    c["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    c["model_type"] = serde_json::json!("llama");
    std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
    let loaded = phi_model::load(s(&dir), &phi_model::cpu_device()).unwrap();
    let (model, _, _) =
        phi_adapters::peft::load(loaded.model, adapter).unwrap_or_else(|e| panic!("{e}"));
    let (inp, _) = case.batch();
    let l: Tensor<3> = model.forward(&inp, &TapRequest::none()).logits;
    let _ = std::fs::remove_dir_all(&dir);
    l.try_into_vec_as::<f32>().unwrap()
}
