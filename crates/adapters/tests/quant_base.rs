//! LoRA on a quantized base (QLoRA), for every oracle case and each of bitsandbytes' formats:
//! the case's PEFT adapter on the base quantized at load gives the logits, loss and LoRA
//! gradients of the same adapter on an f32 base holding the dequantized weights (which the
//! PEFT oracle test holds to PEFT's numbers on any weights): within f32 summation order in
//! f32, and bit for bit on every bf16 kernel path this CPU has (a path it lacks is reported
//! by name as not run).

use burn::tensor::Tensor;
use phi_adapters::freeze::{self, Selection};
use phi_adapters::peft;
use phi_kernels::bf16::Path;
use phi_kernels::quant::QType;
use phi_model::loss::causal_lm_loss;
use phi_model::params::ParamKind;
use phi_model::quantize::{quantizing, QuantSpec};
use phi_model::resolve::resolve_dir;
use phi_model::{cpu_device, CausalLm, TapRequest};
use phi_testkit::oracle::{cases, Case, Report};

fn vals<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().expect("readback")
}

/// The case's base quantized by `spec`, with its PEFT adapter (factors trainable).
fn qlora(case: &Case, spec: QuantSpec) -> CausalLm {
    let res = resolve_dir(&case.dir).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let src = quantizing(res.source.as_ref(), spec);
    let device = cpu_device().autodiff();
    let base = CausalLm::load(&res.config, &src, &device).unwrap();
    let (model, _, _) = peft::load(base, &case.dir.join("lora")).unwrap();
    let sel = Selection::Lora {
        modules_to_save: vec![],
    };
    let names = freeze::trainable_names(&model, &sel).unwrap();
    freeze::apply(model, &names)
}

/// Logits, loss and every LoRA factor's gradient (in parameter order).
fn run(model: &CausalLm, case: &Case) -> (Vec<f32>, Vec<f32>, Vec<Vec<f32>>) {
    let (inp, labels) = case.batch();
    let logits = model.forward(&inp, &TapRequest::none()).logits;
    let loss = causal_lm_loss(logits.clone(), &labels);
    let grads = loss.clone().backward();
    let mut m = model.clone();
    let mut g = vec![];
    for p in model.params() {
        if !matches!(p.kind, ParamKind::LoraA | ParamKind::LoraB) {
            continue;
        }
        let module = p.name.rsplit_once(".lora_").map(|x| x.0).unwrap();
        let l = m.linear_mut(module).unwrap().lora.as_ref().unwrap();
        let w = if p.kind == ParamKind::LoraA {
            &l.a
        } else {
            &l.b
        };
        g.push(vals(w.val().grad(&grads).expect("a LoRA gradient")));
    }
    (vals(logits), vals(loss), g)
}

fn check(case: &Case, spec: QuantSpec, paths: &[Path], r: &mut Report) {
    let name = format!("{} ({})", case.name, spec.ty.name());
    if !case.dir.join("lora/adapter_config.json").exists() {
        return r.fail(format!("{name}: no lora/ adapter"));
    }
    let quant = qlora(case, spec);
    let layers = quant.model.layers.len();
    let linears = quant.model.layers[0].block().linears().len();
    let q = quant.quant_summary();
    r.equal(
        &name,
        "quantized weights",
        &[q.weights],
        &[layers * linears],
    );
    r.equal(&name, "types", &q.types, &[spec.ty.name()]);
    let mut widened = quant.clone();
    widened.unpack_bf16();
    r.equal(&name, "widened", &[widened.quant_summary().weights], &[0]);

    let (lq, sq, gq) = run(&quant, case);
    let (lw, sw, gw) = run(&widened, case);
    r.close(&name, "f32 logits", &lq, &lw, 1e-5);
    r.close(&name, "f32 loss", &sq, &sw, 1e-6);
    r.equal(&name, "f32 gradients", &[gq.len()], &[gw.len()]);
    for (i, (a, b)) in gq.iter().zip(&gw).enumerate() {
        r.close_rel(&name, &format!("f32 gradient {i}"), a, b, 1e-6, 1e-4);
    }
    for &path in paths {
        let (mut q, mut w) = (quant.clone(), widened.clone());
        q.pack_bf16(path);
        w.pack_bf16(path);
        let ((lq, sq, gq), (lw, sw, gw)) = (run(&q, case), run(&w, case));
        let p = path.name();
        r.exact(&name, &format!("{p} logits"), &lq, &lw);
        r.exact(&name, &format!("{p} loss"), &sq, &sw);
        for (i, (a, b)) in gq.iter().zip(&gw).enumerate() {
            r.exact(&name, &format!("{p} gradient {i}"), a, b);
        }
    }
}

#[test]
fn qlora_equals_lora_on_the_dequantized_base() {
    let paths: Vec<Path> = Path::ALL.into_iter().filter(|p| p.available()).collect();
    for p in Path::ALL.into_iter().filter(|p| !paths.contains(p)) {
        eprintln!("bf16 kernel path {}: NOT RUN (this CPU lacks it)", p.name());
    }
    let specs = [
        QuantSpec {
            ty: QType::Nf4,
            nested: true,
        },
        QuantSpec {
            ty: QType::Fp4,
            nested: false,
        },
        QuantSpec {
            ty: QType::Int8,
            nested: false,
        },
    ];
    let mut r = Report::default();
    for dir in cases() {
        let case = Case::open(&dir);
        for spec in specs {
            check(&case, spec, &paths, &mut r);
        }
    }
    r.finish();
}
