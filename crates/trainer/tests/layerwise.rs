//! Per-layer checkpointing gives the gradients of the plain backward, for every oracle case:
//! LoRA factors (dropout off, so both passes see one function), a full fine-tune whose
//! embedding table trains (the gradient below the first layer), and LoRA on an NF4 base with
//! the bf16 kernels where the CPU has them.

use burn::tensor::Tensor;
use phi_adapters::freeze::{self, Selection};
use phi_adapters::peft;
use phi_kernels::quant::QType;
use phi_model::quantize::{quantizing, QuantSpec};
use phi_model::resolve::resolve_dir;
use phi_model::{cpu_device, CausalLm, TapRequest};
use phi_testkit::oracle::{cases, Case, Report};
use phi_trainer::{layerwise, optim};

fn model(case: &Case, quant: Option<QuantSpec>, sel: &Selection) -> CausalLm {
    let res = resolve_dir(&case.dir).unwrap();
    let dev = cpu_device().autodiff();
    let src = res.source.as_ref();
    let base = match quant {
        Some(spec) => CausalLm::load(&res.config, &quantizing(src, spec), &dev),
        None => CausalLm::load(&res.config, src, &dev),
    }
    .unwrap();
    let m = match sel {
        Selection::Lora { .. } => {
            let (mut m, _, paths) = peft::load(base, &case.dir.join("lora")).unwrap();
            for p in paths {
                let l = m.linear_mut(&p).and_then(|l| l.lora.as_mut()).unwrap();
                l.dropout = burn::nn::DropoutConfig::new(0.0).init();
            }
            m
        }
        _ => base,
    };
    let names = freeze::trainable_names(&m, sel).unwrap();
    freeze::apply(m, &names)
}

fn values(t: Tensor<1>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().unwrap()
}

fn check(case: &Case, what: &str, m: &CausalLm, rel: f32, r: &mut Report) {
    let name = format!("{} ({what})", case.name);
    let (inp, labels) = case.batch();
    let denom = 7.0;
    let emb = m.embed(&inp);
    let (h, _) = m.forward_hidden(emb, &inp, &TapRequest::none(), None);
    let (sum, _) = m.loss_sum(h, &labels);
    let plain_sum = values(sum.clone())[0] as f64;
    let plain = optim::collect(m, &(sum / denom * 3.0).backward());
    let (got, got_sum) = layerwise::grads(m, &inp, &labels, None, denom, 3.0);
    r.close(
        &name,
        "loss sum",
        &[got_sum as f32],
        &[plain_sum as f32],
        0.0,
    );
    let mut names: Vec<_> = m.params().into_iter().filter(|p| p.require_grad).collect();
    names.sort_by(|a, b| a.name.cmp(&b.name));
    r.equal(&name, "gradients", &[got.len()], &[plain.len()]);
    r.equal(&name, "trainable", &[plain.len()], &[names.len()]);
    for p in names {
        match (got.get(&p.id), plain.get(&p.id)) {
            (Some(g), Some(w)) => {
                let (g, w) = (values(g.clone()), values(w.clone()));
                // Relative to the factor's largest gradient: a bf16 difference is relative to
                // the sum's terms, not to a small element.
                let scale = w.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
                r.close(&name, &p.name, &g, &w, rel * scale);
            }
            _ => r.fail(format!("{name}: {}: no gradient", p.name)),
        }
    }
}

#[test]
fn per_layer_checkpointing_gives_the_plain_gradients() {
    let mut r = Report::default();
    let lora = Selection::Lora {
        modules_to_save: vec![],
    };
    for dir in cases() {
        let case = Case::open(&dir);
        check(&case, "lora", &model(&case, None, &lora), 1e-5, &mut r);
        check(
            &case,
            "full",
            &model(&case, None, &Selection::Full),
            1e-5,
            &mut r,
        );
        let nf4 = QuantSpec {
            ty: QType::Nf4,
            nested: true,
        };
        let mut q = model(&case, Some(nf4), &lora);
        check(&case, "nf4 lora", &q, 1e-5, &mut r);
        // On the bf16 kernels a LoRA linear whose input needs no gradient (the first layer's,
        // in the plain backward: the frozen embedding) takes its factors' gradient at f32,
        // one whose input does (every layer's, recomputed from a leaf) through a bf16
        // product, as autocast would: the first layer's factors agree to bf16 precision.
        match phi_model::bf16::cpu_path() {
            Some(path) => {
                q.pack_bf16(path);
                let what = format!("nf4 lora, {}", path.name());
                check(&case, &what, &q, 1e-2, &mut r);
            }
            None => eprintln!(
                "{}: nf4 lora on the bf16 kernels NOT RUN (this CPU has neither AMX nor AVX512-BF16)",
                case.name
            ),
        }
    }
    r.finish();
}
