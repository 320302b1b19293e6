//! Bad input (docs/data.md "Bad input"): each kind of bad record stops the run with one line
//! naming the file and line or record; with `skip_bad_records` it is counted, reported once and
//! skipped, and the good records encode exactly as if it were not there; a dataset that ends up
//! empty is an error either way.

mod common;
use common::{scratch, tokenizer};
use phi_data::encode::{ChatFormat, EncodeOptions, IGNORE};
use phi_data::load::{prepare, LoadOptions, Skipped};
use phi_data::{DataError, Encoded, Tok};

fn alpaca(q: &str, a: &str) -> String {
    serde_json::json!({ "instruction": q, "output": a }).to_string()
}

fn sharegpt(turns: &[(&str, &str)]) -> String {
    let turns: Vec<_> = turns
        .iter()
        .map(|(from, value)| serde_json::json!({ "from": from, "value": value }))
        .collect();
    serde_json::json!({ "conversations": turns }).to_string()
}

fn chat(q: &str, a: &str) -> String {
    sharegpt(&[("human", q), ("gpt", a)])
}

/// A 4,000-word prompt with a 35-word answer: at cutoff 64 neither side is under half the
/// budget, and LF's proportional split gives the answer int(64 * 37 / ~4000) = 0 tokens, so
/// nothing is left to train on.
fn too_long() -> String {
    alpaca(&"word ".repeat(4000), &"yes ".repeat(35))
}

struct Kind {
    file: &'static str,
    lines: Vec<String>,
    /// The bad line (1-based) and what its error must say.
    bad: usize,
    want: &'static str,
}

/// Every kind docs/data.md lists, each between two good records.
fn kinds() -> Vec<Kind> {
    let (a1, a2) = (alpaca("q1", "a1"), alpaca("q2", "a2"));
    let (c1, c2) = (chat("q1", "a1"), chat("q2", "a2"));
    let k = |file, lines: [String; 3], bad, want| Kind {
        file,
        lines: lines.to_vec(),
        bad,
        want,
    };
    vec![
        k(
            "malformed.jsonl",
            [
                a1.clone(),
                "{\"instruction\": \"q\", \"output\": ".into(),
                a2.clone(),
            ],
            2,
            "not valid JSON: EOF while parsing",
        ),
        // The format is read off the first record that parses, not the broken first line.
        k(
            "malformed_first.jsonl",
            ["{instruction: q}".into(), a1.clone(), a2.clone()],
            1,
            "not valid JSON: key must be a string",
        ),
        k(
            "missing.jsonl",
            [a1.clone(), "{\"instruction\":\"q\"}".into(), a2.clone()],
            2,
            "missing field \"output\"",
        ),
        k(
            "role.jsonl",
            [
                c1.clone(),
                sharegpt(&[("human", "q"), ("robot", "a")]),
                c2.clone(),
            ],
            2,
            "turn 2: unknown role \"robot\" (expected \"human\" or \"gpt\")",
        ),
        k(
            "alternate.jsonl",
            [
                c1.clone(),
                sharegpt(&[("human", "q"), ("human", "q"), ("gpt", "a")]),
                c2.clone(),
            ],
            2,
            "turn 2: conversation does not alternate human / gpt",
        ),
        k(
            "cut.jsonl",
            [a1, too_long(), a2],
            2,
            "every label is -100 after cutting to cutoff_len 64",
        ),
    ]
}

fn write(name: &str, lines: &[String]) -> String {
    scratch(name, &(lines.join("\n") + "\n"))
        .display()
        .to_string()
}

fn run(
    tok: &Tok,
    fmt: &ChatFormat,
    names: &[&str],
    skip: bool,
) -> Result<(Vec<Encoded>, Skipped), DataError> {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let load = LoadOptions {
        skip_bad_records: skip,
        ..LoadOptions::default()
    };
    let enc = EncodeOptions {
        cutoff_len: 64,
        ..EncodeOptions::default()
    };
    prepare(&names, Some((tok, fmt)), &load, &enc)
}

fn smollm2() -> (Tok, ChatFormat) {
    let mut tok = tokenizer("smollm2");
    let fmt = ChatFormat::new(Some("smollm2"), &mut tok).unwrap();
    (tok, fmt)
}

fn trained(tok: &Tok, e: &Encoded) -> String {
    let ids: Vec<u32> = e
        .labels
        .iter()
        .filter(|&&l| l != IGNORE)
        .map(|&l| l as u32)
        .collect();
    tok.decode(&ids, false)
}

