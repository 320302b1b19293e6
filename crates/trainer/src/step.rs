//! The step: one forward with the run's regularizer inputs (BOS scaling of the embeddings,
//! the norm taps the norm-target term reads), used alike by training, evaluation, prediction
//! and samples, so every metric of a run sees the same model; the micro-batch's loss and
//! gradients; the held-out loss.

use crate::args::TrainArgs;
use crate::data::{self, Examples};
use crate::optim::{self, Grads};
use burn::module::Module;
use burn::tensor::{DType, Device, Tensor};
use phi_data::encode::Encoded;
use phi_data::Batch;
use phi_model::loss::IGNORE_INDEX;
use phi_model::{CausalLm, Inputs, Output, TapRequest, Taps};
use phi_regularizers::{BosScale, NormTarget};

/// The recipe's terms: what they add to the loss and how they edit the input.
#[derive(Default)]
pub struct Regs {
    pub norm: Option<NormTarget>,
    pub bos: Option<BosScale>,
}

impl Regs {
    /// The factor generation applies to position 0, as the forward does.
    pub fn bos_factor(&self) -> Option<f64> {
        self.bos.map(|b| b.factor)
    }
}

/// The model's forward on `inp` with the BOS scaling applied to its embeddings.
pub fn forward(model: &CausalLm, inp: &Inputs, regs: &Regs, req: &TapRequest) -> Output {
    let (h, taps) = hidden(model, inp, regs, req);
    Output {
        logits: model.head(h),
        taps,
    }
}

/// `forward` without the head: the final hidden states, for `CausalLm::loss_sum`.
fn hidden(model: &CausalLm, inp: &Inputs, regs: &Regs, req: &TapRequest) -> (Tensor<3>, Taps) {
    let mut emb = model.embed(inp);
    if let Some(bos) = &regs.bos {
        emb = bos.apply(emb, inp.position_ids.as_deref());
    }
    model.forward_hidden(emb, inp, req, None)
}

/// One micro-batch's forward and backward. Returns its gradients, its summed token loss
/// and its regularizer value. `denom` is the label-token count of the whole accumulated
/// batch (HF's `num_items_in_batch`), `parts` its number of micro-batches.
pub fn micro_step(
    model: &CausalLm,
    b: &Batch,
    regs: &Regs,
    (denom, parts, loss_scale): (f64, f64, f64),
    layerwise: bool,
) -> (Grads, f64, f64) {
    let inp = crate::inputs(b);
    if layerwise && regs.norm.is_none() {
        let bos = regs.bos.as_ref();
        let (g, sum) = crate::layerwise::grads(model, &inp, &b.labels, bos, denom, loss_scale);
        return (g, sum, 0.0);
    }
    let req = regs.norm.as_ref().map(NormTarget::taps).unwrap_or_default();
    let (h, taps) = hidden(model, &inp, regs, &req);
    let (sum, _) = model.loss_sum(h, &b.labels);
    let sum_val = scalar(&sum);
    let mut loss = sum / denom;
    let mut reg_val = 0.0;
    if let Some(norm) = &regs.norm {
        let r = norm.loss(&taps, Some(&b.attention_mask)) / parts;
        reg_val = scalar(&r);
        loss = loss + r;
    }
    if loss_scale != 1.0 {
        loss = loss * loss_scale;
    }
    let grads = loss.backward();
    (optim::collect(model, &grads), sum_val, reg_val)
}

/// Mean token loss over `examples` with dropout off and no graph.
pub fn evaluate(
    model: &CausalLm,
    examples: &[Encoded],
    batch: usize,
    ex: &Examples,
    regs: &Regs,
) -> Option<f64> {
    if examples.is_empty() {
        return None;
    }
    let m = model.valid();
    let (mut sum, mut count) = (0.0, 0usize);
    let idx: Vec<usize> = (0..examples.len()).collect();
    for chunk in idx.chunks(batch.max(1)) {
        let b = data::collate(examples, chunk, &ex.collator);
        let inp = crate::inputs(&b);
        let (h, _) = hidden(&m, &inp, regs, &TapRequest::none());
        let (s, c) = m.loss_sum(h, &b.labels);
        sum += scalar(&s);
        count += c;
    }
    Some(sum / count.max(1) as f64)
}

/// Label tokens of a micro-batch the loss counts (labels are shifted inside the loss:
/// position 0 of each row never counts).
pub fn label_count(b: &Batch) -> usize {
    (0..b.batch)
        .map(|r| {
            b.labels[r * b.seq + 1..(r + 1) * b.seq]
                .iter()
                .filter(|&&l| l != IGNORE_INDEX)
                .count()
        })
        .sum()
}

/// The autocast dtype for `--bf16` / `--fp16`, or None (f32) where the device has no
/// kernels for it (with a warning).
pub fn mixed_precision(a: &TrainArgs, device: &Device) -> Option<DType> {
    let (dtype, name) = match (a.bf16, a.fp16) {
        (true, _) => (DType::BF16, "bf16"),
        (_, true) => (DType::F16, "fp16"),
        _ => return None,
    };
    if !device.supports_dtype(dtype) {
        // Vulkan's shading languages have f16 but no bf16 type.
        let instead = match dtype == DType::BF16 && device.supports_dtype(DType::F16) {
            true => "; --fp16 runs in f16 there",
            false => "",
        };
        eprintln!(
            "warning: {name}: device {} has no {name} kernels; training in f32{instead}",
            a.device
        );
        return None;
    }
    // Flex has half kernels, but its bf16/f16 GEMMs are slower than its f32 one and the
    // casts cost memory (docs/benchmarks.md), so a CPU run stays in f32 unless asked; bf16
    // runs on our matrix-unit kernels instead where the CPU has them (`cpu_bf16`).
    if a.device == "cpu" && !cpu_half_forced() {
        if cpu_bf16(a).is_some() {
            return None;
        }
        let why = match dtype {
            DType::BF16 => "this CPU has neither AMX nor AVX512-BF16, which our bf16 kernels \
                            need to beat f32"
                .to_string(),
            _ => format!("Flex's {name} GEMM runs at 0.4-0.8x its f32 rate here"),
        };
        eprintln!(
            "warning: {name} on the CPU backend: {why}; training in f32. PHI_CPU_HALF=1 runs \
             Flex's {name} anyway"
        );
        return None;
    }
    Some(dtype)
}

fn cpu_half_forced() -> bool {
    std::env::var("PHI_CPU_HALF").is_ok_and(|v| v == "1")
}

/// The bf16 kernel path `--bf16` runs frozen weights on, on a CPU with bf16 matrix units
/// (the frozen weights are then kept in bf16; trainable ones stay f32).
pub fn cpu_bf16(a: &TrainArgs) -> Option<phi_kernels::bf16::Path> {
    (a.bf16 && a.device == "cpu" && !cpu_half_forced())
        .then(phi_model::bf16::cpu_path)
        .flatten()
}

fn scalar(t: &Tensor<1>) -> f64 {
    t.clone().inner().into_scalar::<f32>() as f64
}
