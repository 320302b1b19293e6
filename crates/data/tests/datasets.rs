//! Dataset formats, the LF registry, BOS rules and masks, on real tokenizers and LF's data
//! (bad input: bad_input.rs).

use phi_data::dataset::Example;
use phi_data::encode::{ChatFormat, EncodeOptions, IGNORE};
use phi_data::load::{load_records, prepare, LoadOptions, Skipped};
use phi_data::{Role, Tok};
use std::path::Path;

mod common;
use common::{repo, scratch, tokenizer};

fn tok(name: &str) -> Tok {
    tokenizer(name)
}

fn lf_data() -> LoadOptions {
    LoadOptions {
        dataset_dir: repo().join("data"),
        ..LoadOptions::default()
    }
}

fn names(s: &str) -> Vec<String> {
    s.split(',').map(String::from).collect()
}

#[test]
fn llama_factory_registry_mixes_and_fills_placeholders() {
    let mut opts = lf_data();
    let mut sk = Skipped::default();
    let all = load_records(&names("identity,alpaca_en_demo"), &opts, &mut sk).unwrap();
    assert_eq!(all.len(), 91 + 999);
    opts.max_samples = Some(5);
    opts.placeholders = vec![
        ("name".into(), "Phi-Tune".into()),
        ("author".into(), "the phi-tune team".into()),
    ];
    let few = load_records(&names("identity,alpaca_en_demo"), &opts, &mut sk).unwrap();
    assert_eq!(few.len(), 10, "max_samples is per dataset");
    let Example::Chat(c) = &few[0].example else {
        panic!("identity is chat")
    };
    assert_eq!(c.messages[0].content, "hi");
    assert!(c.messages[1]
        .content
        .starts_with("Hello! I am Phi-Tune, an AI assistant developed by the phi-tune team."));
    // alpaca: instruction and input joined by a newline when both are there.
    let raw: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("data/alpaca_en_demo.json")).unwrap(),
    )
    .unwrap();
    let (k, r) = raw
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .find(|(_, r)| r["input"] != "")
        .expect("a record with input");
    let Example::Chat(c) = &all[91 + k].example else {
        panic!()
    };
    assert_eq!(
        c.messages[0].content,
        format!(
            "{}\n{}",
            r["instruction"].as_str().unwrap(),
            r["input"].as_str().unwrap()
        )
    );
    assert_eq!(sk.count, 0);
}

#[test]
fn formats_are_read_by_content_and_registry_tags() {
    let sharegpt = scratch(
        "share.json",
        r#"[{"conversations":[{"from":"system","value":"S"},{"from":"human","value":"q1"},{"from":"gpt","value":"a1"},{"from":"human","value":"q2"},{"from":"gpt","value":"a2"}]}]"#,
    );
    let openai = scratch(
        "openai.jsonl",
        "{\"messages\":[{\"role\":\"user\",\"content\":\"q\"},{\"role\":\"assistant\",\"content\":\"a\"}]}\n",
    );
    let alpaca = scratch(
        "alpaca.data.json",
        "{\"instruction\":\"i\",\"input\":\"\",\"output\":\"o\",\"system\":\"sys\",\"history\":[[\"h1\",\"r1\"]]}\n",
    );
    let text = scratch("corpus.jsonl", "{\"text\":\"plain words\"}\n");
    let tokens = scratch(
        "tok.jsonl",
        "{\"input_ids\":[5,6,7],\"labels\":[-100,6,7],\"attention_mask\":[1,1,0]}\n",
    );
    let mut sk = Skipped::default();
    let load = |p: &Path, sk: &mut Skipped| {
        load_records(&[p.display().to_string()], &LoadOptions::default(), sk).unwrap()
    };
    let Example::Chat(c) = &load(&sharegpt, &mut sk)[0].example else {
        panic!()
    };
    assert_eq!(
        (
            c.system.as_str(),
            c.messages.len(),
            c.messages[3].content.as_str()
        ),
        ("S", 4, "a2")
    );
    let Example::Chat(c) = &load(&openai, &mut sk)[0].example else {
        panic!()
    };
    assert_eq!(c.messages[1].role, Role::Assistant);
    let Example::Chat(c) = &load(&alpaca, &mut sk)[0].example else {
        panic!()
    };
    let contents: Vec<&str> = c.messages.iter().map(|m| m.content.as_str()).collect();
    assert_eq!(
        (c.system.as_str(), contents),
        ("sys", vec!["h1", "r1", "i", "o"])
    );
    assert_eq!(
        load(&text, &mut sk)[0].example,
        Example::Text("plain words".into())
    );
    let Example::Tokens(e) = &load(&tokens, &mut sk)[0].example else {
        panic!()
    };
    assert_eq!(
        (e.labels.clone(), e.attention_mask.clone()),
        (vec![-100, 6, 7], Some(vec![1, 1, 0]))
    );

    // A registry entry with OpenAI-style tags, as LF's mllm_demo / ultrachat entries are written.
    let dir = sharegpt.parent().unwrap();
    std::fs::write(
        dir.join("dataset_info.json"),
        r#"{"chat": {"file_name": "openai.jsonl", "formatting": "sharegpt", "columns": {"messages": "messages"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}},
            "hub": {"hf_hub_url": "someone/data"}}"#,
    )
    .unwrap();
    let opts = LoadOptions {
        dataset_dir: dir.to_path_buf(),
        ..LoadOptions::default()
    };
    assert_eq!(
        load_records(&names("chat"), &opts, &mut sk).unwrap().len(),
        1
    );
    let e = load_records(&names("hub"), &opts, &mut sk)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("dataset_info.json") && e.contains("hf_hub_url someone/data"),
        "{e}"
    );
    let e = load_records(&names("nope"), &opts, &mut sk)
        .unwrap_err()
        .to_string();
    assert!(e.contains("no dataset named \"nope\""), "{e}");
}

