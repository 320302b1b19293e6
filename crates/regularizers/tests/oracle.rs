//! Regularizer values and gradients against the transformers oracle, for every case folder
//! found (tests/fixtures/oracle or PHI_ORACLE_DIR). The oracle's recipe: layers 2 and 4,
//! target norm 1.0, weight 0.01 (ORACLE-README.md).

use burn::tensor::{Device, Tensor};
use phi_adapters::freeze::{self, Selection};
use phi_model::loss::causal_lm_loss;
use phi_model::resolve::resolve_dir;
use phi_model::{Arch, CausalLm, ModelConfig, TapRequest};
use phi_regularizers::{BosScale, NormTarget};
use phi_testkit::oracle::{cases, Case, Report};

fn vals<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().expect("readback")
}

fn load(case: &Case, device: &Device) -> (CausalLm, ModelConfig) {
    let res = resolve_dir(&case.dir).unwrap_or_else(|e| panic!("{}: {e}", case.name));
    let m = CausalLm::load(&res.config, res.source.as_ref(), device)
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    (m, res.config)
}

fn recipe(include_padding: bool) -> NormTarget {
    NormTarget {
        layers: vec![2, 4],
        weight: 0.01,
        target: 1.0,
        include_padding,
    }
}

fn check_reg(case: &Case, r: &mut Report) {
    if !case.has("reg.total") {
        return;
    }
    for (include_padding, value, total, grads) in [
        (true, "reg.all_tokens", "reg.total", "reg.grad."),
        (false, "reg.masked", "reg.total_masked", "reg_masked.grad."),
    ] {
        let device = phi_testkit::device().autodiff();
        let (model, cfg) = load(case, &device);
        let reg = recipe(include_padding);
        reg.check(&cfg).unwrap();
        let names = freeze::trainable_names(&model, &Selection::NormOnly).unwrap();
        let model = freeze::apply(model, &names);
        let (inp, labels) = case.batch();
        let out = model.forward(&inp, &reg.taps());
        let mask = inp.attention_mask.as_deref();
        let per: Vec<f32> = reg
            .per_layer(&out.taps, mask)
            .into_iter()
            .flat_map(vals)
            .collect();
        let per_key = if include_padding {
            "reg.per_layer.all_tokens"
        } else {
            "reg.per_layer.masked"
        };
        r.close_rel(&case.name, per_key, &per, &case.f32(per_key).1, 1e-5, 1e-5);
        let term = reg.loss(&out.taps, mask);
        r.close(
            &case.name,
            value,
            &vals(term.clone()),
            &case.f32(value).1,
            1e-5,
        );
        let loss = causal_lm_loss(out.logits, &labels) + term;
        r.close(
            &case.name,
            total,
            &vals(loss.clone()),
            &case.f32(total).1,
            1e-5,
        );
        let g = loss.backward();
        let want = case.keys(grads);
        r.equal(
            &case.name,
            "number of norm gradients",
            &[want.len()],
            &[names.len()],
        );
        for (name, w) in model.norm_params() {
            let key = format!("{grads}{name}");
            match w.grad(&g) {
                Some(got) if case.has(&key) => {
                    r.close_rel(&case.name, &key, &vals(got), &case.f32(&key).1, 1e-5, 1e-4)
                }
                Some(_) => r.fail(format!("{}: {key} not in expected.safetensors", case.name)),
                None => r.fail(format!("{}: {key}: no gradient", case.name)),
            }
        }
    }
}

fn check_bos(case: &Case, r: &mut Report) {
    for (factor, prefix) in [(0.1, "bos"), (0.0, "bos0")] {
        let key = format!("{prefix}.logits");
        if !case.has(&key) {
            continue;
        }
        let device = phi_testkit::device().autodiff();
        let (model, _) = load(case, &device);
        let names = freeze::trainable_names(&model, &Selection::Full).unwrap();
        let model = freeze::apply(model, &names);
        let (inp, labels) = case.batch();
        let bos = BosScale::new(factor).unwrap();
        let embeds = bos.apply(model.embed(&inp), None);
        let logits = model
            .forward_embeds(embeds, &inp, &TapRequest::none(), None)
            .logits;
        r.close(
            &case.name,
            &key,
            &vals(logits.clone()),
            &case.f32(&key).1,
            1e-4,
        );
        let loss = causal_lm_loss(logits, &labels);
        let lkey = format!("{prefix}.loss");
        if case.has(&lkey) {
            r.close(
                &case.name,
                &lkey,
                &vals(loss.clone()),
                &case.f32(&lkey).1,
                1e-5,
            );
        }
        // Zeroing must keep training finite: every gradient of the full model is finite.
        let g = loss.backward();
        let emb = model
            .model
            .embed_tokens
            .weight
            .val()
            .grad(&g)
            .expect("embedding gradient");
        let finite = vals(emb).iter().all(|v| v.is_finite());
        r.equal(
            &case.name,
            &format!("{prefix}: embedding gradient finite"),
            &[finite],
            &[true],
        );
    }
}

#[test]
fn regularizers_match_oracle() {
    let mut r = Report::default();
    for dir in cases() {
        let case = Case::open(&dir);
        check_reg(&case, &mut r);
        check_bos(&case, &mut r);
    }
    r.finish();
}

#[test]
fn norm_target_rejects_phi2_and_out_of_range_layers() {
    for dir in cases() {
        let cfg = resolve_dir(&dir).unwrap().config;
        let reg = recipe(false);
        let n = cfg.num_hidden_layers;
        let err = NormTarget {
            layers: vec![n],
            ..reg.clone()
        }
        .check(&cfg)
        .unwrap_err();
        let want = if cfg.arch == Arch::Phi2 {
            "post-attention RMSNorm"
        } else {
            "rmsnorm_reg_layers"
        };
        assert!(err.to_string().contains(want), "{err}");
        let ok = NormTarget {
            layers: vec![0],
            ..reg
        }
        .check(&cfg);
        assert_eq!(ok.is_ok(), cfg.arch != Arch::Phi2, "{ok:?}");
    }
    let bad = NormTarget::parse_layers("2,x").unwrap_err();
    assert!(
        bad.to_string().starts_with("rmsnorm_reg_layers = 2,x"),
        "{bad}"
    );
    assert_eq!(NormTarget::parse_layers(" 2, 4 ").unwrap(), vec![2, 4]);
}
