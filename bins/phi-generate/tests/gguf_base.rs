//! A GGUF base kept in its blocks generates what its dequantized twin (the same values widened
//! to an F32 file) generates: greedy ids equal, for each block type the loader keeps. On
//! `--device $PHI_TEST_DEVICE` (the Vulkan stage of .ci/run), where the blocks are widened to
//! f32 as they load.

use phi_model::gguf::{Q4_0, Q4_1, Q8_0};
use phi_testkit::tiny_llama::{write_ids, write_pair};
use std::process::Command;

#[test]
fn a_quantized_gguf_base_generates_its_dequantized_twins_ids() {
    let dir = std::env::temp_dir().join(format!("phi-generate-gguf-{}", std::process::id()));
    let ids = dir.join("ids.safetensors");
    std::fs::create_dir_all(&dir).unwrap();
    write_ids(&ids, 2, 5);
    let device = phi_testkit::test_device_name();
    for (name, ty) in [("Q8_0", Q8_0), ("Q4_0", Q4_0), ("Q4_1", Q4_1)] {
        let (q, w) = write_pair(&dir, ty);
        let run = |model: &std::path::Path| {
            let out = Command::new(env!("CARGO_BIN_EXE_phi-generate"))
                .args(["--model", model.to_str().unwrap(), "--prompt-ids"])
                .arg(&ids)
                .args(["--ids", "--greedy", "--max-new-tokens", "12"])
                .args(["--device", &device])
                .output()
                .unwrap();
            let err = String::from_utf8_lossy(&out.stderr).to_string();
            assert!(out.status.success(), "{name}: phi-generate failed: {err}");
            (String::from_utf8_lossy(&out.stdout).trim().to_string(), err)
        };
        let ((got, said), (want, _)) = (run(&q), run(&w));
        assert_eq!(
            got.lines().count(),
            2,
            "{name}: one line of ids per row: {got}"
        );
        assert_eq!(got, want, "{name}: ids from the blocks vs the widened file");
        let note = match device.as_str() {
            "cpu" => format!("14 linear weights held quantized ({name})"),
            _ => format!("base: {name} weights widened to f32 on this device"),
        };
        assert!(
            said.contains(&note),
            "{name}: phi-generate does not say how it holds the base ({note}): {said}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
