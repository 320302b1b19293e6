//! `--bf16` on the CPU's matrix units (AMX, AVX512-BF16): every frozen linear weight and a
//! frozen tied head get a bf16 copy packed for phi-kernels' GEMMs, which their forward and
//! input gradient then run on. Trainable weights (and LoRA factors) stay f32 on the f32 path,
//! as the f32 masters autocast keeps.

use crate::model::CausalLm;
use crate::nn::Linear;
use phi_kernels::bf16::{Bf16Weight, Path};
use std::sync::Arc;

/// The matrix-unit path `--bf16` uses on this CPU: AMX; None elsewhere. The AVX512-BF16
/// path still runs below Flex's f32 GEMM (docs/benchmarks.md), so it is taken only when
/// `PHI_BF16_PATH=avx512-bf16` asks for it; the scalar path never.
pub fn cpu_path() -> Option<Path> {
    let p = Path::best();
    let asked = std::env::var("PHI_BF16_PATH").is_ok_and(|v| v == p.name());
    (p == Path::Amx || (p == Path::Avx512Bf16 && asked)).then_some(p)
}

fn host(t: burn::tensor::Tensor<2>) -> Vec<f32> {
    t.inner().try_into_vec_as::<f32>().unwrap_or_default()
}

fn pack_linear(l: &mut Linear, path: Path) -> bool {
    if l.weight.is_require_grad() {
        l.bf16 = None;
        return false;
    }
    let (d_in, d_out) = (l.d_in(), l.d_out());
    l.bf16 = Some(Arc::new(Bf16Weight::in_out(
        &host(l.weight.val()),
        d_in,
        d_out,
        path,
    )));
    true
}

impl CausalLm {
    /// Packs every frozen linear weight (and the tied head when the embedding is frozen) in
    /// bf16 for `path`, and drops packings of weights that train; returns how many were packed.
    /// Call it after the trainable set is final: a weight's packing is not updated with it.
    pub fn pack_bf16(&mut self, path: Path) -> usize {
        let mut n = 0;
        for layer in &mut self.model.layers {
            for (_, l) in layer.block_mut().linears_mut() {
                n += usize::from(pack_linear(l, path));
            }
        }
        if let Some(h) = &mut self.lm_head {
            n += usize::from(pack_linear(h, path));
        }
        let table = &self.model.embed_tokens.weight;
        self.head_bf16 = None;
        if self.lm_head.is_none() && !table.is_require_grad() {
            let [v, h] = table.val().dims();
            let w = Bf16Weight::out_in(&host(table.val()), v, h, path);
            self.head_bf16 = Some(Arc::new(w));
            n += 1;
        }
        n
    }
}
