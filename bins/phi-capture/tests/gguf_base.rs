//! A GGUF base kept in its blocks captures what its dequantized twin (the same values widened
//! to an F32 file) captures, up to f32 summation order.

mod common;

use common::{capture, tmp};
use phi_model::gguf::{Q4_0, Q4_1, Q8_0};
use phi_model::weights::{SafetensorsSource, TensorSource};
use phi_testkit::oracle::max_scaled_diff;
use phi_testkit::tiny_llama::{write_ids, write_pair};

#[test]
fn a_quantized_gguf_base_captures_its_dequantized_twins_tensors() {
    let dir = tmp("gguf-base");
    std::fs::create_dir_all(&dir).unwrap();
    let ids = dir.join("ids.safetensors");
    write_ids(&ids, 2, 7);
    for (name, ty) in [("Q8_0", Q8_0), ("Q4_0", Q4_0), ("Q4_1", Q4_1)] {
        let (q, w) = write_pair(&dir, ty);
        let run = |model: &std::path::Path, out: &str| {
            let out = dir.join(out);
            let (ok, err) = capture(&[
                "--model",
                model.to_str().unwrap(),
                "--input-ids",
                ids.to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--overwrite",
            ]);
            assert!(ok, "{name}: phi-capture failed: {err}");
            (
                SafetensorsSource::open_files(&[out.join("capture.safetensors")]).unwrap(),
                err,
            )
        };
        let ((got, said), (want, _)) = (run(&q, "q"), run(&w, "w"));
        assert!(
            said.contains(&format!("14 linear weights held quantized ({name})")),
            "{name}: phi-capture does not say the base is quantized: {said}"
        );
        let mut keys = want.names();
        keys.sort();
        assert!(
            keys.iter().any(|k| k == "logits"),
            "{name}: no logits: {keys:?}"
        );
        assert_eq!(
            {
                let mut g = got.names();
                g.sort();
                g
            },
            keys,
            "{name}: the same tensors"
        );
        for k in &keys {
            let (a, b) = (got.load(k).unwrap().data, want.load(k).unwrap().data);
            let worst = max_scaled_diff(&format!("{name} {k}"), &a, &b);
            assert!(worst <= 1e-5, "{name} {k}: differs by {worst}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
