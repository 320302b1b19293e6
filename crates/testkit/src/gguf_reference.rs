//! llama.cpp converter references for GGUF export tests (crates/data/tests/fixtures/gguf-export):
//! the tiny checkpoints `gen_reference.py` made, rebuilt from `values`, and a comparison of a
//! GGUF file with a reference dump: keys in order with types and values, tensors with names,
//! types, shapes and bytes, and the whole file's bytes.

use phi_model::io::write_safetensors;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/tests/fixtures/gguf-export")
}

pub fn json(p: &Path) -> Value {
    let text = std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The case's checkpoint as gen_reference.py wrote it, rebuilt in a temp folder.
pub fn checkpoint(case: &str) -> PathBuf {
    let manifest = json(&fixtures().join("reference/_manifest.json"));
    let m = &manifest[case];
    let dir = unique(&format!("phi-gguf-export-{case}"));
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "tokenizer_config.json"] {
        std::fs::copy(fixtures().join("cases").join(case).join(f), dir.join(f)).unwrap();
    }
    let tok = Path::new(m["tokenizer_from"].as_str().unwrap())
        .file_name()
        .unwrap();
    let assets = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../assets/tokenizers")
        .join(tok);
    let plain = assets.join("tokenizer.json");
    let text = if plain.exists() {
        std::fs::read(&plain).unwrap()
    } else {
        let gz = std::fs::File::open(assets.join("tokenizer.json.gz")).unwrap();
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut out)
            .unwrap();
        out
    };
    std::fs::write(dir.join("tokenizer.json"), text).unwrap();
    let tensors = drawn(m, |name, v| {
        if name.ends_with(".bias") {
            0.1f32 * v
        } else if name.contains("norm") {
            1.0f32 + 0.1f32 * v
        } else {
            0.02f32 * v
        }
    });
    write_safetensors(&dir.join("model.safetensors"), &tensors, None).unwrap();
    dir
}

/// A GGUF file's keys (name, type as the reference spells it, summary) and tensors.
pub struct Parsed {
    pub keys: Vec<(String, String, Value)>,
    pub tensors: Vec<(String, u32, Vec<u64>, String)>,
}

struct Cur<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cur<'_> {
    fn take(&mut self, n: usize) -> &[u8] {
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        s
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take(8).try_into().unwrap())
    }
    fn string(&mut self) -> String {
        let n = self.u64() as usize;
        String::from_utf8(self.take(n).to_vec()).unwrap()
    }
    fn scalar(&mut self, t: u32) -> Value {
        match t {
            4 => Value::from(self.u32()),
            5 => Value::from(self.u32() as i32),
            6 => Value::from(f32::from_bits(self.u32()) as f64),
            7 => Value::from(self.take(1)[0] != 0),
            8 => Value::from(self.string()),
            _ => panic!("value type {t}"),
        }
    }
}

fn type_name(t: u32) -> &'static str {
    match t {
        4 => "UINT32",
        5 => "INT32",
        6 => "FLOAT32",
        7 => "BOOL",
        8 => "STRING",
        _ => "?",
    }
}

pub fn parse(b: &[u8]) -> Parsed {
    let mut c = Cur { b, at: 0 };
    assert_eq!(c.take(4), b"GGUF");
    assert_eq!(c.u32(), 3);
    let nt = c.u64();
    let nk = c.u64();
    let mut keys = Vec::new();
    for _ in 0..nk {
        let k = c.string();
        let t = c.u32();
        if t == 9 {
            let et = c.u32();
            let len = c.u64();
            let start = c.at;
            let items: Vec<Value> = (0..len).map(|_| c.scalar(et)).collect();
            let summary = if len > 64 {
                serde_json::json!({"len": len, "sha256_payload": hex(&b[start..c.at])})
            } else {
                Value::from(items)
            };
            keys.push((k, format!("ARRAY[{}]", type_name(et)), summary));
        } else {
            let v = c.scalar(t);
            keys.push((k, type_name(t).to_string(), v));
        }
    }
    let mut infos = Vec::new();
    for _ in 0..nt {
        let name = c.string();
        let dims = c.u32();
        let shape: Vec<u64> = (0..dims).map(|_| c.u64()).collect();
        let ty = c.u32();
        let off = c.u64();
        infos.push((name, ty, shape, off));
    }
    let data = c.at.next_multiple_of(32);
    let tensors = infos
        .into_iter()
        .map(|(name, ty, shape, off)| {
            let n: u64 = shape.iter().product();
            let bytes = phi_model::gguf_export::type_bytes(ty, n as usize);
            assert!(bytes > 0, "{name}: type {ty}");
            let start = data + off as usize;
            let sha = hex(&b[start..start + bytes]);
            (name, ty, shape, sha)
        })
        .collect();
    Parsed { keys, tensors }
}

