//! Greedy and sampled decoding with a KV cache, stopping at EOS.

use crate::model::{CausalLm, Inputs, KvCache};
use crate::rng::SplitMix as Rng;
use crate::taps::TapRequest;
use burn::tensor::Tensor;

#[derive(Debug, Clone, Copy)]
pub struct Sampling {
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
}

#[derive(Debug, Clone)]
pub struct GenerateConfig {
    pub max_new_tokens: usize,
    /// None = greedy.
    pub sampling: Option<Sampling>,
    pub eos_token_ids: Vec<u32>,
    pub use_cache: bool,
    /// BOS scaling as in training (`use_bos_zero_training`): the embedding at position 0
    /// times this factor in every forward that starts at position 0.
    pub bos_scale: Option<f64>,
}

fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best
}

/// Temperature, then nucleus filtering (the smallest set of tokens whose probability reaches
/// top_p, at least one), then a draw.
fn sample(logits: &[f32], s: &Sampling, rng: &mut Rng) -> usize {
    if s.temperature <= 0.0 {
        return argmax(logits);
    }
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(usize, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((l - max) / s.temperature).exp()))
        .collect();
    let total: f32 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut kept = 0;
    let mut cum = 0.0;
    for p in &probs {
        cum += p.1 / total;
        kept += 1;
        if cum >= s.top_p {
            break;
        }
    }
    let probs = &probs[..kept];
    let mass: f32 = probs.iter().map(|p| p.1).sum();
    let mut u = rng.next_f32() * mass;
    for p in probs {
        if u < p.1 {
            return p.0;
        }
        u -= p.1;
    }
    probs[kept - 1].0
}

fn last_logits(logits: Tensor<3>) -> Vec<f32> {
    let [b, t, v] = logits.dims();
    logits
        .slice([b - 1..b, t - 1..t, 0..v])
        .reshape([v])
        .try_into_vec_as::<f32>()
        .unwrap_or_default()
}

/// How many new tokens `generate` will produce at most for a prompt of `prompt_len`: the
/// asked number, cut so the sequence stays within the model's max_position_embeddings.
pub fn new_token_budget(model: &CausalLm, prompt_len: usize, asked: usize) -> usize {
    asked.min(model.max_positions.saturating_sub(prompt_len))
}

/// Continues one unpadded prompt; returns only the new tokens, never more than fit in the
/// model's max_position_embeddings (`new_token_budget`). `on_token` sees each token as it
/// is chosen, for streaming.
pub fn generate(
    model: &CausalLm,
    prompt: &[i64],
    cfg: &GenerateConfig,
    mut on_token: impl FnMut(i64),
) -> Vec<i64> {
    let mut seq: Vec<i64> = prompt.to_vec();
    let mut rng = Rng(cfg.sampling.map_or(0, |s| s.seed));
    let mut cache = KvCache::default();
    let mut pending: Vec<i64> = prompt.to_vec();
    let mut out = Vec::new();
    let none = TapRequest::none();
    for _ in 0..new_token_budget(model, prompt.len(), cfg.max_new_tokens) {
        // Phi-3 longrope: keys cached with the short table are stale once a call needs the
        // long one, so re-encode everything (transformers drops its cache at that step too).
        let next_pos = seq.len() - 1;
        if !cfg.use_cache || (cache.len > 0 && model.rope.wants_long(next_pos) != cache.long) {
            cache = KvCache::default();
            pending = seq.clone();
        }
        let inp = Inputs::new(1, pending.len(), pending.clone());
        let mut embeds = model.embed(&inp);
        // Position 0 is in this forward when nothing is cached (always so without a cache).
        if let Some(f) = cfg.bos_scale.filter(|_| cache.len == 0) {
            embeds = CausalLm::scale_sequence_starts(embeds, f, None);
        }
        let cache_arg = if cfg.use_cache {
            Some(&mut cache)
        } else {
            None
        };
        let logits = model.forward_embeds(embeds, &inp, &none, cache_arg).logits;
        let row = last_logits(logits);
        let tok = match &cfg.sampling {
            None => argmax(&row),
            Some(s) => sample(&row, s, &mut rng),
        } as i64;
        out.push(tok);
        seq.push(tok);
        on_token(tok);
        if cfg.eos_token_ids.contains(&(tok as u32)) {
            break;
        }
        pending = vec![tok];
    }
    out
}
