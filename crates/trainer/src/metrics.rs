//! BLEU-4 and ROUGE-1/2/L as LLaMA-Factory's `ComputeSimilarity` reports them (×100, each
//! example rounded to 4 decimals, then averaged):
//!
//! - BLEU-4 is nltk's `sentence_bleu([list(label)], list(predict))` with weights (¼,¼,¼,¼) and
//!   `SmoothingFunction().method3`: on **characters** (spaces included), not words.
//! - ROUGE is `rouge_chinese.Rouge().get_scores` f-scores on jieba's word cut, joined by spaces.
//!   rouge-chinese (a fork of pltrdy's `rouge`) splits sentences at '.', counts each n-gram
//!   once (sets), and scores ROUGE-L at summary level (union LCS over sentences).
//!
//! jieba is approximated by `cut`: runs of ASCII letters and digits are words, every other
//! non-space character (punctuation, each CJK character) is a word of its own, whitespace
//! separates. For English this is what jieba produces; for Chinese jieba groups characters
//! into dictionary words, so ROUGE on Chinese text differs from LF's (BLEU does not: it is
//! character-based either way).

use std::collections::{HashMap, HashSet};

/// jieba's cut, approximated (see the module docs); whitespace is dropped.
pub fn cut(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    for c in text.chars() {
        if c.is_ascii_alphanumeric() {
            word.push(c);
            continue;
        }
        if !word.is_empty() {
            out.push(std::mem::take(&mut word));
        }
        if !c.is_whitespace() {
            out.push(c.to_string());
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

fn ngrams<T: Clone + Eq + std::hash::Hash>(s: &[T], n: usize) -> HashMap<Vec<T>, usize> {
    let mut m = HashMap::new();
    if s.len() >= n {
        for w in s.windows(n) {
            *m.entry(w.to_vec()).or_insert(0) += 1;
        }
    }
    m
}

/// nltk's sentence_bleu with one reference, uniform 4-gram weights and smoothing method3
/// (NIST geometric: the k-th zero precision becomes 1 / (2^k · its denominator)).
pub fn bleu4<T: Clone + Eq + std::hash::Hash>(reference: &[T], hypothesis: &[T]) -> f64 {
    let (r, c) = (reference.len(), hypothesis.len());
    let mut p = Vec::with_capacity(4);
    for n in 1..=4 {
        let hyp = ngrams(hypothesis, n);
        let refs = ngrams(reference, n);
        let matched: usize = hyp
            .iter()
            .map(|(g, k)| (*k).min(*refs.get(g).unwrap_or(&0)))
            .sum();
        let total = hyp.values().sum::<usize>().max(1);
        p.push((matched, total));
    }
    // nltk returns 0 outright when not even a unigram matches.
    if p[0].0 == 0 {
        return 0.0;
    }
    let bp = if c > r {
        1.0
    } else if c == 0 {
        0.0
    } else {
        (1.0 - r as f64 / c as f64).exp()
    };
    let mut k = 1;
    let mut log_sum = 0.0;
    for (m, t) in p {
        let pn = if m == 0 {
            let v = 1.0 / (2f64.powi(k) * t as f64);
            k += 1;
            v
        } else {
            m as f64 / t as f64
        };
        log_sum += 0.25 * pn.ln();
    }
    bp * log_sum.exp()
}

/// pltrdy's sentence split: at '.', empty pieces dropped, each piece's words.
fn sentences(words: &[String]) -> Vec<Vec<String>> {
    let text = words.join(" ");
    text.split('.')
        .filter(|s| !s.is_empty())
        .map(|s| s.split_whitespace().map(str::to_string).collect::<Vec<_>>())
        .filter(|s: &Vec<String>| !s.is_empty())
        .collect()
}

fn f1(overlap: f64, hyp: f64, reference: f64) -> f64 {
    let p = if hyp > 0.0 { overlap / hyp } else { 0.0 };
    let r = if reference > 0.0 {
        overlap / reference
    } else {
        0.0
    };
    2.0 * (p * r) / (p + r + 1e-8)
}

fn rouge_n(hyp: &[Vec<String>], reference: &[Vec<String>], n: usize) -> f64 {
    let set = |s: &[Vec<String>]| -> HashSet<Vec<String>> {
        ngrams(&s.concat(), n).into_keys().collect()
    };
    let (h, r) = (set(hyp), set(reference));
    f1(
        h.intersection(&r).count() as f64,
        h.len() as f64,
        r.len() as f64,
    )
}

/// Indices into `a` of one longest common subsequence of `a` and `b`.
fn lcs_indices(a: &[String], b: &[String]) -> Vec<usize> {
    let (n, m) = (a.len(), b.len());
    let mut t = vec![vec![0usize; m + 1]; n + 1];
    for i in 1..=n {
        for j in 1..=m {
            t[i][j] = if a[i - 1] == b[j - 1] {
                t[i - 1][j - 1] + 1
            } else {
                t[i - 1][j].max(t[i][j - 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (n, m, Vec::new());
    while i > 0 && j > 0 {
        if a[i - 1] == b[j - 1] {
            out.push(i - 1);
            i -= 1;
            j -= 1;
        } else if t[i - 1][j] >= t[i][j - 1] {
            i -= 1;
        } else {
            j -= 1;
        }
    }
    out.reverse();
    out
}

/// Summary-level ROUGE-L: union LCS of each reference sentence with every hypothesis
/// sentence, hits limited by token counts; lengths are counts of distinct words (pltrdy).
fn rouge_l(hyp: &[Vec<String>], reference: &[Vec<String>]) -> f64 {
    let (hw, rw) = (hyp.concat(), reference.concat());
    let m = rw.iter().collect::<HashSet<_>>().len() as f64;
    let n = hw.iter().collect::<HashSet<_>>().len() as f64;
    let count = |w: &[String]| {
        let mut c: HashMap<String, usize> = HashMap::new();
        for x in w {
            *c.entry(x.clone()).or_insert(0) += 1;
        }
        c
    };
    let (mut rc, mut hc) = (count(&rw), count(&hw));
    let mut hits = 0usize;
    for r in reference {
        let mut union: Vec<usize> = hyp.iter().flat_map(|h| lcs_indices(r, h)).collect();
        union.sort_unstable();
        union.dedup();
        for i in union {
            let w = &r[i];
            if let (Some(a), Some(b)) = (rc.get_mut(w), hc.get_mut(w)) {
                if *a > 0 && *b > 0 {
                    hits += 1;
                    *a -= 1;
                    *b -= 1;
                }
            }
        }
    }
    let (r_lcs, p_lcs) = (hits as f64 / m.max(1.0), hits as f64 / n.max(1.0));
    let beta = p_lcs / (r_lcs + 1e-12);
    let num = (1.0 + beta * beta) * r_lcs * p_lcs;
    let den = r_lcs + beta * beta * p_lcs;
    num / (den + 1e-12)
}

/// One example's scores ×100 and rounded as LF does: [bleu-4, rouge-1, rouge-2, rouge-l].
pub fn similarity(predict: &str, label: &str) -> [f64; 4] {
    let round = |x: f64| (x * 100.0 * 1e4).round() / 1e4;
    let pc: Vec<char> = predict.chars().collect();
    let lc: Vec<char> = label.chars().collect();
    let bleu = round(bleu4(&lc, &pc));
    let (h, r) = (cut(predict), cut(label));
    if h.is_empty() || r.is_empty() {
        return [bleu, 0.0, 0.0, 0.0];
    }
    let (hs, rs) = (sentences(&h), sentences(&r));
    if hs.is_empty() || rs.is_empty() {
        // Only periods: pltrdy's Rouge has nothing to score.
        return [bleu, 0.0, 0.0, 0.0];
    }
    [
        bleu,
        round(rouge_n(&hs, &rs, 1)),
        round(rouge_n(&hs, &rs, 2)),
        round(rouge_l(&hs, &rs)),
    ]
}

/// LF's keys for the four scores of `similarity`, in its order.
pub const KEYS: [&str; 4] = [
    "predict_bleu-4",
    "predict_rouge-1",
    "predict_rouge-2",
    "predict_rouge-l",
];

/// The averages LF writes to predict_results.json, under its keys.
pub fn average(scores: &[[f64; 4]]) -> Vec<(&'static str, f64)> {
    let n = scores.len().max(1) as f64;
    KEYS.iter()
        .enumerate()
        .map(|(i, k)| (*k, scores.iter().map(|s| s[i]).sum::<f64>() / n))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Vec<String> {
        cut(s)
    }

    #[test]
    fn cut_splits_words_punctuation_and_cjk() {
        assert_eq!(w("Hi, I'm 42!"), ["Hi", ",", "I", "'", "m", "42", "!"]);
        assert_eq!(w("你好 ok"), ["你", "好", "ok"]);
        assert!(w("  \n").is_empty());
    }

    #[test]
    fn bleu_identical_is_one_and_disjoint_is_zero() {
        let a: Vec<char> = "hello world".chars().collect();
        assert!((bleu4(&a, &a) - 1.0).abs() < 1e-12);
        let b: Vec<char> = "xyz".chars().collect();
        assert_eq!(bleu4(&a, &b), 0.0);
    }

    #[test]
    fn bleu_by_hand_with_smoothing_and_brevity() {
        // ref "abcd", hyp "abd": p1 = 3/3, p2 = 1/2 (ab), p3 = 0/1 → 1/(2·1), p4 = 0/1
        // (denominator max(1, 0)) → 1/(4·1); BP = exp(1 - 4/3).
        let r: Vec<char> = "abcd".chars().collect();
        let h: Vec<char> = "abd".chars().collect();
        let want = (1.0f64 - 4.0 / 3.0).exp() * (1.0f64 * 0.5 * 0.5 * 0.25).powf(0.25);
        assert!((bleu4(&r, &h) - want).abs() < 1e-12, "{}", bleu4(&r, &h));
    }

    #[test]
    fn rouge_by_hand() {
        // hyp "the cat sat", ref "the cat sat down": unigrams 3 of 3 / 3 of 4,
        // f1 = 2·1·0.75/1.75; bigrams 2/2, 2/3; LCS 3, distinct 3 and 4 words.
        let s = similarity("the cat sat", "the cat sat down");
        let f = |p: f64, r: f64| 2.0 * p * r / (p + r + 1e-8);
        let round = |x: f64| (x * 100.0 * 1e4).round() / 1e4;
        assert_eq!(s[1], round(f(1.0, 0.75)));
        assert_eq!(s[2], round(f(1.0, 2.0 / 3.0)));
        let (r, p) = (0.75, 1.0);
        let beta: f64 = p / (r + 1e-12);
        let l = (1.0 + beta * beta) * r * p / (r + beta * beta * p + 1e-12);
        assert_eq!(s[3], round(l));
    }

    #[test]
    fn repeated_words_count_once_in_rouge_n() {
        // Sets: hyp {a}, ref {a, b} → p 1, r 0.5.
        let s = similarity("a a a", "a b");
        assert_eq!(s[1], ((2.0 * 0.5 / 1.5 - 0.0) * 1e6f64).round() / 1e4);
    }

    #[test]
    fn empty_prediction_scores_zero() {
        assert_eq!(similarity("", "some label"), [0.0; 4]);
        let avg = average(&[[10.0, 20.0, 30.0, 40.0], [0.0, 0.0, 0.0, 0.0]]);
        assert_eq!(avg[0], ("predict_bleu-4", 5.0));
        assert_eq!(avg[3], ("predict_rouge-l", 20.0));
    }
}
