//! Adapters against PEFT's reference tensors, for every case folder found in the oracle
//! directory (tests/fixtures/oracle or PHI_ORACLE_DIR).

use burn::tensor::{DType, Device, Tensor};
use phi_adapters::freeze::{self, Selection};
use phi_adapters::merge;
use phi_adapters::peft::{self, peft_param_name};
use phi_kernels::bf16::Path;
use phi_model::loss::causal_lm_loss;
use phi_model::params::ParamKind;
use phi_model::resolve::resolve_dir;
use phi_model::weights::{SafetensorsSource, TensorSource};
use phi_model::{cpu_device, CausalLm, TapRequest};
use phi_testkit::oracle::{cases, Case, Report};
use std::collections::BTreeMap;

const TOL: f32 = 1e-4;
const LOSS_TOL: f32 = 1e-5;

fn vals<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().expect("readback")
}

fn base(case: &Case, device: &Device) -> CausalLm {
    let res = resolve_dir(&case.dir).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    CausalLm::load(&res.config, res.source.as_ref(), device)
        .unwrap_or_else(|e| panic!("{}: {e}", case.name))
}

/// The gradient of every parameter, by HF name, transposed to HF layout.
fn grads_by_name(model: &CausalLm, loss: Tensor<1>) -> BTreeMap<String, Vec<f32>> {
    let grads = loss.backward();
    let mut out = BTreeMap::new();
    let mut model = model.clone();
    for p in model.params() {
        let t: Option<Tensor<2>> = match p.kind {
            ParamKind::LoraA | ParamKind::LoraB => {
                let module = p.name.rsplit_once(".lora_").map(|x| x.0).unwrap();
                let lin = model.linear_mut(module).unwrap();
                let l = lin.lora.as_ref().unwrap();
                let w = if p.kind == ParamKind::LoraA {
                    &l.a
                } else {
                    &l.b
                };
                w.val().grad(&grads).map(|g| g.transpose())
            }
            _ => None,
        };
        if let Some(g) = t {
            out.insert(p.name.clone(), vals(g));
        }
    }
    out
}

/// The case's base with the PEFT adapter in `folder`, LoRA factors trainable; None (after
/// reporting why) when it cannot be loaded.
fn adapted(case: &Case, dir: &std::path::Path, r: &mut Report) -> Option<CausalLm> {
    let name = &case.name;
    let device = phi_testkit::device().autodiff();
    let (model, _, paths) = match peft::load(base(case, &device), dir) {
        Ok(x) => x,
        Err(e) => {
            r.fail(format!("{name}/{}: cannot load: {e}", dir.display()));
            return None;
        }
    };
    let names = freeze::trainable_names(
        &model,
        &Selection::Lora {
            modules_to_save: vec![],
        },
    )
    .unwrap();
    assert_eq!(names.len(), 2 * paths.len(), "{name}: A and B per module");
    Some(freeze::apply(model, &names))
}

/// True when the case holds every file and expected key a check reads; otherwise each missing
/// one is a failure: the oracle's layout has them in every case, so none is passed over.
fn has_all(case: &Case, files: &[String], keys: &[String], r: &mut Report) -> bool {
    let mut ok = true;
    for f in files {
        if !case.dir.join(f).exists() {
            r.fail(format!("{}: no {f}", case.name));
            ok = false;
        }
    }
    for k in keys {
        if !case.has(k) {
            r.fail(format!("{}: {k} not in expected.safetensors", case.name));
            ok = false;
        }
    }
    ok
}

