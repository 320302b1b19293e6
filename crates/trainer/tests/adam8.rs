//! `adamw_8bit` in the trainer's optimizer: a full fine-tune of an oracle case (its larger
//! tensors take 8-bit moments, the small ones f32, as bitsandbytes' min_8bit_size decides)
//! stays within 8-bit precision of torch's AdamW after a step, and a resumed optimizer
//! (moments saved and loaded) takes the next step bit for bit as the one that kept running.

use phi_adapters::freeze::{self, Selection};
use phi_model::resolve::resolve_dir;
use phi_model::{cpu_device, CausalLm};
use phi_testkit::oracle::{cases, Case};
use phi_trainer::optim::{self, Kind, Optimizer};

fn values(m: &CausalLm) -> Vec<Vec<f32>> {
    m.hf_tensors().into_iter().map(|(_, t)| t.data).collect()
}

#[test]
fn eight_bit_adamw_steps_and_resumes_exactly() {
    let case = Case::open(&cases()[0]);
    let res = resolve_dir(&case.dir).unwrap();
    let dev = cpu_device().autodiff();
    let m = CausalLm::load(&res.config, res.source.as_ref(), &dev).unwrap();
    let names = freeze::trainable_names(&m, &Selection::Full).unwrap();
    let m = freeze::apply(m, &names);
    let big = m.params().iter().filter(|p| p.numel() >= 4096).count();
    assert!(
        big > 0,
        "the case has tensors of 4096 values or more (8-bit moments)"
    );
    let (inp, labels) = case.batch();
    let loss =
        phi_model::loss::causal_lm_loss(m.forward(&inp, &Default::default()).logits, &labels);
    let g = optim::collect(&m, &loss.backward());
    let (b1, b2, eps) = (0.9, 0.999, 1e-8);
    let k8 = Kind::AdamW8 {
        beta1: b1,
        beta2: b2,
        eps,
    };
    let mut o8 = Optimizer::new(&m, k8, 0.01);
    let mut o32 = Optimizer::new(
        &m,
        Kind::AdamW {
            beta1: b1,
            beta2: b2,
            eps,
        },
        0.01,
    );
    let m8 = o8.step(m.clone(), g.clone(), 1e-3);
    let m32 = o32.step(m.clone(), g.clone(), 1e-3);
    // Step 1 moves every value by about lr; 8-bit moments change that by their quantization.
    let before = values(&m);
    for ((a, b), p) in values(&m8).iter().zip(values(&m32)).zip(&before) {
        for ((x, y), p0) in a.iter().zip(&b).zip(p) {
            assert!(x.is_finite() && (x - y).abs() <= 1e-4, "{x} vs {y}");
            assert!(
                (x - p0).abs() <= 1.1e-3,
                "a step of lr 1e-3 moved {p0} to {x}"
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("phi-adam8-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("optimizer.safetensors");
    o8.save(&file).unwrap();
    let mut resumed = Optimizer::new(&m, k8, 0.01);
    resumed.load(&file, &dev).unwrap();
    let go = |o: &mut Optimizer| values(&o.step(m8.clone(), g.clone(), 1e-3));
    assert_eq!(go(&mut o8), go(&mut resumed));
    let _ = std::fs::remove_dir_all(&dir);
}