#[test]
fn exactly_one_bos_where_wanted() {
    let text = scratch("bos.jsonl", "{\"text\":\"Hello world\"}\n");
    let names = [text.display().to_string()];
    let enc = EncodeOptions::default();
    let first = |name: &str, template: &str, add_bos: bool, names: &[String]| {
        let mut t = tok(name);
        let fmt = ChatFormat::new(Some(template), &mut t).unwrap();
        let enc = EncodeOptions {
            add_bos,
            ..enc.clone()
        };
        let (out, _) = prepare(names, Some((&t, &fmt)), &LoadOptions::default(), &enc).unwrap();
        (t, out[0].clone())
    };
    // Plain text: BOS from add_bos_token (Llama-2) or the post-processor (Llama-3.1), once.
    for (name, tpl) in [
        ("llama2", "llama2"),
        ("llama3_1", "llama3"),
        ("phi3", "phi"),
    ] {
        let (t, e) = first(name, tpl, false, &names);
        let bos = t.bos.as_ref().unwrap().id;
        assert!(t.adds_bos, "{name}");
        assert_eq!(
            e.input_ids.iter().filter(|&&x| x == bos).count(),
            1,
            "{name}"
        );
        assert_eq!(e.input_ids[0], bos, "{name}");
        assert_eq!(
            *e.input_ids.last().unwrap(),
            t.eos.as_ref().unwrap().id,
            "{name}: EOS closes the text"
        );
    }
    let with_bos = scratch("bos2.jsonl", "{\"text\":\"<s>Hello world\"}\n");
    let (_, e) = first("llama2", "llama2", false, &[with_bos.display().to_string()]);
    assert_eq!(
        e.input_ids.iter().filter(|&&x| x == 1).count(),
        1,
        "a BOS in the text is not doubled"
    );
    let (t, e) = first("gpt2", "default", false, &names);
    assert!(!t.adds_bos && e.input_ids[0] != 50256, "GPT-2 adds no BOS");

    // Chat: phi has no BOS unless forced; forced, it is first and masked; llama3 keeps one.
    let chat = scratch("chat.jsonl", "{\"instruction\":\"q\",\"output\":\"a\"}\n");
    let names = [chat.display().to_string()];
    let (_, e) = first("phi3", "phi", false, &names);
    assert_ne!(e.input_ids[0], 1);
    let (_, forced) = first("phi3", "phi", true, &names);
    assert_eq!((forced.input_ids[0], forced.labels[0]), (1, IGNORE));
    assert_eq!(&forced.input_ids[1..], &e.input_ids[..]);
    let (_, e) = first("llama3_1", "llama3", true, &names);
    assert_eq!(e.input_ids.iter().filter(|&&x| x == 128000).count(), 1);
    assert_eq!(e.input_ids[0], 128000);
    // SmolLM2's BOS is <|im_start|>, which the chatml template already starts with.
    let (_, plain) = first("smollm2", "smollm2", false, &names);
    let (_, forced) = first("smollm2", "smollm2", true, &names);
    assert_eq!(plain.input_ids, forced.input_ids);
}

#[test]
fn train_on_prompt_and_mask_history() {
    let p = scratch(
        "multi.jsonl",
        "{\"conversations\":[{\"from\":\"human\",\"value\":\"q1\"},{\"from\":\"gpt\",\"value\":\"a1\"},{\"from\":\"human\",\"value\":\"q2\"},{\"from\":\"gpt\",\"value\":\"a2\"}]}\n",
    );
    let names = [p.display().to_string()];
    let mut t = tok("smollm2");
    let fmt = ChatFormat::new(Some("smollm2"), &mut t).unwrap();
    let run = |enc: EncodeOptions| {
        prepare(&names, Some((&t, &fmt)), &LoadOptions::default(), &enc)
            .unwrap()
            .0
            .remove(0)
    };
    let base = run(EncodeOptions::default());
    let trained = |e: &phi_data::Encoded| {
        let ids: Vec<u32> = e
            .labels
            .iter()
            .filter(|&&l| l != IGNORE)
            .map(|&l| l as u32)
            .collect();
        t.decode(&ids, false)
    };
    assert_eq!(trained(&base), "a1<|im_end|>\na2<|im_end|>\n");
    let all = run(EncodeOptions {
        train_on_prompt: true,
        ..EncodeOptions::default()
    });
    assert_eq!(
        all.labels,
        all.input_ids.iter().map(|&x| x as i64).collect::<Vec<_>>()
    );
    let last = run(EncodeOptions {
        mask_history: true,
        ..EncodeOptions::default()
    });
    assert_eq!(last.input_ids, base.input_ids);
    assert_eq!(trained(&last), "a2<|im_end|>\n");
}
