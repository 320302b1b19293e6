//! Access to reference-tensor folders (the transformers oracle) for tests in every crate:
//! case discovery, tensor reading and tolerance checks. Case folders are found, never named.

use phi_model::weights::{read_i64, SafetensorsSource, TensorSource};
use std::path::{Path, PathBuf};

/// The committed case folders: the copy of the public oracle, and the cases our generator
/// made for architectures it lacks (tests/fixtures/oracle-gen).
pub fn fixture_dirs() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    vec![root.join("oracle"), root.join("oracle-gen/cases")]
}

/// `PHI_ORACLE_DIR` alone when set, else the committed folders.
pub fn oracle_dirs() -> Vec<PathBuf> {
    match std::env::var("PHI_ORACLE_DIR") {
        Ok(d) if !d.is_empty() => vec![PathBuf::from(d)],
        _ => fixture_dirs(),
    }
}

/// Every case folder of `oracle_dirs()`, sorted within each folder.
pub fn cases() -> Vec<PathBuf> {
    let dirs = oracle_dirs();
    let out: Vec<PathBuf> = dirs.iter().flat_map(|d| cases_in(d)).collect();
    assert!(!out.is_empty(), "{dirs:?}: no oracle case folders found");
    out
}

/// Every sub-folder of `dir` holding a config.json and expected.safetensors, sorted. A folder
/// with only one of the two is a broken case and fails loudly rather than being skipped.
fn cases_in(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
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
    out
}

/// The cases of `oracle_dirs()` that `keep` accepts. A check that needs a kind of case the
/// folder lacks (a PHI_ORACLE_DIR of other architectures) runs on the committed fixture
/// cases of that kind instead, and says so; with none there either it panics: such a check
/// never passes without having run.
pub fn cases_where(what: &str, keep: impl Fn(&Path) -> bool) -> Vec<PathBuf> {
    let found: Vec<PathBuf> = cases().into_iter().filter(|d| keep(d)).collect();
    if !found.is_empty() {
        return found;
    }
    let fixtures: Vec<PathBuf> = fixture_dirs()
        .iter()
        .flat_map(|d| cases_in(d))
        .filter(|d| keep(d))
        .collect();
    assert!(
        !fixtures.is_empty(),
        "no oracle case is {what}, neither in {:?} nor in {:?}",
        oracle_dirs(),
        fixture_dirs()
    );
    eprintln!(
        "{:?}: no case is {what}; checking the committed fixture cases {:?} instead",
        oracle_dirs(),
        fixtures
            .iter()
            .filter_map(|d| d.file_name())
            .collect::<Vec<_>>()
    );
    fixtures
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
    pub fn batch(&self) -> (phi_model::Inputs, Vec<i64>) {
        let (shape, ids) = self.input("input_ids").expect("input_ids");
        let mut inp = phi_model::Inputs::new(shape[0], shape[1], ids);
        if let Some((_, m)) = self.input("attention_mask") {
            inp = inp.with_mask(m);
        }
        (inp, self.input("labels").map(|l| l.1).unwrap_or_default())
    }
}

/// Largest of `|a-b| - (abs + rel·|b|)` over the elements (> 0 means out of bounds), and
/// +inf when any value of either operand is NaN or infinite: a float fold with `f32::max`
/// skips NaN, so a comparison built on it would pass on an all-NaN tensor.
pub fn worst_excess(got: &[f32], want: &[f32], abs: f32, rel: f32) -> f32 {
    got.iter()
        .zip(want)
        .map(|(a, b)| {
            if a.is_finite() && b.is_finite() {
                (a - b).abs() - (abs + rel * b.abs())
            } else {
                f32::INFINITY
            }
        })
        .fold(f32::NEG_INFINITY, |m, d| if d > m { d } else { m })
}

/// Largest |a-b| (+inf when either side holds a NaN or an infinity); panics with the key
/// when the lengths differ.
pub fn max_abs_diff(key: &str, got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(
        got.len(),
        want.len(),
        "{key}: {} values, expected {}",
        got.len(),
        want.len()
    );
    worst_excess(got, want, 0.0, 0.0).max(0.0)
}

/// Largest |a-b| / (1 + |b|), +inf on any non-finite value; panics when the lengths differ.
pub fn max_scaled_diff(key: &str, got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len(), "{key}: lengths differ");
    got.iter()
        .zip(want)
        .map(|(a, b)| {
            if a.is_finite() && b.is_finite() {
                (a - b).abs() / (1.0 + b.abs())
            } else {
                f32::INFINITY
            }
        })
        .fold(0.0, |m, d| if d > m { d } else { m })
}