fn check_adapter(case: &Case, folder: &str, r: &mut Report) {
    let name = &case.name;
    let dir = case.dir.join(folder);
    let (files, keys) = (
        [format!("{folder}/adapter_config.json")],
        [format!("{folder}.logits"), format!("{folder}.loss")],
    );
    if !has_all(case, &files, &keys, r) {
        return;
    }
    let Some(model) = adapted(case, &dir, r) else {
        return;
    };
    let (inp, labels) = case.batch();
    let logits = model.forward(&inp, &TapRequest::none()).logits;
    r.close(
        name,
        &format!("{folder}.logits"),
        &vals(logits.clone()),
        &case.f32(&format!("{folder}.logits")).1,
        TOL,
    );
    let loss = causal_lm_loss(logits, &labels);
    r.close(
        name,
        &format!("{folder}.loss"),
        &vals(loss.clone()),
        &case.f32(&format!("{folder}.loss")).1,
        LOSS_TOL,
    );
    let grads = grads_by_name(&model, loss);
    let params = model.params();
    let expected = case.keys(&format!("{folder}.grad."));
    if expected.is_empty() {
        r.fail(format!("{name}: no {folder}.grad.* keys"));
        return;
    }
    r.equal(
        name,
        &format!("{folder}: number of LoRA gradients"),
        &[grads.len()],
        &[expected.len()],
    );
    for p in params
        .iter()
        .filter(|p| !matches!(p.kind, ParamKind::Base { .. }))
    {
        let key = format!(
            "{folder}.grad.{}",
            peft_param_name(&p.name, p.kind, "default")
        );
        match (grads.get(&p.name), case.has(&key)) {
            (Some(g), true) => r.close_rel(name, &key, g, &case.f32(&key).1, 1e-5, 1e-4),
            (None, _) => r.fail(format!("{name}: {key}: no gradient")),
            (_, false) => r.fail(format!("{name}: {key}: not in expected.safetensors")),
        }
    }
}

/// How a half-precision run computes: Burn's autocast in a dtype, or (phi-train's --bf16 on a
/// CPU with bf16 matrix units) the frozen base packed in bf16 for one of our kernel paths.
#[derive(Clone, Copy, Debug)]
enum Half {
    Autocast(DType),
    Kernels(Path),
}

/// A half-precision run: f32 logits and f32 gradients for the f32 LoRA factors, within the
/// half type's precision of PEFT's f32 numbers: loss to `loss_tol` relative, the whole LoRA
/// gradient to cosine ≥ `cos_min`.
fn check_autocast(case: &Case, half: Half, loss_tol: f32, cos_min: f64, r: &mut Report) {
    let name = format!("{} ({half:?})", case.name);
    let dir = case.dir.join("lora");
    let files = ["lora/adapter_config.json".to_string()];
    if !has_all(case, &files, &["lora.loss".to_string()], r) {
        return;
    }
    let Some(mut model) = adapted(case, &dir, r) else {
        return;
    };
    let (inp, labels) = case.batch();
    let f32_logits = vals(model.forward(&inp, &TapRequest::none()).logits);
    let _autocast = match half {
        Half::Autocast(dtype) => Some(phi_model::precision::autocast(Some(dtype))),
        Half::Kernels(path) => {
            let n = model.pack_bf16(path);
            r.equal(&name, "packed weights", &[n > 0], &[true]);
            None
        }
    };
    let logits = model.forward(&inp, &TapRequest::none()).logits;
    r.equal(&name, "logits dtype", &[logits.dtype()], &[DType::F32]);
    // Half matmuls must show in the numbers: compared with the same model's f32 logits over
    // the whole tensor, not one loss against PEFT's (an f16 loss can land within 1e-5 of
    // the f32 one by chance: measured 3.7e-6 relative on a random GQA Llama).
    let moved = phi_testkit::oracle::max_abs_diff("logits", &vals(logits.clone()), &f32_logits);
    r.equal(&name, "logits moved off f32", &[moved > 0.0], &[true]);
    let mut loss = causal_lm_loss(logits, &labels);
    if let Half::Kernels(_) = half {
        // The trainer's loss: the head fused with the cross-entropy where the head is a
        // frozen bf16 packing (per row the same sums as head then loss: equal to the bit).
        if model.fused_head().is_none() {
            eprintln!("{name}: head loss NOT FUSED (the head has a bias or an adapter)");
        }
        let emb = model.embed(&inp);
        let (h, _) = model.forward_hidden(emb, &inp, &TapRequest::none(), None);
        let (sum, count) = model.loss_sum(h, &labels);
        let fused = sum / count.max(1) as f64;
        let (a, b) = (vals(fused.clone()), vals(loss));
        r.close_rel(&name, "loss_sum = loss of the logits", &a, &b, 0.0, 1e-6);
        loss = fused;
    }
    let want = case.f32("lora.loss").1;
    r.close_rel(
        &name,
        "lora.loss",
        &vals(loss.clone()),
        &want,
        0.0,
        loss_tol,
    );
    let grads = grads_by_name(&model, loss);
    let (mut dot, mut gg, mut ww) = (0.0f64, 0.0f64, 0.0f64);
    for (pname, g) in &grads {
        let p = model
            .params()
            .into_iter()
            .find(|p| &p.name == pname)
            .unwrap();
        let key = format!("lora.grad.{}", peft_param_name(&p.name, p.kind, "default"));
        for (a, b) in g.iter().zip(&case.f32(&key).1) {
            dot += *a as f64 * *b as f64;
            gg += (*a as f64).powi(2);
            ww += (*b as f64).powi(2);
        }
    }
    let cos = dot / (gg.sqrt() * ww.sqrt()).max(1e-30);
    r.equal(&name, "has LoRA gradients", &[grads.is_empty()], &[false]);
    r.close(
        &name,
        "gradient cosine",
        &[cos as f32],
        &[1.0],
        1.0 - cos_min as f32,
    );
}

