//! The slot templates that LF's reference rows do not cover: `phi2` against Phi-2's documented
//! QA format, and `chatml` / `qwen` against LF's `smollm2` rows, which use the same ChatML slots
//! and differ only in the default system prompt.

mod common;
use common::{conversation, ints, oracle_dir, rows, sample, tokenizer};
use phi_data::encode::{supervised, ChatFormat, EncodeOptions, IGNORE};
use phi_data::Tok;

fn format(template: &str, tok_name: &str) -> (Tok, ChatFormat) {
    let mut tok = tokenizer(tok_name);
    let fmt = ChatFormat::new(Some(template), &mut tok).unwrap();
    (tok, fmt)
}

#[test]
fn phi2_is_instruct_output() {
    let (tok, fmt) = format("phi2", "gpt2");
    for (system, first) in [
        ("", "Instruct: Hi!\nOutput:"),
        ("You are terse.", "You are terse.\nInstruct: Hi!\nOutput:"),
    ] {
        let pairs = fmt.encode_pairs(&tok, &sample(system)).unwrap();
        let text: Vec<[String; 2]> = pairs
            .iter()
            .map(|(p, r)| [tok.decode(p, false), tok.decode(r, false)])
            .collect();
        assert_eq!(
            text,
            [
                [first, " Hello.<|endoftext|>\n"],
                ["Instruct: 2+2?\nOutput:", " 4<|endoftext|>\n"]
            ]
        );
        // EOS is GPT-2's <|endoftext|> as an id, then the newline (Ċ) that separates examples.
        for (_, r) in &pairs {
            assert_eq!(r[r.len() - 2..], [50256, 198]);
        }
        let e = supervised(&pairs, &EncodeOptions::default(), None);
        let prompt_len = pairs[0].0.len();
        assert!(e.labels[..prompt_len].iter().all(|&l| l == IGNORE));
        assert!(e.labels[prompt_len..prompt_len + pairs[0].1.len()]
            .iter()
            .all(|&l| l != IGNORE));
    }
}

/// LF's smollm2 rows with their leading system block (`<|im_start|>system … <|im_end|>` `\n`)
/// replaced by `system` ids, masked as prompt.
fn swap_system(ids: &[i64], labels: &[i64], system: &[u32]) -> (Vec<i64>, Vec<i64>) {
    assert_eq!(ids[0], 1, "rows open with <|im_start|>");
    let end = ids.windows(2).position(|w| w == [2, 198]).unwrap() + 2;
    let mut i: Vec<i64> = system.iter().map(|&x| x as i64).collect();
    let mut l = vec![IGNORE; i.len()];
    i.extend(&ids[end..]);
    l.extend(&labels[end..]);
    (i, l)
}

#[test]
fn chatml_and_qwen_are_smollm2_with_their_system_prompts() {
    let qwen_system = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n";
    let formats = [
        ("chatml", format("chatml", "smollm2")),
        ("qwen", format("qwen", "smollm2")),
    ];
    let mut checked = 0;
    for setting in ["sft", "train_on_prompt"] {
        let opts = EncodeOptions {
            train_on_prompt: setting == "train_on_prompt",
            ..EncodeOptions::default()
        };
        for row in rows(&oracle_dir().join(format!("smollm2__smollm2__{setting}.jsonl"))) {
            let conv = conversation(&row);
            let (ids, labels) = (ints(&row["input_ids"]), ints(&row["labels"]));
            for (template, (tok, fmt)) in &formats {
                let want = if !conv.system.is_empty() {
                    (ids.clone(), labels.clone())
                } else {
                    let system = match *template {
                        "qwen" => tok.encode(qwen_system, false).unwrap(),
                        _ => vec![],
                    };
                    let (i, mut l) = swap_system(&ids, &labels, &system);
                    if opts.train_on_prompt {
                        l = i.clone();
                    }
                    (i, l)
                };
                let got = supervised(&fmt.encode_pairs(tok, &conv).unwrap(), &opts, None);
                let got_ids: Vec<i64> = got.input_ids.iter().map(|&x| x as i64).collect();
                assert_eq!(
                    (got_ids, got.labels),
                    want,
                    "{template} {setting} {}",
                    row["index"]
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 2 * 2 * 30);
}