/// Collects failures so one run reports every mismatching key of every case.
#[derive(Default)]
pub struct Report {
    pub failures: Vec<String>,
    pub checked: usize,
    /// Value comparisons among `checked` (close / close_rel): a report made only of
    /// structural checks (counts, names) proves nothing about the numbers.
    pub numeric: usize,
}

impl Report {
    /// Counts a check; false (with a failure recorded) when the lengths differ.
    fn same_len(&mut self, case: &str, key: &str, got: usize, want: usize) -> bool {
        self.checked += 1;
        self.numeric += 1;
        if got != want {
            self.failures
                .push(format!("{case}: {key}: {got} values, expected {want}"));
        }
        got == want
    }

    pub fn close(&mut self, case: &str, key: &str, got: &[f32], want: &[f32], tol: f32) {
        self.close_rel(case, key, got, want, tol, 0.0)
    }
    /// |got-want| <= abs + rel·|want| element-wise, and every value finite.
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
        if got.is_empty() {
            self.failures.push(format!("{case}: {key}: no values"));
            return;
        }
        let worst = worst_excess(got, want, abs, rel);
        if worst > 0.0 {
            let what = if worst.is_infinite() {
                "holds a NaN or infinite value".to_string()
            } else {
                format!("exceeds {abs:e} abs + {rel:e} rel by {worst:e}")
            };
            self.failures.push(format!("{case}: {key}: {what}"));
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
    /// Exact equality of values (token ids, bit-identical tensors): a numeric check, where
    /// `equal` is a structural one (counts, names, flags).
    pub fn exact<T: PartialEq + std::fmt::Debug>(
        &mut self,
        case: &str,
        key: &str,
        got: &[T],
        want: &[T],
    ) {
        self.numeric += 1;
        if got.is_empty() && want.is_empty() {
            self.checked += 1;
            self.failures.push(format!("{case}: {key}: no values"));
            return;
        }
        self.equal(case, key, got, want);
    }
    pub fn fail(&mut self, msg: String) {
        self.checked += 1;
        self.failures.push(msg);
    }
    pub fn finish(self) {
        assert!(self.checked > 0, "no oracle check ran");
        assert!(
            self.numeric > 0 || !self.failures.is_empty(),
            "none of the {} oracle checks compared numbers",
            self.checked
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn report(got: &[f32], want: &[f32]) -> Report {
        let mut r = Report::default();
        r.close("c", "k", got, want, 1e-3);
        r.close_rel("c", "k", got, want, 1e-3, 1e-3);
        r
    }

    #[test]
    fn non_finite_values_never_pass() {
        let want = [1.0, 2.0, 3.0];
        for got in [
            [f32::NAN; 3],
            [1.0, f32::NAN, 3.0],
            [1.0, 2.0, f32::INFINITY],
            [f32::NEG_INFINITY, 2.0, 3.0],
        ] {
            assert_eq!(report(&got, &want).failures.len(), 2, "{got:?}");
            assert_eq!(report(&want, &got).failures.len(), 2, "{got:?} as expected");
            assert_eq!(max_abs_diff("k", &got, &want), f32::INFINITY);
            assert_eq!(max_scaled_diff("k", &got, &want), f32::INFINITY);
        }
        // inf == inf on both sides is still no evidence of a match.
        let inf = [f32::INFINITY; 3];
        assert_eq!(report(&inf, &inf).failures.len(), 2);
        assert!(report(&want, &want).failures.is_empty());
        assert_eq!(report(&[], &[]).failures.len(), 2, "empty comparisons fail");
    }

    #[test]
    #[should_panic(expected = "none of the 1 oracle checks compared numbers")]
    fn a_report_of_structural_checks_only_fails() {
        let mut r = Report::default();
        r.equal("c", "count", &[3], &[3]);
        r.finish();
    }

    #[test]
    #[should_panic(expected = "1 of 1 oracle checks failed")]
    fn an_all_nan_tensor_fails_the_report() {
        let mut r = Report::default();
        r.close_rel("c", "grad", &[f32::NAN; 4], &[0.5; 4], 1e-5, 1e-4);
        r.finish();
    }
}
