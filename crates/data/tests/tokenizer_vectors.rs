//! Our tokenizers against llama.cpp's tokenizer test vectors: every
//! `ggml-vocab-<vocab>.gguf.inp` in tests/fixtures/tokenizer-test-vectors is checked, and one
//! whose vocab no tokenizer here stands for fails instead of being passed over.

mod common;
use common::{repo, tokenizer};

/// llama.cpp's vocab names that differ from the folder names under assets/tokenizers; any
/// other vocab is looked up as assets/tokenizers/<vocab>.
const VOCAB_TOKENIZER: &[(&str, &str)] = &[
    ("gpt-2", "gpt2"),
    ("llama-bpe", "llama3_1"),
    ("llama-spm", "llama2"),
    ("phi-3", "phi3"),
];

fn tokenizer_for(vocab: &str) -> Option<String> {
    VOCAB_TOKENIZER
        .iter()
        .find(|(v, _)| *v == vocab)
        .map(|(_, t)| t.to_string())
        .or_else(|| {
            let same = repo().join("assets/tokenizers").join(vocab);
            same.join("tokenizer.json")
                .is_file()
                .then(|| vocab.to_string())
        })
}

#[test]
fn tokenizers_pass_llama_cpp_vectors() {
    let dir = repo().join("tests/fixtures/tokenizer-test-vectors");
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".inp"))
        .collect();
    inputs.sort();
    let mut problems = Vec::new();
    let mut done = Vec::new();
    for inp in &inputs {
        let file = inp.file_name().unwrap().to_string_lossy().to_string();
        let Some(vocab) = file
            .strip_prefix("ggml-vocab-")
            .and_then(|f| f.strip_suffix(".gguf.inp"))
        else {
            problems.push(format!(
                "{}: not named ggml-vocab-<vocab>.gguf.inp",
                inp.display()
            ));
            continue;
        };
        let Some(name) = tokenizer_for(vocab) else {
            problems.push(format!(
                "{}: no tokenizer for vocab {vocab:?}: add one as assets/tokenizers/{vocab} or map it in VOCAB_TOKENIZER",
                inp.display()
            ));
            continue;
        };
        let out_path = inp.with_extension("out");
        let Ok(out) = std::fs::read_to_string(&out_path) else {
            problems.push(format!(
                "{}: missing (expected ids for {file})",
                out_path.display()
            ));
            continue;
        };
        let tok = tokenizer(&name);
        let inp_text = std::fs::read_to_string(inp).unwrap();
        let texts: Vec<&str> = inp_text.split("\n__ggml_vocab_test__\n").collect();
        let want: Vec<&str> = out.split('\n').collect();
        assert_eq!(
            texts.len(),
            want.len(),
            "{file}: inputs and outputs pair up"
        );
        for (t, w) in texts.iter().zip(&want) {
            let w: Vec<u32> = w.split_whitespace().map(|x| x.parse().unwrap()).collect();
            assert_eq!(tok.encode(t, false).unwrap(), w, "{vocab} ({name}): {t:?}");
        }
        done.push((vocab.to_string(), texts.len()));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // A stale map entry (its vectors gone) would otherwise go unnoticed.
    for (vocab, _) in VOCAB_TOKENIZER {
        assert!(
            done.iter().any(|(v, _)| v == vocab),
            "VOCAB_TOKENIZER names {vocab}, whose vectors are not in {}",
            dir.display()
        );
    }
}

/// The one tokenizer lookup every binary uses: tokenizer.json, else tokenizer.json.gz.
#[test]
fn a_model_folder_tokenizer_is_found_plain_or_gzipped() {
    use phi_data::tokenizer::find;
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/tokenizers");
    let gz_only = root.join("llama3_1");
    assert_eq!(
        find(Some(&gz_only)),
        Some(gz_only.join("tokenizer.json.gz"))
    );
    let plain = root.join("smollm2");
    assert_eq!(find(Some(&plain)), Some(plain.join("tokenizer.json")));
    let empty = std::env::temp_dir().join(format!("phi-tok-none-{}", std::process::id()));
    std::fs::create_dir_all(&empty).unwrap();
    assert_eq!(find(Some(&empty)), None);
    assert_eq!(find(None), None);
    // What it finds loads, and the gzipped one encodes as the folder's own loader does.
    let t = phi_data::Tok::load(&find(Some(&gz_only)).unwrap()).unwrap();
    let u = phi_data::Tok::load(&gz_only).unwrap();
    assert_eq!(
        t.encode("Hello world", true).unwrap(),
        u.encode("Hello world", true).unwrap()
    );
    let _ = std::fs::remove_dir_all(&empty);
}
