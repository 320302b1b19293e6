//! `--do_predict --predict_with_generate`: an answer generated for each eval example, written
//! as LLaMA-Factory writes them (`generated_predictions.jsonl`: prompt with its special
//! tokens, predict and label without), scored with LF's BLEU-4 / ROUGE (`predict_results.json`).

use crate::args::TrainArgs;
use crate::data::Examples;
use crate::error::TrainError;
use crate::eval::EvalModel;
use crate::generation::{answer, gen_config, split_prompt, stop_ids};
use crate::metrics;
use crate::outputs::{output_dir, print_table, save_metrics};
use serde_json::{json, Map, Value};
use std::time::Instant;

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
    let out = output_dir(a)?;
    let stops = stop_ids(&m.eos, Some((tok, fmt)));
    let cfg = gen_config(a, a.max_new_tokens, stops, m.regs.bos_factor());
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