fn ggml_name(t: u32) -> &'static str {
    match t {
        0 => "F32",
        1 => "F16",
        30 => "BF16",
        _ => phi_kernels::quant::QType::from_ggml(t).map_or("?", |q| q.name()),
    }
}

/// `bytes` (a GGUF file) against the reference dump `reference`; `whole` compares the
/// tokenizer keys and the file's bytes too, `skip` names keys left out of the comparison.
pub fn compare(bytes: &[u8], reference: &str, whole: bool, skip: &[&str]) -> Result<(), String> {
    let case = reference;
    let reference = json(&fixtures().join(format!("reference/{reference}.json")));
    let ours = parse(bytes);
    let model_key = |k: &&str| (whole || !k.starts_with("tokenizer.")) && !skip.contains(k);
    let order: Vec<&str> = ours
        .keys
        .iter()
        .map(|(k, _, _)| k.as_str())
        .filter(model_key)
        .collect();
    let want_order: Vec<&str> = reference["metadata_order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .filter(model_key)
        .collect();
    if order != want_order {
        return Err(format!(
            "{case}: key order\n ours {order:?}\n want {want_order:?}"
        ));
    }
    for (k, ty, v) in ours.keys.iter().filter(|(k, _, _)| model_key(&k.as_str())) {
        let want = &reference["metadata"][k];
        if want["type"].as_str() != Some(ty.as_str()) {
            return Err(format!("{case}: {k} is {ty}, want {}", want["type"]));
        }
        let same = match v.get("sha256_payload") {
            Some(h) => want["sha256_payload"] == *h && want["len"] == v["len"],
            None => want["value"] == *v,
        };
        if !same {
            return Err(format!("{case}: {k} = {v}, want {want}"));
        }
    }
    let want_t = reference["tensors"].as_array().unwrap();
    if want_t.len() != ours.tensors.len() {
        return Err(format!(
            "{case}: {} tensors, want {}",
            ours.tensors.len(),
            want_t.len()
        ));
    }
    for ((name, ty, shape, sha), w) in ours.tensors.iter().zip(want_t) {
        let wshape: Vec<u64> = w["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap())
            .collect();
        if w["name"] != name.as_str() || w["ggml_type"] != ggml_name(*ty) || wshape != *shape {
            return Err(format!(
                "{case}: tensor {name} {} {shape:?}, want {w}",
                ggml_name(*ty)
            ));
        }
        if w["sha256"] != sha.as_str() {
            return Err(format!("{case}: tensor {name}'s bytes differ"));
        }
    }
    if whole && skip.is_empty() && reference["file_sha256"] != hex(bytes).as_str() {
        return Err(format!(
            "{case}: keys and tensors equal, the file's bytes not"
        ));
    }
    Ok(())
}

/// general.name in a reference dump.
pub fn reference_name(reference: &str) -> String {
    let r = json(&fixtures().join(format!("reference/{reference}.json")));
    r["metadata"]["general.name"]["value"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The LoRA adapter `case` of the references (PEFT folder: its adapter_config.json, factors
/// from `values` with the manifest's seeds, × 0.02), in a temp folder.
pub fn adapter(case: &str) -> PathBuf {
    let manifest = json(&fixtures().join("reference/_manifest.json"));
    let m = &manifest[case];
    let dir = unique(&format!("phi-gguf-adapter-{case}"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = fixtures()
        .join("cases")
        .join(case)
        .join("adapter_config.json");
    std::fs::copy(cfg, dir.join("adapter_config.json")).unwrap();
    let tensors = drawn(m, |_, v| 0.02f32 * v);
    write_safetensors(&dir.join("adapter_model.safetensors"), &tensors, None).unwrap();
    dir
}

/// A temp folder of its own for each call (tests of one binary run side by side).
fn unique(stem: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    std::env::temp_dir().join(format!("{stem}-{}-{n}", std::process::id()))
}

/// A manifest entry's tensors: `values(n, seed)` per tensor, each value mapped by `scale`.
fn drawn(m: &Value, scale: impl Fn(&str, f32) -> f32) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut tensors = BTreeMap::new();
    for (name, t) in m["tensors"].as_object().unwrap() {
        let shape: Vec<usize> = t["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d.as_u64().unwrap() as usize)
            .collect();
        let v = crate::values(shape.iter().product(), t["seed"].as_u64().unwrap());
        let w = v.iter().map(|&x| scale(name, x)).collect();
        tensors.insert(name.clone(), (shape, w));
    }
    tensors
}
