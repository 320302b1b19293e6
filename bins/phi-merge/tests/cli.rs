//! phi-merge end to end on every oracle case: the merged folder equals PEFT's
//! `merge_and_unload` output, shards and dtypes load back, and bad adapters fail with one
//! line naming the tensor. `--split-fused` is in split.rs.

mod common;

use common::{logits, lora_cases, merge_into, tmp};
use phi_model::resolve::resolve_dir;
use phi_model::weights::{SafetensorsSource, TensorSource};
use phi_testkit::oracle::Report;

#[test]
fn merged_folder_equals_peft_merge_and_unload() {
    let mut r = Report::default();
    for case in lora_cases() {
        let want_file = case.dir.join("lora_merged/model.safetensors");
        if !want_file.exists() {
            r.fail(format!("{}: no lora_merged/model.safetensors", case.name));
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

#[test]
fn overwrite_removes_the_previous_exports_shards() {
    let case = lora_cases().into_iter().next().expect("a case with lora/");
    let out = tmp("overwrite-shards");
    let adapter = case.dir.join("lora");
    // Sharded first (tiny shards), then one file over it: no shard or index may remain.
    let (ok, err) = merge_into(&case, &adapter, &out, &["--shard-size", "100KB"]);
    assert!(ok, "{err}");
    assert!(out.join("model.safetensors.index.json").exists());
    let (ok, err) = merge_into(&case, &adapter, &out, &["--overwrite"]);
    assert!(ok, "{err}");
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("safetensors"))
        .collect();
    names.sort();
    assert_eq!(names, ["model.safetensors"]);
    // And back: one file replaced by shards leaves no model.safetensors beside the index.
    let (ok, err) = merge_into(
        &case,
        &adapter,
        &out,
        &["--overwrite", "--shard_size", "100KB"],
    );
    assert!(ok, "{err}");
    assert!(!out.join("model.safetensors").exists());
    assert!(out.join("model.safetensors.index.json").exists());
    let _ = std::fs::remove_dir_all(&out);
}
