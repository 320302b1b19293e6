//! Generation as evaluation and samples use it: the prompt of an encoded example, LF's
//! generation settings (with the run's BOS scaling), stop ids, and an answer without its
//! final stop token.

use crate::args::TrainArgs;
use phi_data::encode::{ChatFormat, Encoded};
use phi_data::Tok;
use phi_model::generate::{generate, GenerateConfig, Sampling};
use phi_model::CausalLm;

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

/// LF's generation settings: greedy unless do_sample; stops at EOS and the template's stops;
/// `bos_scale` as the run's forward scales position 0 (`step::Regs::bos_factor`).
pub fn gen_config(
    a: &TrainArgs,
    max_new: usize,
    stops: Vec<u32>,
    bos_scale: Option<f64>,
) -> GenerateConfig {
    GenerateConfig {
        max_new_tokens: max_new,
        sampling: a.do_sample.then_some(Sampling {
            temperature: a.temperature as f32,
            top_p: a.top_p as f32,
            seed: a.seed,
        }),
        eos_token_ids: stops,
        use_cache: true,
        bos_scale,
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
