//! Checkpoint layouts: sharded safetensors, f16/bf16 on disk, and the hub cache.

use burn::tensor::Tensor;
use phi_model::resolve::{resolve, resolve_dir};
use phi_model::weights::{SafetensorsSource, TensorSource};
use phi_model::{cpu_device, CausalLm, Inputs, TapRequest};
use phi_testkit::oracle::cases;
use safetensors::tensor::{Dtype, TensorView};
use std::path::{Path, PathBuf};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("phi-model-loading-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn logits(dir: &Path) -> Vec<f32> {
    let r = resolve_dir(dir).unwrap_or_else(|e| panic!("{e}"));
    let m = CausalLm::load(&r.config, r.source.as_ref(), &cpu_device())
        .unwrap_or_else(|e| panic!("{e}"));
    let v = r.config.vocab_size as i64;
    let ids: Vec<i64> = (0..12).map(|i| (i * 37 + 5) % v).collect();
    let out: Tensor<3> = m
        .forward(&Inputs::new(1, 12, ids), &TapRequest::none())
        .logits;
    out.try_into_vec_as::<f32>().unwrap()
}

/// Writes `names` of `src` into `path` with every float converted to `dtype`.
fn write_as(src: &SafetensorsSource, names: &[String], dtype: Dtype, path: &Path) {
    let bufs: Vec<(String, Vec<u8>, Vec<usize>)> = names
        .iter()
        .map(|n| {
            let t = src.load(n).unwrap();
            let bytes = match dtype {
                Dtype::F32 => t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                Dtype::F16 => t
                    .data
                    .iter()
                    .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                    .collect(),
                Dtype::BF16 => t
                    .data
                    .iter()
                    .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                    .collect(),
                _ => unreachable!(),
            };
            (n.clone(), bytes, t.shape)
        })
        .collect();
    let views: Vec<(String, TensorView)> = bufs
        .iter()
        .map(|(n, b, s)| (n.clone(), TensorView::new(dtype, s.clone(), b).unwrap()))
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn sharded_checkpoint_gives_identical_logits() {
    for case in cases() {
        let src = SafetensorsSource::open_dir(&case).unwrap();
        let names = src.names();
        let (a, b) = names.split_at(names.len() / 2);
        let dir = tmp("sharded");
        std::fs::copy(case.join("config.json"), dir.join("config.json")).unwrap();
        let files = [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ];
        write_as(&src, a, Dtype::F32, &dir.join(files[0]));
        write_as(&src, b, Dtype::F32, &dir.join(files[1]));
        let map: serde_json::Map<String, serde_json::Value> = a
            .iter()
            .map(|n| (n.clone(), files[0].into()))
            .chain(b.iter().map(|n| (n.clone(), files[1].into())))
            .collect();
        let index = serde_json::json!({"metadata": {}, "weight_map": map});
        std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
        assert_eq!(logits(&dir), logits(&case), "{}", case.display());
    }
}

#[test]
fn half_precision_checkpoints_load_as_their_exact_values() {
    let case = cases().remove(0);
    let src = SafetensorsSource::open_dir(&case).unwrap();
    let base = logits(&case);
    for (dtype, round) in [
        (
            Dtype::F16,
            (|x: f32| half::f16::from_f32(x).to_f32()) as fn(f32) -> f32,
        ),
        (Dtype::BF16, |x: f32| half::bf16::from_f32(x).to_f32()),
    ] {
        let dir = tmp(&format!("{dtype:?}"));
        std::fs::copy(case.join("config.json"), dir.join("config.json")).unwrap();
        write_as(&src, &src.names(), dtype, &dir.join("model.safetensors"));
        let loaded = SafetensorsSource::open_dir(&dir).unwrap();
        for n in src.names() {
            let want: Vec<f32> = src
                .load(&n)
                .unwrap()
                .data
                .iter()
                .map(|x| round(*x))
                .collect();
            assert_eq!(loaded.load(&n).unwrap().data, want, "{dtype:?} {n}");
        }
        // Rounded weights move the logits a little, never wildly.
        let got = logits(&dir);
        let worst = phi_testkit::oracle::max_abs_diff("logits", &got, &base);
        let bound = if dtype == Dtype::F16 { 0.05 } else { 0.5 };
        assert!(
            worst > 0.0 && worst < bound,
            "{dtype:?}: max logit change {worst}"
        );
    }
}

#[test]
fn hub_ids_resolve_through_the_cache_offline() {
    let case = cases().remove(0);
    let cache = tmp("hub");
    let repo = cache.join("models--acme--tiny-model");
    let snap = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(case.join(f), snap.join(f)).unwrap();
    }
    // Only this test in this binary touches the environment.
    std::env::set_var("HF_HUB_CACHE", &cache);
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let r = resolve("acme/tiny-model").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(r.dir.as_deref(), Some(snap.as_path()));
    let err = resolve("acme/absent-model")
        .err()
        .expect("absent id must fail")
        .to_string();
    assert!(
        err.contains("acme/absent-model") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}
