//! Packing changes no loss: on every oracle model, each example's summed token loss inside a
//! packed row equals its loss alone (attention stays inside the example, positions restart).

use burn::tensor::Tensor;
use phi_data::batch::pack;
use phi_data::{Collator, Encoded, IGNORE};
use phi_model::loss::causal_lm_loss_sum;
use phi_model::resolve::resolve_dir;
use phi_model::{cpu_device, CausalLm, TapRequest};
use phi_testkit::oracle::{cases, Report};
use phi_trainer::inputs;

fn loss_sum(model: &CausalLm, rows: &[&Encoded], labels: &[i64]) -> f32 {
    let b = Collator {
        pad_id: 0,
        pad_to_multiple_of: None,
    }
    .collate(rows);
    let logits: Tensor<3> = model.forward(&inputs(&b), &TapRequest::none()).logits;
    let (sum, _) = causal_lm_loss_sum(logits, labels);
    sum.into_scalar()
}

#[test]
fn packed_rows_give_each_example_its_unpacked_loss() {
    let mut r = Report::default();
    for dir in cases() {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let res = resolve_dir(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
        let model = CausalLm::load(&res.config, res.source.as_ref(), &cpu_device()).unwrap();
        let vocab = res.config.vocab_size as u32;
        let examples: Vec<Encoded> = [6usize, 9, 4, 7]
            .iter()
            .enumerate()
            .map(|(k, &n)| {
                let ids: Vec<u32> = (0..n as u32)
                    .map(|i| (i * 7 + k as u32 * 13 + 3) % vocab)
                    .collect();
                // A masked prompt of two tokens, then trained tokens.
                let labels = ids
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| if i < 2 { IGNORE } else { x as i64 })
                    .collect();
                Encoded {
                    input_ids: ids,
                    labels,
                    ..Encoded::default()
                }
            })
            .collect();
        let rows = pack(&examples, 16);
        assert!(
            rows.iter()
                .any(|row| row.attention_mask.as_ref().unwrap().contains(&2)),
            "{name}: something packed"
        );
        for row in &rows {
            let mask = row.attention_mask.as_ref().unwrap();
            for seg in 1..=*mask.iter().max().unwrap() {
                let start = mask.iter().position(|&m| m == seg).unwrap();
                let len = mask.iter().filter(|&&m| m == seg).count();
                let ids = &row.input_ids[start..start + len];
                let alone = examples
                    .iter()
                    .find(|e| e.input_ids == ids)
                    .expect("packed example");
                let only: Vec<i64> = row
                    .labels
                    .iter()
                    .zip(mask)
                    .map(|(&l, &m)| if m == seg { l } else { IGNORE })
                    .collect();
                let packed = loss_sum(&model, &[row], &only);
                let single = loss_sum(&model, &[alone], &alone.labels);
                r.close(
                    &name,
                    &format!("segment {seg} of a packed row"),
                    &[packed],
                    &[single],
                    1e-4 * single.abs().max(1.0),
                );
            }
        }
    }
    r.finish();
}
