//! The low-rank side path a LoRA adapter adds to a linear layer: y += s·dropout(x)·A·B.
//!
//! It lives here, inside `Linear`, because Burn modules are static structs: a side path owned
//! by the layer keeps one model type for base, adapted and merged models. Which layers get
//! one, how it is initialised, trained, saved and merged is the adapters crate's business.

use burn::module::{Module, Param};
use burn::nn::{Dropout, DropoutConfig};
use burn::tensor::module::linear;
use burn::tensor::Tensor;

#[derive(Module, Debug)]
pub struct LowRank {
    /// [in, r]: PEFT's `lora_A.weight` [r, in], transposed.
    pub a: Param<Tensor<2>>,
    /// [r, out]: PEFT's `lora_B.weight` [out, r], transposed.
    pub b: Param<Tensor<2>>,
    /// On the adapter input only, and only on an autodiff device with training enabled.
    pub dropout: Dropout,
    #[module(skip)]
    pub scale: f64,
}

impl LowRank {
    pub fn new(a: Param<Tensor<2>>, b: Param<Tensor<2>>, scale: f64, dropout: f64) -> Self {
        LowRank {
            a,
            b,
            dropout: DropoutConfig::new(dropout).init(),
            scale,
        }
    }

    pub fn rank(&self) -> usize {
        self.a.val().dims()[1]
    }

    /// The side path alone: O(tokens·r·(in+out)), never the dense [in, out] product.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let x = self.dropout.forward(x);
        // Scaling the [.., r] intermediate rather than the [.., out] result: one pass over
        // r columns instead of out.
        // Under autocast the factors (f32 masters) are cast to the input's dtype.
        let (a, b) = (self.a.val(), self.b.val());
        let (a, b) = if x.dtype() == a.dtype() {
            (a, b)
        } else {
            (a.cast(x.dtype()), b.cast(x.dtype()))
        };
        linear(linear(x, a, None) * self.scale, b, None)
    }

    /// s·A·B in Burn's [in, out] layout, for merging.
    pub fn delta(&self) -> Tensor<2> {
        self.a.val().matmul(self.b.val()) * self.scale
    }
}
