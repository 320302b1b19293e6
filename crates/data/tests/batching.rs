//! Padding, packing, shuffling and the validation split, as properties.

use phi_data::batch::{epoch_order, pack, split_val};
use phi_data::encode::{ChatFormat, IGNORE};
use phi_data::{Collator, Encoded, Tok};
use std::path::Path;

fn ex(ids: &[u32], first_trained: usize) -> Encoded {
    Encoded {
        input_ids: ids.to_vec(),
        labels: ids
            .iter()
            .enumerate()
            .map(|(i, &x)| if i < first_trained { IGNORE } else { x as i64 })
            .collect(),
        ..Encoded::default()
    }
}

#[test]
fn right_padding_masks_and_multiple_of_eight() {
    let rows = [ex(&[5, 6, 7], 1), ex(&[8, 9, 10, 11, 12], 2)];
    let c = Collator {
        pad_id: 0,
        pad_to_multiple_of: None,
    };
    let b = c.collate(&rows.iter().collect::<Vec<_>>());
    assert_eq!((b.batch, b.seq), (2, 5));
    assert_eq!(b.input_ids, vec![5, 6, 7, 0, 0, 8, 9, 10, 11, 12]);
    assert_eq!(b.attention_mask, vec![1, 1, 1, 0, 0, 1, 1, 1, 1, 1]);
    assert_eq!(
        b.labels,
        vec![IGNORE, 6, 7, IGNORE, IGNORE, IGNORE, IGNORE, 10, 11, 12]
    );
    assert!(b.position_ids.is_none());
    let c8 = Collator {
        pad_id: 0,
        pad_to_multiple_of: Some(8),
    };
    assert_eq!(c8.collate(&rows.iter().collect::<Vec<_>>()).seq, 8);

    // No pad token in GPT-2: LF pads with EOS; the padding is out of the loss either way.
    let mut gpt2 =
        Tok::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/tokenizers/gpt2"))
            .unwrap();
    assert!(gpt2.pad.is_none());
    ChatFormat::new(Some("phi2"), &mut gpt2).unwrap();
    assert_eq!(gpt2.pad_id(), Some(50256));
}

#[test]
fn packing_keeps_every_token_once_in_its_own_segment() {
    let lens = [7usize, 3, 12, 5, 5, 1, 9, 16, 2];
    let examples: Vec<Encoded> = lens
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            ex(
                &(0..n as u32)
                    .map(|i| 100 * k as u32 + i)
                    .collect::<Vec<_>>(),
                0,
            )
        })
        .collect();
    let rows = pack(&examples, 16);
    let mut seen: Vec<u32> = Vec::new();
    for r in &rows {
        assert!(r.len() <= 16);
        let mask = r.attention_mask.as_ref().unwrap();
        let pos = r.position_ids.as_ref().unwrap();
        // Segments are numbered 1.. in order, positions restart at each, first label dropped.
        let mut seg = 0;
        for i in 0..r.len() {
            if i == 0 || mask[i] != mask[i - 1] {
                seg += 1;
                assert_eq!((mask[i], pos[i], r.labels[i]), (seg, 0, IGNORE));
            } else {
                assert_eq!(pos[i], pos[i - 1] + 1);
                assert_eq!(r.labels[i], r.input_ids[i] as i64);
            }
            // Tokens of one example stay together: the hundreds digit names the example.
            if i > 0 && mask[i] == mask[i - 1] {
                assert_eq!(r.input_ids[i] / 100, r.input_ids[i - 1] / 100);
            }
        }
        seen.extend(&r.input_ids);
    }
    let mut all: Vec<u32> = examples.iter().flat_map(|e| e.input_ids.clone()).collect();
    seen.sort();
    all.sort();
    assert_eq!(seen, all, "every token exactly once");
    // 60 tokens in rows of 16 need at least 4; the greedy fill should not waste a fifth.
    assert_eq!(rows.len(), 4);
    // A padded batch of packed rows carries the segment mask and positions through.
    let b = Collator {
        pad_id: 0,
        pad_to_multiple_of: None,
    }
    .collate(&rows.iter().collect::<Vec<_>>());
    assert!(b.position_ids.is_some() && b.attention_mask.iter().any(|&m| m > 1));
}

#[test]
fn epochs_are_seeded_permutations_and_val_split_partitions() {
    let a = epoch_order(100, 42, 0);
    assert_eq!(a, epoch_order(100, 42, 0), "same seed, same order");
    assert_ne!(a, epoch_order(100, 42, 1), "a new order each epoch");
    assert_ne!(a, epoch_order(100, 7, 0));
    let mut s = a.clone();
    s.sort();
    assert_eq!(s, (0..100).collect::<Vec<_>>());

    let (train, val) = split_val(1090, 0.1, 42).unwrap();
    assert_eq!(
        (train.len(), val.len()),
        (981, 109),
        "a fraction rounds the validation size up"
    );
    let (train, val) = split_val(50, 8.0, 1).unwrap();
    assert_eq!((train.len(), val.len()), (42, 8));
    let mut both: Vec<usize> = train.into_iter().chain(val).collect();
    both.sort();
    assert_eq!(both, (0..50).collect::<Vec<_>>());
    assert_eq!(split_val(50, 0.0, 1).unwrap().1.len(), 0);
    assert!(split_val(50, 50.0, 1).unwrap_err().contains("val_size 50"));
}
