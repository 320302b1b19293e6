//! QLoRA's quantized base (LLaMA-Factory's `--quantization_bit 4|8`): every linear weight of
//! the decoder layers is quantized as it is loaded, one tensor at a time, with bitsandbytes'
//! formats (NF4 / FP4 blocks of 64, optionally with quantized scales; int8 rows), and kept
//! only in that form. The embedding and the LM head stay unquantized, as transformers' bnb
//! integration leaves them.

use crate::error::ModelError;
use crate::model::CausalLm;
use crate::weights::{Converting, HostTensor, LinearWeight, TensorSource};
use phi_kernels::quant::{bnb, QType};

/// How a loaded base is quantized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantSpec {
    /// Nf4, Fp4 or Int8.
    pub ty: QType,
    /// Double quantization of the 4-bit scales.
    pub nested: bool,
}

impl QuantSpec {
    /// LLaMA-Factory's `quantization_bit` / `quantization_type` / `double_quantization`.
    pub fn from_lf(bits: u32, kind: &str, nested: bool) -> Result<QuantSpec, String> {
        let ty = match (bits, kind) {
            (8, _) => QType::Int8,
            (4, "nf4") => QType::Nf4,
            (4, "fp4") => QType::Fp4,
            (4, other) => {
                return Err(format!(
                    "quantization_type: expected nf4 or fp4, found {other:?}"
                ))
            }
            (other, _) => return Err(format!("quantization_bit: expected 4 or 8, found {other}")),
        };
        Ok(QuantSpec { ty, nested })
    }
}

/// A source whose decoder-layer linear weights come out quantized by `spec`.
pub fn quantizing(
    inner: &dyn TensorSource,
    spec: QuantSpec,
) -> Converting<'_, impl Fn(&str, HostTensor) -> Result<LinearWeight, ModelError> + '_> {
    let convert = move |name: &str, w: HostTensor| {
        if !name.starts_with("model.layers.") {
            return Ok(LinearWeight::F32(w));
        }
        let (d_out, d_in) = (w.shape[0], w.shape[1]);
        let q = match spec.ty {
            QType::Int8 => bnb::quantize8(&w.data, d_out, d_in),
            ty => bnb::quantize4(ty, &w.data, d_out, d_in, spec.nested),
        };
        q.map(LinearWeight::Quant)
            .map_err(|e| ModelError::tensor(inner.file_of(name), name, e.0))
    };
    Converting { inner, convert }
}

/// What a model holds quantized: (weights, their bytes, the types seen).
pub struct QuantSummary {
    pub weights: usize,
    pub bytes: usize,
    pub types: Vec<&'static str>,
}

impl QuantSummary {
    /// "N linear weights held quantized (types), M MB" where there are any.
    pub fn line(&self) -> Option<String> {
        (self.weights > 0).then(|| {
            format!(
                "base: {} linear weights held quantized ({}), {:.0} MB",
                self.weights,
                self.types.join(", "),
                self.bytes as f64 / 1e6
            )
        })
    }
}

impl CausalLm {
    /// The linear weights held in a quantized block format.
    pub fn quant_summary(&self) -> QuantSummary {
        let mut s = QuantSummary {
            weights: 0,
            bytes: 0,
            types: vec![],
        };
        let layers = self.model.layers.iter();
        let linears = layers.flat_map(|l| l.block().linears().into_iter().map(|(_, l)| l));
        for l in linears.chain(self.lm_head.as_ref()) {
            if let Some(q) = l.packed.as_ref().and_then(|w| w.quant()) {
                s.weights += 1;
                s.bytes += q.bytes();
                if !s.types.contains(&q.ty.name()) {
                    s.types.push(q.ty.name());
                }
            }
        }
        s
    }

    /// The names of quantized linear weights that are set to train (a quantized weight has
    /// no f32 values to update: LoRA and norm-only training keep it frozen).
    pub fn trainable_quantized(&self) -> Vec<String> {
        let mut out = vec![];
        for (i, layer) in self.model.layers.iter().enumerate() {
            for (name, l) in layer.block().linears() {
                let quant = l.packed.as_ref().is_some_and(|w| w.quant().is_some());
                if quant && l.weight.is_require_grad() {
                    out.push(format!("model.layers.{i}.{name}.weight"));
                }
            }
        }
        if let Some(h) = &self.lm_head {
            if h.packed.as_ref().is_some_and(|w| w.quant().is_some()) && h.weight.is_require_grad()
            {
                out.push("lm_head.weight".into());
            }
        }
        out
    }
}
