//! `--profile`: the model's ops timed in isolation at the shape's sizes (batch × seq tokens),
//! each as forward only and as forward + backward on the autodiff device, then multiplied by
//! how often one training step runs it. One JSON line per op. Isolated timings miss fusion
//! and cache effects between ops, so the per-op sum only approximates a real step.

use crate::shapes::{median, shape_config};
use crate::Args;
use anyhow::Result;
use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::activation::gelu_approximate;
use burn::tensor::{Device, Distribution, Tensor};
use phi_kernels::{causal_softmax, swiglu, swiglu_packed};
use phi_model::arch::Mlp;
use phi_model::loss::causal_lm_loss_sum;
use phi_model::lowrank::LowRank;
use phi_model::nn::{
    apply_rotary, attend, rotary_attention, split_heads, LayerCtx, Linear, Projected, RmsNorm,
};
use phi_model::weights::RandomSource;
use phi_model::CausalLm;
use phi_trainer::optim::{Grads, Kind, Optimizer};
use serde_json::json;
use std::time::Instant;

fn rand<const D: usize>(shape: [usize; D], dev: &Device) -> Tensor<D> {
    Tensor::<D>::random(shape, Distribution::Uniform(-1.0, 1.0), dev)
}

/// Median seconds of `reps` calls after one warm-up.
fn time(dev: &Device, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t = Vec::new();
    for _ in 0..reps {
        let t0 = Instant::now();
        f();
        dev.sync().ok();
        t.push(t0.elapsed().as_secs_f64());
    }
    median(&mut t)
}

/// Forward-only and forward + backward seconds of `op` on an input of `shape`.
fn op_times<const D: usize, const E: usize>(
    inner: &Device,
    ad: &Device,
    shape: [usize; D],
    reps: usize,
    op: impl Fn(Tensor<D>) -> Tensor<E>,
) -> (f64, f64) {
    let x = rand(shape, inner);
    let fwd = time(inner, reps, || {
        std::hint::black_box(op(x.clone()));
    });
    let xa = rand(shape, ad).require_grad();
    let bwd = time(ad, reps, || {
        let g = op(xa.clone()).sum().backward();
        std::hint::black_box(xa.grad(&g));
    });
    (fwd, bwd)
}

fn linear(din: usize, dout: usize, trainable: bool, rank: usize, dev: &Device) -> Linear {
    let w = Param::from_tensor(rand([din, dout], dev) * (1.0 / (din as f64).sqrt()));
    let lora = (rank > 0).then(|| {
        let a = Param::from_tensor(rand([din, rank], dev));
        let b = Param::from_tensor(rand([rank, dout], dev) * 0.01);
        LowRank::new(a, b, 2.0, 0.0)
    });
    Linear {
        weight: w.set_require_grad(trainable),
        bias: None,
        lora,
        packed: None,
        train_bf16: None,
    }
}

/// Stand-in gradients (each parameter's own values) for every trainable parameter.
fn fake_grads(model: &CausalLm) -> Grads {
    struct V(Grads);
    impl ModuleVisitor for V {
        fn visit_float<const D: usize>(&mut self, p: &Param<Tensor<D>>) {
            let t = p.val();
            if t.is_require_grad() {
                let n = t.shape().num_elements();
                self.0.insert(p.id, t.inner().reshape([n]) * 1e-3);
            }
        }
    }
    let mut v = V(Grads::new());
    model.visit(&mut v);
    v.0
}

