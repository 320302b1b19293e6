//! phi-trainer: the training loop and everything around it — settings under LLaMA-Factory's
//! names, optimizer and schedules, gradient accumulation and clipping, regularizers in the
//! loss, evaluation, checkpoints and resume, logs and plots.

pub mod args;
pub mod checkpoint;
pub mod data;
pub mod error;
pub mod eval;
pub mod generation;
pub mod layerwise;
pub mod log;
pub mod metrics;
pub mod optim;
pub mod outputs;
pub mod plot;
pub mod predict;
pub mod run;
pub mod samples;
pub mod schedule;
pub mod setup;
pub mod step;

pub use args::TrainArgs;
pub use error::TrainError;
pub use run::{train, Outcome};

use phi_data::Batch;
use phi_model::Inputs;

/// The model inputs of a batch: ids, the (possibly segment-numbered) mask, packed positions.
pub fn inputs(b: &Batch) -> Inputs {
    let mut inp =
        Inputs::new(b.batch, b.seq, b.input_ids.clone()).with_mask(b.attention_mask.clone());
    inp.position_ids = b.position_ids.clone();
    inp
}
