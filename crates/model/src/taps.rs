//! Per-layer intermediate outputs returned with the forward result (never global state), so
//! a regularizer can differentiate through them.

use burn::tensor::Tensor;
use std::collections::BTreeMap;

/// Which intermediates a forward call should return. Layer lists are 0-based.
#[derive(Debug, Clone, Default)]
pub struct TapRequest {
    pub hidden_states: bool,
    pub input_layernorm: Vec<usize>,
    pub post_attention_layernorm: Vec<usize>,
}

impl TapRequest {
    pub fn none() -> Self {
        Self::default()
    }
    pub fn all(num_layers: usize) -> Self {
        TapRequest {
            hidden_states: true,
            input_layernorm: (0..num_layers).collect(),
            post_attention_layernorm: (0..num_layers).collect(),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct Taps {
    /// HF's `output_hidden_states`: 0 = embeddings, i = output of layer i-1, and the last
    /// entry is the final norm applied to the last layer's output.
    pub hidden_states: Vec<Tensor<3>>,
    /// With `hidden_states`: the last layer's output before the final norm (transformers 4's
    /// last hidden state; transformers 5 replaced it by the normed one).
    pub last_layer: Option<Tensor<3>>,
    pub input_layernorm: BTreeMap<usize, Tensor<3>>,
    pub post_attention_layernorm: BTreeMap<usize, Tensor<3>>,
}

/// The slot one layer writes its norm outputs into.
#[derive(Default)]
pub struct LayerTaps {
    want_in: bool,
    want_post: bool,
    pub(crate) input: Option<Tensor<3>>,
    pub(crate) post: Option<Tensor<3>>,
}

impl LayerTaps {
    pub(crate) fn for_layer(req: &TapRequest, i: usize) -> Self {
        LayerTaps {
            want_in: req.input_layernorm.contains(&i),
            want_post: req.post_attention_layernorm.contains(&i),
            input: None,
            post: None,
        }
    }
    pub fn input_layernorm(&mut self, t: &Tensor<3>) {
        if self.want_in {
            self.input = Some(t.clone());
        }
    }
    pub fn post_attention_layernorm(&mut self, t: &Tensor<3>) {
        if self.want_post {
            self.post = Some(t.clone());
        }
    }
}
