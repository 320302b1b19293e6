//! `adamw_8bit` in the trainer's optimizer: a full fine-tune of every oracle case (tensors of
//! 4096 values or more take 8-bit moments, the small ones f32, as bitsandbytes'
//! min_8bit_size decides) stays within 8-bit precision of torch's AdamW after a step, and a
//! resumed optimizer (moments saved and loaded) takes the next step bit for bit as the one
//! that kept running.

use phi_adapters::freeze::{self, Selection};
use phi_model::resolve::resolve_dir;
use phi_model::{cpu_device, CausalLm};
use phi_testkit::oracle::{cases, Case};
use phi_trainer::optim::{self, Kind, Optimizer};

fn values(m: &CausalLm) -> Vec<Vec<f32>> {
    m.hf_tensors().into_iter().map(|(_, t)| t.data).collect()
}

/// The case's checks; whether any of its tensors took 8-bit moments.
fn check(case: &Case) -> bool {
    let res = resolve_dir(&case.dir).unwrap();
    let dev = cpu_device().autodiff();
    let m = CausalLm::load(&res.config, res.source.as_ref(), &dev).unwrap();
    let names = freeze::trainable_names(&m, &Selection::Full).unwrap();
    let m = freeze::apply(m, &names);
    let big = m.params().iter().any(|p| p.numel() >= 4096);
    let (inp, labels) = case.batch();
    let logits = m.forward(&inp, &Default::default()).logits;
    let loss = phi_model::loss::causal_lm_loss(logits, &labels);
    let g = optim::collect(&m, &loss.backward());
    let (beta1, beta2, eps) = (0.9, 0.999, 1e-8);
    let k8 = Kind::AdamW8 { beta1, beta2, eps };
    let mut o8 = Optimizer::new(&m, k8, 0.01);
    let mut o32 = Optimizer::new(&m, Kind::AdamW { beta1, beta2, eps }, 0.01);
    let m8 = o8.step(m.clone(), g.clone(), 1e-3);
    let m32 = o32.step(m.clone(), g.clone(), 1e-3);
    // Step 1 moves every value by about lr; 8-bit moments change that by their quantization.
    let before = values(&m);
    for ((a, b), p) in values(&m8).iter().zip(values(&m32)).zip(&before) {
        for ((x, y), p0) in a.iter().zip(&b).zip(p) {
            let name = &case.name;
            assert!(x.is_finite() && (x - y).abs() <= 1e-4, "{name}: {x} vs {y}");
            let moved = (x - p0).abs();
            assert!(
                moved <= 1.1e-3,
                "{name}: a step of lr 1e-3 moved {p0} to {x}"
            );
        }
    }
    let dir = std::env::temp_dir().join(format!("phi-adam8-{}-{}", std::process::id(), case.name));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("optimizer.safetensors");
    o8.save(&file).unwrap();
    let mut resumed = Optimizer::new(&m, k8, 0.01);
    resumed.load(&file, &dev).unwrap();
    let go = |o: &mut Optimizer| values(&o.step(m8.clone(), g.clone(), 1e-3));
    assert_eq!(go(&mut o8), go(&mut resumed), "{}: resumed step", case.name);
    let _ = std::fs::remove_dir_all(&dir);
    big
}

#[test]
fn eight_bit_adamw_steps_and_resumes_exactly() {
    let mut eight_bit = 0;
    for dir in cases() {
        eight_bit += usize::from(check(&Case::open(&dir)));
    }
    assert!(
        eight_bit > 0,
        "no oracle case has a tensor of 4096 values or more (8-bit moments)"
    );
}