pub fn run(a: &Args) -> Result<()> {
    let cfg = shape_config(&a.shape)?;
    let inner = phi_model::device_from_name(&a.device)?;
    let ad = inner.clone().autodiff();
    let (b, t, h, i, v) = (
        a.batch,
        a.seq,
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.vocab_size,
    );
    let (heads, kvh, hd, layers) = (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        cfg.num_hidden_layers,
    );
    let reps = a.steps.max(1);
    let mut rows: Vec<(String, usize, (f64, f64))> = Vec::new();
    let shapes: Vec<(usize, usize)> = cfg
        .arch
        .layer_linears(&cfg)
        .iter()
        .map(|s| (s.d_in, s.d_out))
        .collect();
    for (label, trainable, rank) in [
        ("linears, frozen W + LoRA r16 (one layer)", false, a.rank),
        ("linears, trainable W (one layer)", true, 0),
    ] {
        let lin: Vec<_> = shapes
            .iter()
            .map(|&(di, dout)| (linear(di, dout, trainable, rank, &inner), di))
            .collect();
        let lin_ad: Vec<_> = shapes
            .iter()
            .map(|&(di, dout)| (linear(di, dout, trainable, rank, &ad), di))
            .collect();
        let xs: Vec<_> = lin
            .iter()
            .map(|(_, di)| rand([b, t, *di], &inner))
            .collect();
        let xs_ad: Vec<_> = lin_ad
            .iter()
            .map(|(_, di)| rand([b, t, *di], &ad).require_grad())
            .collect();
        let fwd = time(&inner, reps, || {
            for ((l, _), x) in lin.iter().zip(&xs) {
                std::hint::black_box(l.forward(x.clone()));
            }
        });
        let bwd = time(&ad, reps, || {
            for ((l, _), x) in lin_ad.iter().zip(&xs_ad) {
                let g = l.forward(x.clone()).sum().backward();
                std::hint::black_box(x.grad(&g));
            }
        });
        rows.push((label.into(), layers, (fwd, bwd)));
    }
    let rope_cos = rand([1, 1, t, hd], &inner);
    let rope_cos_ad = rand([1, 1, t, hd], &ad);
    let rope = |x: Tensor<4>| {
        let c = if x.is_autodiff() {
            &rope_cos_ad
        } else {
            &rope_cos
        };
        apply_rotary(x, c, c)
    };
    rows.push((
        "rope (q and k heads)".into(),
        layers,
        op_times(&inner, &ad, [b, heads + kvh, t, hd], reps, rope),
    ));
    let ctx = |dev: &Device, bf16| LayerCtx {
        cos: rand([1, 1, t, hd], dev),
        sin: rand([1, 1, t, hd], dev),
        // `attend` reads the tensors only; the host table is the fused op's.
        rope: std::sync::Arc::new(phi_kernels::rotary::Rotary {
            cos: vec![1.0; t * hd],
            sin: vec![0.0; t * hd],
            rows: 1,
            t,
            rot: hd,
        }),
        mask: None,
        hidden: None,
        bias: None,
        bf16,
    };
    let (ctx_in, ctx_ad) = (ctx(&inner, None), ctx(&ad, None));
    let attn = |x: Tensor<3>| {
        let ctx = if x.is_autodiff() { &ctx_ad } else { &ctx_in };
        let q = split_heads(x.clone().slice([0..b, 0..t, 0..heads * hd]), heads);
        let k = split_heads(x.clone().slice([0..b, 0..t, 0..kvh * hd]), kvh);
        let vv = split_heads(x.slice([0..b, 0..t, 0..kvh * hd]), kvh);
        attend(q, k, vv, ctx, None)
    };
    rows.push((
        "attention, causal, GQA (QK·softmax·PV)".into(),
        layers,
        op_times(&inner, &ad, [b, t, heads * hd], reps, attn),
    ));
    // `--dtype bf16`: the fused op on the bf16 kernels, as `--bf16` trains (fused q, k, v in).
    let path = phi_kernels::bf16::Path::best();
    if a.dtype == "bf16" && path != phi_kernels::bf16::Path::Scalar {
        let (c16_in, c16_ad) = (ctx(&inner, Some(path)), ctx(&ad, Some(path)));
        let fused = |x: Tensor<3>| {
            let ctx = if x.is_autodiff() { &c16_ad } else { &c16_in };
            rotary_attention(Projected::Fused(x), heads, kvh, ctx, None)
        };
        rows.push((
            format!("attention, fused rotary, {} products", path.name()),
            layers,
            op_times(&inner, &ad, [b, t, (heads + 2 * kvh) * hd], reps, fused),
        ));
    }
    rows.push((
        "  of which causal softmax [B,H,T,T]".into(),
        layers,
        op_times(&inner, &ad, [b, kvh, heads / kvh * t, t], reps, |x| {
            causal_softmax(x, 0.125, t, 0)
        }),
    ));
    let norm_w = |dev: &Device| RmsNorm {
        weight: Param::from_tensor(rand([h], dev)),
        eps: 1e-5,
    };
    let (n_in, n_ad) = (norm_w(&inner), norm_w(&ad));
    let norm = |x: Tensor<3>| {
        if x.is_autodiff() {
            n_ad.forward(x)
        } else {
            n_in.forward(x)
        }
    };
    rows.push((
        "rmsnorm".into(),
        2 * layers + 1,
        op_times(&inner, &ad, [b, t, h], reps, norm),
    ));
    let act = |x: Tensor<3>| match cfg.arch.mlp() {
        Mlp::PackedSwiGlu => swiglu_packed(x),
        Mlp::SwiGlu => swiglu(
            x.clone().slice([0..b, 0..t, 0..i]),
            x.slice([0..b, 0..t, i..2 * i]),
        ),
        Mlp::Gelu => gelu_approximate(x.slice([0..b, 0..t, 0..i])),
    };
    rows.push((
        "silu(gate)·up".into(),
        layers,
        op_times(&inner, &ad, [b, t, 2 * i], reps, act),
    ));
    let labels: Vec<i64> = (0..b * t).map(|j| ((j * 7919 + 13) % v) as i64).collect();
    rows.push((
        "cross-entropy (log_softmax + gather on [B,T,V])".into(),
        1,
        op_times(&inner, &ad, [b, t, v], reps, |x| {
            causal_lm_loss_sum(x, &labels).0
        }),
    ));
    let head = linear(h, v, true, 0, &ad);
    let head_in = linear(h, v, true, 0, &inner);
    let lm = |x: Tensor<3>| {
        if x.is_autodiff() {
            head.forward(x)
        } else {
            head_in.forward(x)
        }
    };
    rows.push((
        "lm_head matmul (trainable)".into(),
        1,
        op_times(&inner, &ad, [b, t, h], reps, lm),
    ));
    for mode in ["lora", "full"] {
        let mut model = CausalLm::load(&cfg, &RandomSource { seed: 0 }, &ad)?;
        if mode == "lora" {
            let lc = phi_adapters::LoraConfig {
                r: a.rank,
                alpha: 2.0 * a.rank as f64,
                ..Default::default()
            };
            phi_adapters::lora::attach(&mut model, &lc)?;
        }
        let sel = match mode {
            "lora" => phi_adapters::Selection::Lora {
                modules_to_save: vec![],
            },
            _ => phi_adapters::Selection::Full,
        };
        let names = phi_adapters::freeze::trainable_names(&model, &sel)?;
        let mut model = phi_adapters::freeze::apply(model, &names);
        let kind = Kind::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        };
        let mut opt = Optimizer::new(&model, kind, 0.01);
        let mut ts = Vec::new();
        for _ in 0..reps + 1 {
            let g = fake_grads(&model);
            let t0 = Instant::now();
            opt.clip(&g, 1.0);
            model = opt.step(model, g, 1e-4);
            ad.sync().ok();
            ts.push(t0.elapsed().as_secs_f64());
        }
        let s = median(&mut ts[1..].to_vec());
        rows.push((format!("optimizer: clip + AdamW ({mode})"), 1, (s, s)));
    }
    for (op, calls, (fwd, bwd)) in rows {
        let line = json!({
            "op": op, "shape": a.shape, "batch": b, "seq": t, "calls_per_step": calls,
            "fwd_ms": fwd * 1e3, "fwd_bwd_ms": bwd * 1e3,
            "per_step_fwd_s": fwd * calls as f64, "per_step_fwd_bwd_s": bwd * calls as f64,
        });
        println!("{line}");
    }
    Ok(())
}
