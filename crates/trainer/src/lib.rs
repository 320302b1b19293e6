//! phi-trainer: where data batches meet the model. The training loop lands here next; for now
//! the bridge from `phi_data::Batch` to the model's `Inputs`.

use phi_data::Batch;
use phi_model::Inputs;

/// The model inputs of a batch: ids, the (possibly segment-numbered) mask, packed positions.
pub fn inputs(b: &Batch) -> Inputs {
    let mut inp =
        Inputs::new(b.batch, b.seq, b.input_ids.clone()).with_mask(b.attention_mask.clone());
    inp.position_ids = b.position_ids.clone();
    inp
}
