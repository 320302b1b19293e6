//! `--do_predict --predict_with_generate`: an answer generated for each eval example, written
//! as LLaMA-Factory writes them (`generated_predictions.jsonl`: prompt with its special
//! tokens, predict and label without), scored with LF's BLEU-4 / ROUGE (`predict_results.json`).
//! Also the generation shared with periodic samples during training.

use crate::args::TrainArgs;
use crate::data::Examples;
use crate::error::TrainError;
use crate::eval::{print_table, save_metrics, EvalModel};
use crate::metrics;
use phi_data::encode::{ChatFormat, Encoded};
use phi_data::Tok;
use phi_model::generate::{generate, GenerateConfig, Sampling};
use phi_model::CausalLm;
use serde_json::{json, Map, Value};
use std::time::Instant;

/// The prompt of an encoded example: everything before its first label (LF's eval encoding
/// feeds exactly this), and the label ids after it.
pub fn split_prompt(e: &Encoded) -> (Vec<u32>, Vec<u32>) {
    let first = e
        .labels
        .iter()
        .position(|&l| l != phi_model::loss::IGNORE_INDEX)
        .unwrap_or(e.labels.len());
    let label = e.input_ids[first..]
        .iter()
        .zip(&e.labels[first..])
        .filter(|(_, &l)| l != phi_model::loss::IGNORE_INDEX)
        .map(|(&i, _)| i)
        .collect();
    (e.input_ids[..first].to_vec(), label)
}

/// LF's generation settings: greedy unless do_sample; stops at EOS and the template's stops.
pub fn gen_config(a: &TrainArgs, max_new: usize, stops: Vec<u32>) -> GenerateConfig {
    GenerateConfig {
        max_new_tokens: max_new,
        sampling: a.do_sample.then_some(Sampling {
            temperature: a.temperature as f32,
            top_p: a.top_p as f32,
            seed: a.seed,
        }),
        eos_token_ids: stops,
        use_cache: true,
        // The run's BOS scaling: predictions and samples see the model its loss saw.
        bos_scale: a.use_bos_zero_training.then_some(a.bos_scaling_factor),
    }
}

/// EOS ids of the model plus the template's stop ids.
pub fn stop_ids(eos: &[u32], chat: Option<(&Tok, &ChatFormat)>) -> Vec<u32> {
    let mut s = eos.to_vec();
    if let Some((t, f)) = chat {
        s.extend(f.stop_ids(t));
    }
    s.sort_unstable();
    s.dedup();
    s
}

/// New ids for `prompt`, without a final stop token.
pub fn answer(model: &CausalLm, prompt: &[u32], cfg: &GenerateConfig) -> Vec<u32> {
    let ids: Vec<i64> = prompt.iter().map(|&x| x as i64).collect();
    let mut out: Vec<u32> = generate(model, &ids, cfg, |_| {})
        .into_iter()
        .map(|x| x as u32)
        .collect();
    if out.last().is_some_and(|l| cfg.eos_token_ids.contains(l)) {
        out.pop();
    }
    out
}

pub fn run_predict(a: &TrainArgs, m: &EvalModel, ex: &Examples) -> Result<Value, TrainError> {
    if !a.predict_with_generate {
        return Err(TrainError::arg(
            "predict_with_generate",
            "false",
            "true with do_predict (predictions are generated text)",
        ));
    }
    let Some((tok, fmt)) = ex.tok.as_ref() else {
        return Err(TrainError::arg(
            "tokenizer",
            "(none)",
            "a tokenizer.json (beside the model or --tokenizer) to decode predictions",
        ));
    };
    let out = crate::eval::output_dir(a)?;
    let cfg = gen_config(a, a.max_new_tokens, stop_ids(&m.eos, Some((tok, fmt))));
    let t0 = Instant::now();
    let (mut lines, mut scores) = (String::new(), Vec::new());
    for (i, e) in ex.train.iter().enumerate() {
        let (prompt, label) = split_prompt(e);
        let pred = answer(&m.model, &prompt, &cfg);
        let (p_text, l_text) = (tok.decode(&pred, true), tok.decode(&label, true));
        scores.push(metrics::similarity(&p_text, &l_text));
        // LF's key order (serde_json's maps sort keys).
        let q = |t: &str| Value::from(t).to_string();
        lines.push_str(&format!(
            "{{\"prompt\": {}, \"predict\": {}, \"label\": {}}}\n",
            q(&tok.decode(&prompt, false)),
            q(&p_text),
            q(&l_text)
        ));
        eprintln!("predict {}/{}", i + 1, ex.train.len());
    }
    phi_model::io::write_atomic(&out.join("generated_predictions.jsonl"), lines.as_bytes())?;
    let runtime = t0.elapsed().as_secs_f64();
    let mut res = Map::new();
    for (k, v) in metrics::average(&scores) {
        res.insert(k.into(), json!(v));
    }
    res.insert("predict_runtime".into(), json!(runtime));
    res.insert("predict_samples".into(), json!(ex.train.len()));
    res.insert(
        "predict_samples_per_second".into(),
        json!(ex.train.len() as f64 / runtime.max(1e-9)),
    );
    let res = Value::Object(res);
    save_metrics(&out, "predict", &res)?;
    print_table("predict", &res);
    Ok(res)
}
