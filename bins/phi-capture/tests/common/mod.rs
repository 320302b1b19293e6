//! Helpers shared by the phi-capture tests: running the binary, and checking summary.json
//! against norms computed here from tensors.

#![allow(dead_code)]

use phi_testkit::oracle::Report;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("phi-capture-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// (success, stderr) of phi-capture with `args`.
pub fn capture(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_phi-capture"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).trim().to_string(),
    )
}

pub fn read_summary(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap()
}

/// [mean, std, min, max, pos0 (mean over rows), tokens, pos0 of each row] of the per-token L2
/// norms of a [B,T,H] tensor, over positions whose mask is not 0.
pub fn norm_stats(shape: &[usize], data: &[f32], mask: &[i64]) -> Vec<f64> {
    let (b, t, h) = (shape[0], shape[1], shape[2]);
    let norm = |i: usize| {
        let row = &data[i * h..(i + 1) * h];
        row.iter()
            .map(|&x| f64::from(x) * f64::from(x))
            .sum::<f64>()
            .sqrt()
    };
    let kept: Vec<f64> = (0..b * t).filter(|&i| mask[i] != 0).map(norm).collect();
    let n = kept.len() as f64;
    let mean = kept.iter().sum::<f64>() / n;
    let var = kept.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n;
    let pos0: Vec<f64> = (0..b).map(|r| norm(r * t)).collect();
    let mut v = vec![
        mean,
        var.sqrt(),
        kept.iter().cloned().fold(f64::INFINITY, f64::min),
        kept.iter().cloned().fold(f64::NEG_INFINITY, f64::max),
        pos0.iter().sum::<f64>() / b as f64,
        n,
    ];
    v.extend(pos0);
    v
}

/// The same fields read from one statistic object of summary.json.
fn summary_stats(v: &Value) -> Option<Vec<f64>> {
    let mut out = Vec::new();
    for k in ["mean", "std", "min", "max", "pos0", "tokens"] {
        out.push(v.get(k)?.as_f64()?);
    }
    for x in v.get("pos0_per_row")?.as_array()? {
        out.push(x.as_f64()?);
    }
    Some(out)
}

fn check_one(r: &mut Report, case: &str, what: &str, got: Option<&Value>, want: &[f64], tol: f32) {
    match got.and_then(summary_stats) {
        Some(g) => {
            let g: Vec<f32> = g.iter().map(|x| *x as f32).collect();
            let w: Vec<f32> = want.iter().map(|x| *x as f32).collect();
            r.close(case, &format!("summary.json {what}"), &g, &w, tol);
        }
        None => r.fail(format!(
            "{case}: summary.json {what}: missing or incomplete"
        )),
    }
}

/// Every statistic in `summary` against norms of the tensors `get` returns (by capture
/// name), and the entry lists against the tensors that exist: L+1 hidden states, L layers
/// with input_layernorm and, where present, post_attention_layernorm.
pub fn check_summary(
    r: &mut Report,
    case: &str,
    summary: &Value,
    get: impl Fn(&str) -> Option<(Vec<usize>, Vec<f32>)>,
    mask: &[i64],
    tol: f32,
) {
    let real = mask.iter().filter(|m| **m != 0).count();
    r.equal(
        case,
        "summary.json real_tokens",
        &[summary["real_tokens"].as_u64()],
        &[Some(real as u64)],
    );
    let hidden = summary["hidden_states"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut n = 0;
    while let Some((shape, data)) = get(&format!("hidden_states.{n}")) {
        let entry = hidden.get(n);
        r.equal(
            case,
            &format!("hidden_states[{n}].index"),
            &[entry.and_then(|e| e["index"].as_u64())],
            &[Some(n as u64)],
        );
        check_one(
            r,
            case,
            &format!("hidden_states.{n}"),
            entry,
            &norm_stats(&shape, &data, mask),
            tol,
        );
        n += 1;
    }
    r.equal(
        case,
        "summary.json hidden_states entries",
        &[hidden.len()],
        &[n],
    );
    assert!(
        n > 0,
        "{case}: no hidden_states tensor to check the summary against"
    );

    let layers = summary["layers"].as_array().cloned().unwrap_or_default();
    let mut l = 0;
    while get(&format!("input_layernorm.{l}")).is_some() {
        let entry = layers.get(l);
        r.equal(
            case,
            &format!("layers[{l}].layer"),
            &[entry.and_then(|e| e["layer"].as_u64())],
            &[Some(l as u64)],
        );
        for kind in ["input_layernorm", "post_attention_layernorm"] {
            let got = entry.and_then(|e| e.get(kind));
            match get(&format!("{kind}.{l}")) {
                Some((shape, data)) => check_one(
                    r,
                    case,
                    &format!("{kind}.{l}"),
                    got,
                    &norm_stats(&shape, &data, mask),
                    tol,
                ),
                None => r.equal(
                    case,
                    &format!("layers[{l}] has no {kind}"),
                    &[got.is_some()],
                    &[false],
                ),
            }
        }
        l += 1;
    }
    r.equal(case, "summary.json layers", &[layers.len()], &[l]);
}
