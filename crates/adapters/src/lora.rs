//! Attaching fresh LoRA side paths: A kaiming-uniform (PEFT's `a=√5`, i.e. U(±1/√in)),
//! B zeros, so a new adapter starts as a no-op.

use crate::config::LoraConfig;
use crate::error::AdapterError;
use crate::targets;
use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use phi_model::lowrank::LowRank;
use phi_model::rng::SplitMix;
use phi_model::CausalLm;

/// FNV-1a, so each module's init depends on the seed and its name, not on visiting order.
fn name_hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

pub fn matrix(data: Vec<f32>, shape: [usize; 2], device: &Device) -> Param<Tensor<2>> {
    Param::from_tensor(Tensor::from_data(TensorData::new(data, shape), device))
}

/// Adds a new adapter on every targeted layer; returns the targeted module paths.
pub fn attach(model: &mut CausalLm, cfg: &LoraConfig) -> Result<Vec<String>, AdapterError> {
    let paths = targets::resolve(model, cfg)?;
    let device = model.device();
    for path in &paths {
        let r = cfg.rank_for(path);
        let scale = cfg.scale_for(path);
        let lin = model
            .linear_mut(path)
            .ok_or_else(|| AdapterError::Other(format!("{path}: not a linear layer")))?;
        if lin.lora.is_some() {
            return Err(AdapterError::Other(format!(
                "{path}: already has an adapter (merge it first)"
            )));
        }
        let (din, dout) = (lin.d_in(), lin.d_out());
        let bound = 1.0 / (din as f32).sqrt();
        let mut rng = SplitMix(cfg.seed ^ name_hash(path));
        let a: Vec<f32> = (0..din * r)
            .map(|_| (rng.next_f32() * 2.0 - 1.0) * bound)
            .collect();
        lin.lora = Some(LowRank::new(
            matrix(a, [din, r], &device),
            matrix(vec![0.0; r * dout], [r, dout], &device),
            scale,
            cfg.dropout,
        ));
    }
    Ok(paths)
}

/// Module paths that carry an adapter, in model order.
pub fn adapted(model: &CausalLm) -> Vec<String> {
    model
        .linears()
        .into_iter()
        .filter(|(_, l)| l.lora.is_some())
        .map(|(p, _)| p)
        .collect()
}