/// Full fine-tuning under `--bf16`: every linear weight (and a tied head's table) trains on
/// the bf16 kernels, rounded per call. The loss is within bf16's precision of the same
/// model's f32 one (whose gradients the f32 tests hold to transformers'), and the gradient of
/// every linear weight and the embedding, taken together, has cosine ≥ 0.995 with f32's.
fn check_full_kernels(case: &Case, path: Path, r: &mut Report) {
    let name = format!("{} (full, {})", case.name, path.name());
    let device = cpu_device().autodiff();
    let (inp, labels) = case.batch();
    let mut run = |kernels: bool| {
        let mut model = base(case, &device);
        let all = freeze::trainable_names(&model, &Selection::Full).unwrap();
        model = freeze::apply(model, &all);
        if kernels {
            model.pack_bf16(path);
            r.equal(
                &name,
                "weights on the kernels",
                &[model.bf16_trainable() > 0],
                &[true],
            );
        }
        let loss = causal_lm_loss(model.forward(&inp, &TapRequest::none()).logits, &labels);
        let loss_value = vals(loss.clone());
        let grads = loss.backward();
        let mut g = Vec::new();
        for layer in &model.model.layers {
            for (_, l) in layer.block().linears() {
                g.extend(l.weight.val().grad(&grads).map(vals).unwrap_or_default());
            }
        }
        let table = model.model.embed_tokens.weight.val();
        g.extend(table.grad(&grads).map(vals).unwrap_or_default());
        (loss_value, g)
    };
    let (want_loss, want) = run(false);
    let (loss, got) = run(true);
    r.close_rel(&name, "full loss vs f32", &loss, &want_loss, 0.0, 5e-3);
    r.equal(&name, "gradient count", &[got.len()], &[want.len()]);
    let dot: f64 = got
        .iter()
        .zip(&want)
        .map(|(a, b)| *a as f64 * *b as f64)
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let cos = dot / (norm(&got) * norm(&want)).max(1e-30);
    r.close(&name, "full gradient cosine", &[cos as f32], &[1.0], 0.005);
    r.equal(&name, "gradients moved off f32", &[got != want], &[true]);
}

/// Frozen base: after backward, no base weight holds a gradient.
fn check_base_frozen(case: &Case, r: &mut Report) {
    let dir = case.dir.join("lora");
    if !has_all(case, &["lora".to_string()], &[], r) {
        return;
    }
    let device = phi_testkit::device().autodiff();
    let (model, _, _) = peft::load(base(case, &device), &dir).unwrap();
    let names = freeze::trainable_names(
        &model,
        &Selection::Lora {
            modules_to_save: vec![],
        },
    )
    .unwrap();
    let model = freeze::apply(model, &names);
    let (inp, labels) = case.batch();
    let loss = causal_lm_loss(model.forward(&inp, &TapRequest::none()).logits, &labels);
    // Freezing changes which weights learn, never the function.
    r.close(
        &case.name,
        "frozen-base lora.loss",
        &vals(loss.clone()),
        &case.f32("lora.loss").1,
        LOSS_TOL,
    );
    let grads = loss.backward();
    let lin = &model.linears()[0].1;
    r.equal(
        &case.name,
        "base linear weight gradient under LoRA",
        &[lin.weight.val().grad(&grads).is_some()],
        &[false],
    );
    r.equal(
        &case.name,
        "embedding gradient under LoRA",
        &[model.model.embed_tokens.weight.val().grad(&grads).is_some()],
        &[false],
    );
}

