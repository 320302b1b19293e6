//! Access to reference-tensor folders (the transformers oracle) for tests in every crate:
//! case discovery, tensor reading and tolerance checks. Case folders are found, never named.

use crate::weights::{read_i64, SafetensorsSource, TensorSource};
use std::path::{Path, PathBuf};

/// `PHI_ORACLE_DIR`, else the copy under tests/fixtures/oracle.
pub fn oracle_dir() -> PathBuf {
    match std::env::var("PHI_ORACLE_DIR") {
        Ok(d) if !d.is_empty() => PathBuf::from(d),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/oracle"),
    }
}

/// Every sub-folder holding a config.json and expected.safetensors, sorted. A folder with
/// only one of the two is a broken case and fails loudly rather than being skipped.
pub fn cases() -> Vec<PathBuf> {
    let dir = oracle_dir();
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: cannot list oracle folder: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let (c, e) = (
                p.join("config.json").exists(),
                p.join("expected.safetensors").exists(),
            );
            assert!(
                c == e,
                "{}: an oracle case needs both config.json and expected.safetensors",
                p.display()
            );
            c
        })
        .collect();
    out.sort();
    assert!(
        !out.is_empty(),
        "{}: no oracle case folders found",
        dir.display()
    );
    out
}

pub struct Case {
    pub dir: PathBuf,
    pub name: String,
    expected: SafetensorsSource,
}

impl Case {
    pub fn open(dir: &Path) -> Case {
        let expected = SafetensorsSource::open_files(&[dir.join("expected.safetensors")])
            .unwrap_or_else(|e| panic!("{e}"));
        Case {
            dir: dir.to_path_buf(),
            name: dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            expected,
        }
    }
    pub fn has(&self, key: &str) -> bool {
        self.expected.contains(key)
    }
    /// Expected keys starting with `prefix`.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        self.expected
            .names()
            .into_iter()
            .filter(|k| k.starts_with(prefix))
            .collect()
    }
    pub fn f32(&self, key: &str) -> (Vec<usize>, Vec<f32>) {
        let t = self
            .expected
            .load(key)
            .unwrap_or_else(|e| panic!("case {}: {e}", self.name));
        (t.shape, t.data)
    }
    pub fn expected_ids(&self, key: &str) -> Option<(Vec<usize>, Vec<i64>)> {
        read_i64(&self.dir.join("expected.safetensors"), key).unwrap_or_else(|e| panic!("{e}"))
    }
    pub fn input(&self, key: &str) -> Option<(Vec<usize>, Vec<i64>)> {
        read_i64(&self.dir.join("inputs.safetensors"), key).unwrap_or_else(|e| panic!("{e}"))
    }
    /// The case's batch (ids with its attention mask) and its labels.
    pub fn batch(&self) -> (crate::Inputs, Vec<i64>) {
        let (shape, ids) = self.input("input_ids").expect("input_ids");
        let mut inp = crate::Inputs::new(shape[0], shape[1], ids);
        if let Some((_, m)) = self.input("attention_mask") {
            inp = inp.with_mask(m);
        }
        (inp, self.input("labels").map(|l| l.1).unwrap_or_default())
    }
}

/// Largest |a-b|; panics with the key when shapes differ.
pub fn max_abs_diff(key: &str, got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(
        got.len(),
        want.len(),
        "{key}: {} values, expected {}",
        got.len(),
        want.len()
    );
    got.iter()
        .zip(want)
        .map(|(a, b)| {
            if a.is_nan() || b.is_nan() {
                f32::INFINITY
            } else {
                (a - b).abs()
            }
        })
        .fold(0.0, f32::max)
}

/// Collects failures so one run reports every mismatching key of every case.
#[derive(Default)]
pub struct Report {
    pub failures: Vec<String>,
    pub checked: usize,
}

impl Report {
    /// Counts a check; false (with a failure recorded) when the lengths differ.
    fn same_len(&mut self, case: &str, key: &str, got: usize, want: usize) -> bool {
        self.checked += 1;
        if got != want {
            self.failures
                .push(format!("{case}: {key}: {got} values, expected {want}"));
        }
        got == want
    }

    pub fn close(&mut self, case: &str, key: &str, got: &[f32], want: &[f32], tol: f32) {
        if !self.same_len(case, key, got.len(), want.len()) {
            return;
        }
        let d = max_abs_diff(key, got, want);
        if d > tol {
            self.failures
                .push(format!("{case}: {key}: max |diff| {d:e} > {tol:e}"));
        }
    }
    /// |got-want| <= abs + rel·|want| element-wise.
    pub fn close_rel(
        &mut self,
        case: &str,
        key: &str,
        got: &[f32],
        want: &[f32],
        abs: f32,
        rel: f32,
    ) {
        if !self.same_len(case, key, got.len(), want.len()) {
            return;
        }
        let worst = got
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs() - (abs + rel * b.abs()))
            .fold(f32::NEG_INFINITY, f32::max);
        if worst.is_nan() || worst > 0.0 {
            self.failures.push(format!(
                "{case}: {key}: exceeds {abs:e} abs + {rel:e} rel by {worst:e}"
            ));
        }
    }
    pub fn equal<T: PartialEq + std::fmt::Debug>(
        &mut self,
        case: &str,
        key: &str,
        got: &[T],
        want: &[T],
    ) {
        self.checked += 1;
        if got != want {
            self.failures
                .push(format!("{case}: {key}: got {got:?}, expected {want:?}"));
        }
    }
    pub fn fail(&mut self, msg: String) {
        self.checked += 1;
        self.failures.push(msg);
    }
    pub fn finish(self) {
        assert!(self.checked > 0, "no oracle check ran");
        assert!(
            self.failures.is_empty(),
            "{} of {} oracle checks failed:\n{}",
            self.failures.len(),
            self.checked,
            self.failures.join("\n")
        );
        eprintln!("{} oracle checks passed", self.checked);
    }
}