#[test]
fn each_kind_stops_the_run_naming_file_and_line() {
    let (tok, fmt) = smollm2();
    for k in kinds() {
        let path = write(k.file, &k.lines);
        let e = run(&tok, &fmt, &[path.as_str()], false)
            .unwrap_err()
            .to_string();
        let head = format!("{path}: line {}: ", k.bad);
        assert!(
            e.starts_with(&head) && e.contains(k.want) && !e.contains('\n'),
            "{}: {e}",
            k.file
        );
    }
    // A JSON array has no line to resync on: a syntax error fails the file, skip or not.
    let path = scratch(
        "array.json",
        "[{\"instruction\":\"q\",\"output\":\"a\"},\n{\"instruction\": }]",
    )
    .display()
    .to_string();
    for skip in [false, true] {
        let e = run(&tok, &fmt, &[path.as_str()], skip)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("{path}: line 2: not valid JSON")),
            "{e}"
        );
    }
}

#[test]
fn skipping_each_kind_keeps_exactly_the_good_records() {
    let (tok, fmt) = smollm2();
    let clean_a = write(
        "clean_alpaca.jsonl",
        &[alpaca("q1", "a1"), alpaca("q2", "a2")],
    );
    let clean_c = write("clean_chat.jsonl", &[chat("q1", "a1"), chat("q2", "a2")]);
    let (want_a, _) = run(&tok, &fmt, &[&clean_a], false).unwrap();
    let (want_c, _) = run(&tok, &fmt, &[&clean_c], false).unwrap();
    for e in want_a.iter().chain(&want_c) {
        assert_eq!(e.len(), 37, "the good records are not cut at cutoff_len 64");
    }
    let mut all = Vec::new();
    for k in kinds() {
        // Own names: the tests of this file run at once in one scratch folder.
        let path = write(&format!("skip_{}", k.file), &k.lines);
        let (got, sk) = run(&tok, &fmt, &[path.as_str()], true).unwrap();
        let want = if k.lines[0].contains("conversations") {
            &want_c
        } else {
            &want_a
        };
        assert_eq!(&got, want, "{}: the good records survive unchanged", k.file);
        assert_eq!(
            [trained(&tok, &got[0]), trained(&tok, &got[1])],
            ["a1<|im_end|>\n", "a2<|im_end|>\n"],
            "{}",
            k.file
        );
        assert_eq!(sk.count, 1, "{}", k.file);
        let first = format!("{path}: line {}: ", k.bad);
        let summary = sk.summary().unwrap();
        assert!(
            summary.starts_with(&format!(
                "skipped 1 bad record(s) (--skip_bad_records); first: {first}"
            )) && summary.contains(k.want)
                && !summary.contains('\n'),
            "{}: {summary}",
            k.file
        );
        all.push(path);
    }
    // All at once: one count, one line, the first error of the first dataset.
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let (got, sk) = run(&tok, &fmt, &all, true).unwrap();
    assert_eq!((got.len(), sk.count), (12, 6));
    let summary = sk.summary().unwrap();
    assert!(
        summary.starts_with(&format!(
            "skipped 6 bad record(s) (--skip_bad_records); first: {}: line 2: not valid JSON",
            all[0]
        )) && !summary.contains('\n'),
        "{summary}"
    );
}

#[test]
fn a_dataset_left_empty_is_an_error() {
    let (tok, fmt) = smollm2();
    let all_bad = write(
        "all_bad.jsonl",
        &[
            "{\"instruction\": ".into(),
            "{\"instruction\":\"q\"}".into(),
            too_long(),
        ],
    );
    let e = run(&tok, &fmt, &[all_bad.as_str()], true)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e.split("; first: ").next().unwrap(),
        format!("{all_bad}: dataset left without usable examples: all 3 record(s) were bad and skipped (--skip_bad_records)"),
    );
    assert!(
        e.contains(&format!("first: {all_bad}: line 1: not valid JSON")),
        "{e}"
    );
    // Even next to a good dataset: the empty one is named, not silently dropped.
    let good = write("good.jsonl", &[alpaca("q", "a")]);
    let e = run(&tok, &fmt, &[good.as_str(), all_bad.as_str()], true)
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with(&format!("{all_bad}: dataset left without usable examples")),
        "{e}"
    );
    let (ok, sk) = run(&tok, &fmt, &[&good], true).unwrap();
    assert_eq!((ok.len(), sk.count), (1, 0));
    // A file with no records at all, skip or not.
    let empty = write("empty.jsonl", &["".into()]);
    for skip in [false, true] {
        let e = run(&tok, &fmt, &[empty.as_str()], skip)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!("{empty}: dataset left without usable examples: it holds no records")
        );
    }
}