/// Norm-only: gradients reach exactly the norm weights (and LayerNorm biases).
fn check_norm_only(case: &Case, r: &mut Report) {
    let device = phi_testkit::device().autodiff();
    let model = base(case, &device);
    let names = freeze::trainable_names(&model, &Selection::NormOnly).unwrap();
    let expected_norms = model.norm_params().len();
    r.equal(
        &case.name,
        "norm-only trainable count",
        &[names.len()],
        &[expected_norms],
    );
    let model = freeze::apply(model, &names);
    let (inp, labels) = case.batch();
    let loss = causal_lm_loss(model.forward(&inp, &TapRequest::none()).logits, &labels);
    // Freezing changes which weights learn, never the function.
    r.close(
        &case.name,
        "norm-only loss",
        &vals(loss.clone()),
        &case.f32("loss").1,
        LOSS_TOL,
    );
    let grads = loss.backward();
    let with_grad: Vec<String> = model
        .norm_params()
        .into_iter()
        .filter(|(_, w)| {
            w.grad(&grads)
                .is_some_and(|g| vals(g).iter().any(|v| *v != 0.0))
        })
        .map(|(n, _)| n)
        .collect();
    r.equal(
        &case.name,
        "norm weights with a gradient",
        &with_grad,
        &names,
    );
    let others = [
        model.model.embed_tokens.weight.val().grad(&grads).is_some(),
        model
            .linears()
            .iter()
            .any(|(_, l)| l.weight.val().grad(&grads).is_some()),
    ];
    r.equal(&case.name, "non-norm gradients", &others, &[false, false]);
}

fn check_merge(case: &Case, r: &mut Report) {
    let merged_file = case.dir.join("lora_merged/model.safetensors");
    if !has_all(case, &["lora_merged/model.safetensors".to_string()], &[], r) {
        return;
    }
    let (model, _, _) = peft::load(base(case, &cpu_device()), &case.dir.join("lora")).unwrap();
    let merged = merge::merge(model);
    let want = SafetensorsSource::open_files(&[merged_file]).unwrap();
    let got: BTreeMap<String, _> = merged.hf_tensors().into_iter().collect();
    let mut want_keys = want.names();
    want_keys.sort();
    r.equal(
        &case.name,
        "merged key set",
        &got.keys().cloned().collect::<Vec<_>>(),
        &want_keys,
    );
    for k in want_keys {
        if let Some(t) = got.get(&k) {
            r.close(
                &case.name,
                &format!("lora_merged {k}"),
                &t.data,
                &want.load(&k).unwrap().data,
                1e-6,
            );
        }
    }
}

