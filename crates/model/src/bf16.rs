//! `--bf16` on the CPU's matrix units (AMX, AVX512-BF16): every frozen linear weight is
//! packed in bf16 for phi-kernels' GEMMs, which its forward and input gradient then run on,
//! and its f32 copy is dropped: the frozen base is held in bf16, as LLaMA-Factory's `--bf16`
//! loads it. A quantized base weight keeps its blocks and runs on the same kernels. A frozen tied head gets a packed copy beside the f32 table its embedding reads.
//! Trainable linear weights keep their f32 masters and run on the same kernels, rounded and
//! packed per call (forward, input and weight gradients); LoRA factors stay f32 on the f32
//! path. [`CausalLm::unpack_bf16`] brings the f32 weights back (as their bf16 values).

use crate::error::ModelError;
use crate::model::CausalLm;
use crate::nn::Linear;
use crate::weights::{Converting, HostTensor, LinearWeight, TensorSource};
use burn::tensor::{Tensor, TensorData};
use phi_kernels::bf16::Path;
use phi_kernels::packed::PackedWeight;
use std::sync::Arc;

/// The matrix-unit path `--bf16` uses on this CPU: AMX, else AVX512-BF16 (on a Zen 4 it
/// runs at twice Flex's f32 GEMM rate, docs/benchmarks.md); None where neither runs (the
/// scalar path is a reference, slower than f32).
pub fn cpu_path() -> Option<Path> {
    Some(Path::best()).filter(|&p| p != Path::Scalar)
}

fn host(t: burn::tensor::Tensor<2>) -> Vec<f32> {
    t.inner().try_into_vec_as::<f32>().unwrap_or_default()
}

fn pack_linear(l: &mut Linear, path: Path) -> bool {
    if l.weight.is_require_grad() {
        unpack_linear(l);
        l.train_bf16 = Some(path);
        return false;
    }
    l.train_bf16 = None;
    if let Some(w) = l.packed.as_ref().and_then(|w| w.on_path(Some(path))) {
        // A quantized base stays in its blocks: only its products move to the bf16 kernels.
        l.packed = Some(Arc::new(w));
        return true;
    }
    let same = |w: &PackedWeight| w.quant().is_none() && w.path == Some(path);
    if l.packed
        .as_deref()
        .is_some_and(|w| same(w) && l.f32_dropped_with(w))
    {
        // Packed for this path as it loaded (`packing`).
        return true;
    }
    let (d_in, d_out) = (l.d_in(), l.d_out());
    let w = match l.packed.take() {
        // Packed already: repack its bf16 values (the same ones) for this path.
        Some(w) if l.f32_dropped_with(&w) => w.unpack(),
        _ => host(l.weight.val()),
    };
    l.packed = Some(Arc::new(PackedWeight::in_out(&w, d_in, d_out, path)));
    l.weight = l.weight.clone().map(|t| Tensor::zeros([0, 0], &t.device()));
    true
}

/// The f32 weight back from its packing where that is all there is; the packing dropped.
fn unpack_linear(l: &mut Linear) {
    l.train_bf16 = None;
    if let Some(w) = l.packed.take() {
        if l.f32_dropped_with(&w) {
            let data = TensorData::new(w.unpack(), [w.d_in(), w.d_out()]);
            let trains = l.weight.is_require_grad();
            let weight = l
                .weight
                .clone()
                .map(|t| Tensor::from_data(data, &t.device()));
            l.weight = weight.set_require_grad(trains);
        }
    }
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
        let tied = self.lm_head.is_none();
        self.head_train_bf16 = (tied && table.is_require_grad()).then_some(path);
        self.attention_bf16 = Some(path);
        if tied && !table.is_require_grad() {
            let [v, h] = table.val().dims();
            let w = PackedWeight::out_in(&host(table.val()), v, h, path);
            self.head_bf16 = Some(Arc::new(w));
            n += 1;
        }
        // The dropped f32 weights: back to the system, not kept for reuse (`alloc::tune`).
        crate::alloc::release_free();
        n
    }

    /// How many trainable linear weights `pack_bf16` put on the bf16 kernels.
    pub fn bf16_trainable(&self) -> usize {
        let layers = self.model.layers.iter();
        let linears = layers.flat_map(|l| l.block().linears().into_iter().map(|(_, l)| l));
        let n = linears.chain(self.lm_head.as_ref());
        n.filter(|l| l.train_bf16.is_some()).count() + usize::from(self.head_train_bf16.is_some())
    }

    /// Undoes `pack_bf16`: every weight back in f32 (its bf16 value where only that was
    /// kept) and no packing left, for code that reads or changes the f32 weights (merging).
    pub fn unpack_bf16(&mut self) {
        for layer in &mut self.model.layers {
            for (_, l) in layer.block_mut().linears_mut() {
                unpack_linear(l);
            }
        }
        if let Some(h) = &mut self.lm_head {
            unpack_linear(h);
        }
        self.head_bf16 = None;
        self.head_train_bf16 = None;
        self.attention_bf16 = None;
    }
}

/// A source whose linear weights come packed in bf16 for `path`, each as it loads (a frozen
/// base under `--bf16` never held in f32 whole: a seed-size model's f32 would not fit).
pub fn packing(
    inner: &dyn TensorSource,
    path: Path,
) -> Converting<'_, impl Fn(&str, HostTensor) -> Result<LinearWeight, ModelError>> {
    let convert = move |_: &str, w: HostTensor| {
        let (d_out, d_in) = (w.shape[0], w.shape[1]);
        Ok(LinearWeight::Packed(PackedWeight::out_in(
            &w.data, d_out, d_in, path,
        )))
    };
    Converting { inner, convert }
}
