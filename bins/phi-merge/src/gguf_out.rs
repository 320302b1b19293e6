//! phi-merge's GGUF outputs: the merged model (`--gguf`), the adapter alone
//! (`--adapter-gguf`), and an Ollama Modelfile beside them.

use anyhow::{bail, Context, Result};
use phi_data::gguf_vocab::{keys_from_gguf, tokenizer_keys};
use phi_model::gguf::GgufFile;
use phi_model::gguf_write::MetaValue;
use phi_model::ModelConfig;
use std::path::{Path, PathBuf};

/// A file phi-merge is about to write: refused where it exists unless `overwrite`.
pub fn check_new(path: &Path, flag: &str, overwrite: bool) -> Result<()> {
    if path.is_dir() {
        bail!(
            "{flag} {}: is a folder (expected a .gguf file path)",
            path.display()
        );
    }
    if path.exists() && !overwrite {
        bail!(
            "{flag} {}: exists (pass --overwrite to replace it)",
            path.display()
        );
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("{flag} {}: cannot create its folder", path.display()))?;
    }
    Ok(())
}

/// general.name: the file's name without its extension.
pub fn name_of(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into())
}

/// The tokenizer keys: from `--tokenizer`, else the model folder's tokenizer.json, else a GGUF
/// base's own keys.
pub fn vocab(
    tokenizer: Option<&Path>,
    dir: Option<&Path>,
    gguf: Option<&Path>,
    c: &ModelConfig,
    arch: &str,
) -> Result<Vec<(String, MetaValue)>> {
    let folder = tokenizer.map(Path::to_path_buf).or_else(|| {
        dir.filter(|d| d.join("tokenizer.json").exists())
            .map(Path::to_path_buf)
    });
    if let Some(f) = folder {
        return Ok(tokenizer_keys(&f, arch, &c.raw, c.vocab_size)?);
    }
    if let Some(g) = gguf {
        let file = GgufFile::open(g)?;
        return Ok(keys_from_gguf(&file));
    }
    bail!(
        "--gguf: {} has no tokenizer.json (llama.cpp needs the tokenizer in the file; pass \
         --tokenizer FOLDER)",
        dir.map_or("the model".into(), |d| d.display().to_string())
    )
}

/// Ollama's Go template and stop words for the chat formats it has templates for, told
/// apart by their jinja's markers; None: Ollama derives one from the GGUF's chat template.
fn ollama_template(jinja: &str) -> Option<(&'static str, &'static [&'static str])> {
    if jinja.contains("<|im_start|>") {
        return Some((
            "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n",
            &["<|im_start|>", "<|im_end|>"],
        ));
    }
    if jinja.contains("<|start_header_id|>") {
        return Some((
            "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
            &["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        ));
    }
    if jinja.contains("<|user|>") && jinja.contains("<|end|>") {
        return Some((
            "{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}<|assistant|>\n",
            &["<|end|>", "<|endoftext|>"],
        ));
    }
    None
}

/// A path as the Modelfile gives it: relative to the Modelfile's folder where it is inside.
fn from_path(p: &Path, folder: &Path) -> String {
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (p, folder) = (abs(p), abs(folder));
    match p.strip_prefix(&folder) {
        Ok(rel) => format!("./{}", rel.display()),
        Err(_) => p.display().to_string(),
    }
}

/// Where the Modelfile for the GGUF file `at` goes: beside it.
pub fn modelfile_path(at: &Path) -> PathBuf {
    at.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .join("Modelfile")
}

/// The Modelfile beside the GGUF written: FROM the merged model, or FROM the base with
/// ADAPTER the adapter file; TEMPLATE and stop words where the chat format is known.
pub fn write_modelfile(
    at: &Path,
    from: &Path,
    adapter: Option<&Path>,
    chat_template: Option<&str>,
    overwrite: bool,
) -> Result<PathBuf> {
    let path = modelfile_path(at);
    let folder = path.parent().unwrap_or(Path::new("."));
    if path.exists() && !overwrite {
        bail!(
            "{}: exists (pass --overwrite to replace it)",
            path.display()
        );
    }
    let mut text =
        String::from("# Written by phi-merge. Import with: ollama create NAME -f Modelfile\n");
    text += &format!("FROM {}\n", from_path(from, folder));
    if let Some(a) = adapter {
        text += &format!("ADAPTER {}\n", from_path(a, folder));
    }
    match chat_template.and_then(ollama_template) {
        Some((tmpl, stops)) => {
            text += &format!("TEMPLATE \"\"\"{tmpl}\"\"\"\n");
            for s in stops {
                text += &format!("PARAMETER stop \"{s}\"\n");
            }
        }
        None => text += "# No TEMPLATE: Ollama takes the chat template from the GGUF's tokenizer.chat_template.\n",
    }
    phi_model::io::write_atomic(&path, text.as_bytes())?;
    Ok(path)
}

/// The chat template among tokenizer keys.
pub fn chat_template(keys: &[(String, MetaValue)]) -> Option<&str> {
    keys.iter().find_map(|(k, v)| match v {
        MetaValue::Str(s) if k == "tokenizer.chat_template" => Some(s.as_str()),
        _ => None,
    })
}