fn check_round_trip(case: &Case, r: &mut Report) {
    for folder in ["lora", "rslora"] {
        let dir = case.dir.join(folder);
        if !has_all(case, &[folder.to_string()], &[], r) {
            continue;
        }
        let (model, cfg, _) = peft::load(base(case, &cpu_device()), &dir).unwrap();
        let out = tempdir(&format!("rt-{}-{folder}", case.name));
        peft::save(&model, &cfg, &out).unwrap();
        let read = |p: &std::path::Path| {
            let bytes = std::fs::read(p.join("adapter_model.safetensors")).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let mut m: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            for (k, v) in st.tensors() {
                m.insert(k, v.data().to_vec());
            }
            m
        };
        let (a, b) = (read(&dir), read(&out));
        r.equal(
            &case.name,
            &format!("{folder} round trip keys"),
            &b.keys().collect::<Vec<_>>(),
            &a.keys().collect::<Vec<_>>(),
        );
        let same = a.iter().all(|(k, v)| b.get(k) == Some(v));
        r.equal(
            &case.name,
            &format!("{folder} round trip bytes"),
            &[same],
            &[true],
        );
        let json = |p: &std::path::Path| -> serde_json::Value {
            serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap())
                .unwrap()
        };
        let (ja, jb) = (json(&dir), json(&out));
        for (k, v) in ja.as_object().unwrap() {
            let w = &jb[k];
            let equal = if k == "target_modules" {
                let set = |x: &serde_json::Value| {
                    let mut s: Vec<String> = x
                        .as_array()
                        .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
                        .unwrap_or_default();
                    s.sort();
                    s
                };
                set(v) == set(w)
            } else {
                v == w
            };
            if !equal {
                r.fail(format!(
                    "{}: {folder} round trip: adapter_config {k}: {v} became {w}",
                    case.name
                ));
            } else {
                r.checked += 1;
            }
        }
        // And the re-read adapter gives the same scale: logits equal bit for bit.
        let (again, cfg2, _) = peft::load(base(case, &cpu_device()), &out).unwrap();
        assert_eq!(cfg.scale_for("x"), cfg2.scale_for("x"));
        let (inp, _) = case.batch();
        let l1 = vals(model.forward(&inp, &TapRequest::none()).logits);
        let l2 = vals(again.forward(&inp, &TapRequest::none()).logits);
        r.close(
            &case.name,
            &format!("{folder} reloaded logits"),
            &l2,
            &l1,
            0.0,
        );
    }
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("phi-adapters-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn lora_and_rslora_match_peft() {
    let mut r = Report::default();
    for dir in cases() {
        let case = Case::open(&dir);
        check_adapter(&case, "lora", &mut r);
        check_adapter(&case, "rslora", &mut r);
        check_base_frozen(&case, &mut r);
    }
    r.finish();
}

/// Each half type the test device has kernels for (Vulkan: f16 only, WGSL has no bf16; a type
/// it lacks is reported by name as not run, and phi-train trains in f32 there instead).
#[test]
fn autocast_stays_within_half_precision_of_peft() {
    let mut r = Report::default();
    // Measured on the fixtures: bf16 ≤ 6.2e-4 rel, cos ≥ 0.99968; f16 ≤ 1.2e-4, 0.999995.
    let bounds = [(DType::BF16, 5e-3, 0.995), (DType::F16, 1e-3, 0.9999)];
    let device = phi_testkit::device();
    let run: Vec<_> = bounds
        .into_iter()
        .filter(|(dtype, ..)| {
            let has = device.supports_dtype(*dtype);
            if !has {
                eprintln!(
                    "autocast in {dtype:?}: NOT RUN (device {device:?} has no {dtype:?} kernels)"
                );
            }
            has
        })
        .collect();
    assert!(!run.is_empty(), "device {device:?} has no half type at all");
    for dir in cases() {
        let case = Case::open(&dir);
        for &(dtype, loss_tol, cos_min) in &run {
            check_autocast(&case, Half::Autocast(dtype), loss_tol, cos_min, &mut r);
        }
    }
    r.finish();
}

/// phi-train's --bf16 on the CPU's matrix units: every kernel path this CPU has, held to the
/// same bounds as bf16 autocast; a path it lacks is reported by name as not run.
#[test]
fn bf16_kernels_stay_within_bf16_precision_of_peft() {
    let mut r = Report::default();
    for path in [Path::Amx, Path::Avx512Bf16, Path::Scalar] {
        if !path.available() {
            eprintln!(
                "bf16 kernel path {}: NOT RUN (this CPU lacks it)",
                path.name()
            );
            continue;
        }
        for dir in cases() {
            check_autocast(&Case::open(&dir), Half::Kernels(path), 5e-3, 0.995, &mut r);
            check_full_kernels(&Case::open(&dir), path, &mut r);
        }
    }
    r.finish();
}

#[test]
fn norm_only_trains_only_norms() {
    let mut r = Report::default();
    for dir in cases() {
        check_norm_only(&Case::open(&dir), &mut r);
    }
    r.finish();
}

#[test]
fn merge_matches_peft_merge_and_unload() {
    let mut r = Report::default();
    for dir in cases() {
        check_merge(&Case::open(&dir), &mut r);
    }
    r.finish();
}

#[test]
fn peft_round_trip_is_exact() {
    let mut r = Report::default();
    for dir in cases() {
        check_round_trip(&Case::open(&dir), &mut r);
    }
    r.finish();
}
