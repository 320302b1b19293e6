//! phi-merge end to end on every oracle case: the merged folder equals PEFT's
//! `merge_and_unload` output, shards and dtypes load back, `--split-fused` keeps the numbers,
//! and bad adapters fail with one line naming the tensor.

use burn::tensor::Tensor;
use phi_model::oracle::{cases, Case, Report};
use phi_model::resolve::resolve_dir;
use phi_model::weights::{SafetensorsSource, TensorSource};
use phi_model::{cpu_device, Arch, CausalLm, Inputs, ModelConfig, RopeScaling, TapRequest};
use std::path::{Path, PathBuf};
use std::process::Command;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("phi-merge-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn merge(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_phi-merge"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

/// phi-merge of `case`'s base with `adapter` into `out`, plus `extra` flags.
fn merge_into(case: &Case, adapter: &Path, out: &Path, extra: &[&str]) -> (bool, String) {
    let mut args = vec![
        "--model",
        s(&case.dir),
        "--adapter",
        s(adapter),
        "--out",
        s(out),
    ];
    args.extend_from_slice(extra);
    merge(&args)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn logits(dir: &Path, case: &Case) -> Vec<f32> {
    let res = resolve_dir(dir).unwrap_or_else(|e| panic!("{e}"));
    let model = CausalLm::load(&res.config, res.source.as_ref(), &cpu_device()).unwrap();
    let (shape, ids) = case.input("input_ids").unwrap();
    let mut inp = Inputs::new(shape[0], shape[1], ids);
    if let Some((_, m)) = case.input("attention_mask") {
        inp = inp.with_mask(m);
    }
    let l: Tensor<3> = model.forward(&inp, &TapRequest::none()).logits;
    l.try_into_vec_as::<f32>().unwrap()
}

fn lora_cases() -> Vec<Case> {
    cases()
        .into_iter()
        .filter(|d| d.join("lora/adapter_config.json").exists())
        .map(|d| Case::open(&d))
        .collect()
}

#[test]
fn merged_folder_equals_peft_merge_and_unload() {
    let mut r = Report::default();
    for case in lora_cases() {
        let want_file = case.dir.join("lora_merged/model.safetensors");
        if !want_file.exists() {
            continue;
        }
        let out = tmp(&format!("m-{}", case.name));
        let (ok, err) = merge_into(&case, &case.dir.join("lora"), &out, &[]);
        if !ok {
            r.fail(format!("{}: phi-merge failed: {err}", case.name));
            continue;
        }
        let got = SafetensorsSource::open_files(&[out.join("model.safetensors")]).unwrap();
        let want = SafetensorsSource::open_files(&[want_file]).unwrap();
        let (mut gk, mut wk) = (got.names(), want.names());
        gk.sort();
        wk.sort();
        r.equal(&case.name, "merged key set", &gk, &wk);
        for k in &wk {
            if got.contains(k) {
                r.close(
                    &case.name,
                    &format!("merged {k}"),
                    &got.load(k).unwrap().data,
                    &want.load(k).unwrap().data,
                    1e-6,
                );
            }
        }
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        r.equal(
            &case.name,
            "config.json dtype",
            &[cfg["dtype"].as_str().or(cfg["torch_dtype"].as_str())],
            &[Some("float32")],
        );
        r.equal(
            &case.name,
            "generation_config.json copied",
            &[out.join("generation_config.json").exists()],
            &[case.dir.join("generation_config.json").exists()],
        );
        if case.has("lora.logits") {
            // PEFT saw merged and unmerged logits differ by up to 1.9e-5.
            r.close(
                &case.name,
                "merged folder logits vs lora.logits",
                &logits(&out, &case),
                &case.f32("lora.logits").1,
                1e-4,
            );
        }
    }
    r.finish();
}

#[test]
fn shards_and_half_dtypes_load_back() {
    let mut r = Report::default();
    for case in lora_cases().into_iter().take(2) {
        let out = tmp(&format!("shard-{}", case.name));
        let (ok, err) = merge_into(
            &case,
            &case.dir.join("lora"),
            &out,
            &["--shard-size", "200KB", "--dtype", "bf16"],
        );
        assert!(ok, "{}: {err}", case.name);
        let index = out.join("model.safetensors.index.json");
        let shards = std::fs::read_dir(&out)
            .unwrap()
            .filter(|e| {
                let n = e.as_ref().unwrap().file_name();
                let n = n.to_string_lossy();
                n.starts_with("model-") && n.ends_with(".safetensors")
            })
            .count();
        r.equal(&case.name, "index written", &[index.exists()], &[true]);
        r.equal(&case.name, "several shards", &[shards > 1], &[true]);
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap())
                .unwrap();
        r.equal(
            &case.name,
            "config dtype bf16",
            &[cfg["dtype"].as_str().or(cfg["torch_dtype"].as_str())],
            &[Some("bfloat16")],
        );
        // The shards must hold exactly the f32 merge rounded to bf16 (round to nearest even).
        let out32 = tmp(&format!("shard32-{}", case.name));
        let (ok, err) = merge_into(&case, &case.dir.join("lora"), &out32, &["--dtype", "f32"]);
        assert!(ok, "{}: {err}", case.name);
        let full = SafetensorsSource::open_files(&[out32.join("model.safetensors")]).unwrap();
        let sharded = resolve_dir(&out).unwrap().source;
        let mut names = full.names();
        names.sort();
        let mut got_names = sharded.names();
        got_names.sort();
        r.equal(&case.name, "same tensor names", &got_names, &names);
        for n in &names {
            let want: Vec<f32> = full
                .load(n)
                .unwrap()
                .data
                .iter()
                .map(|x| half::bf16::from_f32(*x).to_f32())
                .collect();
            r.equal(
                &case.name,
                &format!("{n} is the bf16 rounding"),
                &sharded.load(n).unwrap().data,
                &want,
            );
        }
        // bf16 keeps 8 bits of mantissa: logits stay within a few percent of their range.
        let want = case.f32("lora.logits").1;
        let range = want.iter().fold(0f32, |m, x| m.max(x.abs()));
        r.close(
            &case.name,
            "bf16 sharded logits vs lora.logits (5% of max |logit|)",
            &logits(&out, &case),
            &want,
            0.05 * range,
        );
    }
    r.finish();
}

#[test]
fn split_fused_phi3_keeps_the_numbers() {
    let mut r = Report::default();
    for case in lora_cases() {
        let cfg = ModelConfig::from_file(&case.dir.join("config.json")).unwrap();
        if cfg.arch != Arch::Phi3 {
            continue;
        }
        let out = tmp(&format!("split-{}", case.name));
        let (ok, err) = merge_into(&case, &case.dir.join("lora"), &out, &["--split-fused"]);
        let longrope = matches!(cfg.rope_scaling, RopeScaling::LongRope { .. });
        if longrope {
            r.equal(&case.name, "split longrope refused", &[ok], &[false]);
            if !err.contains("--split-fused") || err.lines().count() != 1 {
                r.fail(format!("{}: unclear error: {err}", case.name));
            }
            continue;
        }
        assert!(ok, "{}: {err}", case.name);
        let names = SafetensorsSource::open_files(&[out.join("model.safetensors")])
            .unwrap()
            .names();
        r.equal(
            &case.name,
            "no fused keys left",
            &[names
                .iter()
                .any(|n| n.contains("qkv_proj") || n.contains("gate_up_proj"))],
            &[false],
        );
        r.close(
            &case.name,
            "split merged logits vs lora.logits",
            &logits(&out, &case),
            &case.f32("lora.logits").1,
            1e-4,
        );
        // The adapter alone, split: A shared by q/k/v, B split by rows.
        let ad = tmp(&format!("split-adapter-{}", case.name));
        let (ok, err) = merge_into(
            &case,
            &case.dir.join("lora"),
            &ad,
            &["--split-fused", "--adapter-only"],
        );
        assert!(ok, "{}: {err}", case.name);
        let split = SafetensorsSource::open_files(&[ad.join("adapter_model.safetensors")]).unwrap();
        let fused =
            SafetensorsSource::open_files(&[case.dir.join("lora/adapter_model.safetensors")])
                .unwrap();
        let p = "base_model.model.model.layers.0";
        let a = fused
            .load(&format!("{p}.self_attn.qkv_proj.lora_A.weight"))
            .unwrap();
        let b = fused
            .load(&format!("{p}.self_attn.qkv_proj.lora_B.weight"))
            .unwrap();
        let mut rows = Vec::new();
        for part in ["q_proj", "k_proj", "v_proj"] {
            let sa = split
                .load(&format!("{p}.self_attn.{part}.lora_A.weight"))
                .unwrap();
            r.equal(&case.name, &format!("{part} shares A"), &sa.data, &a.data);
            rows.extend(
                split
                    .load(&format!("{p}.self_attn.{part}.lora_B.weight"))
                    .unwrap()
                    .data,
            );
        }
        r.equal(
            &case.name,
            "q/k/v B rows rebuild the fused B",
            &rows,
            &b.data,
        );
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(ad.join("adapter_config.json")).unwrap())
                .unwrap();
        let mut t: Vec<&str> = cfg["target_modules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap())
            .collect();
        t.sort();
        r.equal(
            &case.name,
            "split targets",
            &t,
            &[
                "down_proj",
                "gate_proj",
                "k_proj",
                "o_proj",
                "q_proj",
                "up_proj",
                "v_proj",
            ],
        );
    }
    r.finish();
}

#[test]
fn existing_output_and_bad_adapter_fail_with_one_line() {
    let case = lora_cases().into_iter().next().expect("a case with lora/");
    let out = tmp("exists");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let (ok, err) = merge_into(&case, &case.dir.join("lora"), &out, &[]);
    assert!(
        !ok && err.contains("not empty") && err.lines().count() == 1,
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );

    // An adapter whose A is one input short of the base layer.
    let bad = tmp("bad-adapter");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::copy(
        case.dir.join("lora/adapter_config.json"),
        bad.join("adapter_config.json"),
    )
    .unwrap();
    let src =
        SafetensorsSource::open_files(&[case.dir.join("lora/adapter_model.safetensors")]).unwrap();
    let mut names = src.names();
    names.sort();
    let victim = names.iter().find(|n| n.contains("lora_A")).unwrap().clone();
    let mut map = std::collections::BTreeMap::new();
    for n in &names {
        let t = src.load(n).unwrap();
        let (shape, data) = if *n == victim {
            let (r, c) = (t.shape[0], t.shape[1] - 1);
            (vec![r, c], t.data[..r * c].to_vec())
        } else {
            (t.shape, t.data)
        };
        map.insert(n.clone(), (shape, data));
    }
    phi_model::io::write_safetensors(&bad.join("adapter_model.safetensors"), &map, None).unwrap();
    let (ok, err) = merge_into(&case, &bad, &tmp("bad-out"), &[]);
    assert!(!ok, "a misshaped adapter must fail");
    assert!(
        err.contains(&victim)
            && err.contains("adapter_model.safetensors")
            && err.lines().count() == 1,
        "{err}"
    );

    // A config that asks for what is not supported names the key.
    let dora = tmp("dora");
    std::fs::create_dir_all(&dora).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(case.dir.join("lora/adapter_config.json")).unwrap(),
    )
    .unwrap();
    cfg["use_dora"] = serde_json::json!(true);
    std::fs::write(dora.join("adapter_config.json"), cfg.to_string()).unwrap();
    let (ok, err) = merge_into(&case, &dora, &tmp("dora-out"), &[]);
    assert!(
        !ok && err.contains("use_dora") && err.contains("adapter_config.json"),
        "{err}"
    );
}
