//! `--bf16`'s frozen base held only in bf16 (`CausalLm::pack_bf16`): every packed linear's
//! f32 slot is empty, and everything that reads weights by name (parameter lists, exports)
//! sees each weight as its bf16 value until `unpack_bf16` brings f32 tensors back. Runs on the
//! scalar path, which every machine has, for every oracle case.

use burn::module::Module;
use phi_kernels::bf16::{from_bf16, to_bf16, Path};
use phi_model::resolve::resolve_dir;
use phi_model::weights::HostTensor;
use phi_model::{cpu_device, CausalLm};
use phi_testkit::oracle::{cases, Case, Report};
use std::collections::BTreeMap;

fn by_name(m: &CausalLm) -> BTreeMap<String, HostTensor> {
    m.hf_tensors().into_iter().collect()
}

fn check(case: &Case, r: &mut Report) {
    let name = &case.name;
    let res = match resolve_dir(&case.dir) {
        Ok(res) => res,
        Err(e) => return r.fail(format!("{name}: cannot resolve: {e}")),
    };
    let mut model = match CausalLm::load(&res.config, res.source.as_ref(), &cpu_device()) {
        Ok(m) => m.no_grad(),
        Err(e) => return r.fail(format!("{name}: cannot load: {e}")),
    };
    let before = by_name(&model);
    let shapes: Vec<_> = model.params().into_iter().map(|p| p.shape).collect();
    let linears: Vec<String> = model
        .linears()
        .into_iter()
        .map(|(p, _)| format!("{p}.weight"))
        .collect();
    let f32_floats = model.num_params();

    let packed = model.pack_bf16(Path::Scalar);
    r.equal(name, "packed linears", &[packed >= linears.len()], &[true]);
    let dropped = model
        .linears()
        .iter()
        .filter(|(_, l)| l.f32_dropped())
        .count();
    r.equal(name, "f32 slots dropped", &[dropped], &[linears.len()]);
    let linear_floats: usize = model
        .linears()
        .iter()
        .map(|(_, l)| l.d_in() * l.d_out())
        .sum();
    r.equal(
        name,
        "f32 floats held",
        &[model.num_params()],
        &[f32_floats - linear_floats],
    );
    let after: Vec<_> = model.params().into_iter().map(|p| p.shape).collect();
    r.equal(name, "parameter shapes", &after, &shapes);

    // Linear weights read as their bf16 rounding, everything else unchanged.
    let round =
        |t: &HostTensor| -> Vec<f32> { t.data.iter().map(|&x| from_bf16(to_bf16(x))).collect() };
    let want: BTreeMap<String, Vec<f32>> = before
        .iter()
        .map(|(k, t)| {
            let v = if linears.contains(k) {
                round(t)
            } else {
                t.data.clone()
            };
            (k.clone(), v)
        })
        .collect();
    for (label, m) in [
        ("packed", &model),
        ("unpacked", &{
            let mut m = model.clone();
            m.unpack_bf16();
            m
        }),
    ] {
        let got = by_name(m);
        r.equal(
            name,
            &format!("{label}: names"),
            &got.keys().collect::<Vec<_>>(),
            &want.keys().collect::<Vec<_>>(),
        );
        for (k, t) in &got {
            let (Some(w), Some(b)) = (want.get(k), before.get(k)) else {
                continue;
            };
            r.equal(name, &format!("{label}: {k} shape"), &t.shape, &b.shape);
            r.exact(name, &format!("{label}: {k}"), &t.data, w);
        }
    }
    model.unpack_bf16();
    let back = model
        .linears()
        .iter()
        .filter(|(_, l)| l.f32_dropped() || l.packed.is_some())
        .count();
    r.equal(name, "unpacked: packings left", &[back], &[0]);
    r.equal(
        name,
        "unpacked: f32 floats held",
        &[model.num_params()],
        &[f32_floats],
    );
}

#[test]
fn a_packed_base_is_held_in_bf16_and_read_as_its_bf16_values() {
    let mut r = Report::default();
    for dir in cases() {
        check(&Case::open(&dir), &mut r);
    }
    r.finish();
}

/// A base packed weight by weight as it loads (`bf16::packing`, a seed-size model never whole in
/// f32) is the base packed after an f32 load: the same logits, bit for bit.
#[test]
fn packing_at_load_equals_packing_after_it() {
    let mut r = Report::default();
    for dir in cases() {
        let case = Case::open(&dir);
        let res = resolve_dir(&case.dir).unwrap();
        let dev = cpu_device();
        let src = res.source.as_ref();
        let mut after = CausalLm::load(&res.config, src, &dev).unwrap();
        after.pack_bf16(Path::Scalar);
        let packing = phi_model::bf16::packing(src, Path::Scalar);
        let mut at_load = CausalLm::load(&res.config, &packing, &dev).unwrap();
        let held = at_load
            .linears()
            .iter()
            .filter(|(_, l)| l.f32_dropped())
            .count();
        r.equal(
            &case.name,
            "packed at load",
            &[held],
            &[after.linears().len()],
        );
        at_load.pack_bf16(Path::Scalar);
        let (inp, _) = case.batch();
        let logits = |m: &CausalLm| {
            let t = m.forward(&inp, &phi_model::TapRequest::none()).logits;
            t.try_into_vec_as::<f32>().unwrap()
        };
        r.exact(&case.name, "logits", &logits(&at_load), &logits(&after));
    }
    r.finish();
}
