//! Per-layer gradient checkpointing, as transformers' `gradient_checkpointing` does it: the
//! forward keeps only each decoder layer's input, and the backward recomputes one layer at a
//! time with its graph, from the top down, feeding it the gradient at its output (through
//! the scalar Σ y·dy, whose gradient at y is dy exactly). Memory: the L + 1 layer inputs and
//! one layer's graph, instead of every layer's activations (Burn's balanced checkpointing
//! still keeps the outputs of compute-bound ops: 4 GB at Phi-3-mini's 1 × 512); time: one
//! more forward pass. Each layer's dropout draws from a seed set before it in both passes, so
//! the recomputed layer is the one the forward ran, bit for bit.

use crate::optim::{self, Grads};
use burn::module::Module;
use burn::tensor::{Distribution, Tensor};
use phi_model::{CausalLm, Inputs};
use phi_regularizers::BosScale;

/// The gradients and the summed token loss of one micro-batch: `(loss_sum / denom) ·
/// loss_scale` differentiated, as the plain step does (which the tests hold this to).
pub fn grads(
    model: &CausalLm,
    inp: &Inputs,
    labels: &[i64],
    bos: Option<&BosScale>,
    denom: f64,
    loss_scale: f64,
) -> (Grads, f64) {
    let device = model.device();
    // One draw from the run's stream, so the dropout masks differ between micro-batches.
    let base: Vec<f32> = Tensor::<1>::random([1], Distribution::Default, &device)
        .inner()
        .try_into_vec_as::<f32>()
        .unwrap_or_default();
    let base = base.first().map_or(0, |v| v.to_bits() as u64);
    let seed = |i: usize| base.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i as u64;
    let embeds = |m: &CausalLm| {
        let e = m.embed(inp);
        match bos {
            Some(b) => b.apply(e, inp.position_ids.as_deref()),
            None => e,
        }
    };
    let ctx = model.layer_ctx(inp, None);
    let n = model.num_layers();

    // Forward without a graph, keeping each layer's input.
    let free = model.clone().no_grad();
    let mut inputs = Vec::with_capacity(n + 1);
    inputs.push(embeds(&free));
    for i in 0..n {
        device.seed(seed(i));
        let y = free.layer(i, inputs[i].clone(), &ctx);
        inputs.push(y);
    }
    drop(free);

    // The top: final norm, head and loss.
    let x = inputs
        .pop()
        .expect("the last layer's output")
        .require_grad();
    let (sum, _) = model.loss_sum(model.final_norm(x.clone()), labels);
    let sum_val = sum
        .clone()
        .inner()
        .try_into_vec_as::<f32>()
        .map_or(f64::NAN, |v| v[0] as f64);
    let mut loss = sum / denom;
    if loss_scale != 1.0 {
        loss = loss * loss_scale;
    }
    let g = loss.backward();
    let mut all = optim::collect(model, &g);
    let mut dy = x.grad(&g);
    drop(g);

    // Each layer again, top down, with its graph.
    for i in (0..n).rev() {
        let x = inputs.pop().expect("a layer input").require_grad();
        let Some(d) = dy.take() else { break };
        device.seed(seed(i));
        let y = model.layer(i, x.clone(), &ctx);
        let d = constant(d, &y);
        let g = (y * d).sum().backward();
        optim::accumulate(&mut all, optim::collect(model, &g));
        dy = x.grad(&g);
    }
    // Below the first layer: the embedding table, where it trains.
    let table = &model.model.embed_tokens.weight;
    if let (Some(d), true) = (dy, table.is_require_grad()) {
        let e = embeds(model);
        let d = constant(d, &e);
        let g = (e * d).sum().backward();
        optim::accumulate(&mut all, optim::collect(model, &g));
    }
    (all, sum_val)
}

/// `d` as a constant of `like`'s graph (the same checkpointing strategy: tensors of two
/// strategies cannot meet in one op).
fn constant(d: Tensor<3>, like: &Tensor<3>) -> Tensor<3> {
    let d = Tensor::from_inner(d);
    match like.gradient_checkpointing_strategy() {
        Some(s) => d.with_gradient_checkpointing_strategy(s),
        None => d,
    }
}
