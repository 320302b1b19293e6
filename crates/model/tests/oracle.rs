//! The model against transformers' reference tensors, for every case folder found in the
//! oracle directory (tests/fixtures/oracle or PHI_ORACLE_DIR).

use burn::tensor::Tensor;
use phi_model::generate::{generate, GenerateConfig};
use phi_model::loss::causal_lm_loss;
use phi_model::resolve::resolve_dir;
use phi_model::weights::SafetensorsSource;
use phi_model::{CausalLm, Inputs, ModelConfig, TapRequest};
use phi_testkit::oracle::{cases, Case, Report};

const TOL: f32 = 1e-4;
const LOSS_TOL: f32 = 1e-5;

fn vals<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.try_into_vec_as::<f32>().expect("readback")
}

fn load_with(case: &Case, config_file: &str) -> Result<CausalLm, String> {
    let cfg = ModelConfig::from_file(&case.dir.join(config_file)).map_err(|e| e.to_string())?;
    let src = SafetensorsSource::open_dir(&case.dir).map_err(|e| e.to_string())?;
    CausalLm::load(&cfg, &src, &phi_testkit::device()).map_err(|e| e.to_string())
}

/// The case's model loaded as a folder (config.json) and, where present, from the
/// transformers-4 style config_legacy.json; both must give every number.
fn check_case(case: &Case, r: &mut Report) {
    let name = &case.name;
    match resolve_dir(&case.dir)
        .and_then(|res| CausalLm::load(&res.config, res.source.as_ref(), &phi_testkit::device()))
    {
        Ok(m) => check_model(case, &m, name, r),
        Err(e) => r.fail(format!("{name}: cannot load: {e}")),
    }
    if case.dir.join("config_legacy.json").exists() {
        let label = format!("{name} (config_legacy.json)");
        match load_with(case, "config_legacy.json") {
            Ok(m) => check_model(case, &m, &label, r),
            Err(e) => r.fail(format!("{label}: {e}")),
        }
    }
}

/// Every expected key of `case` against `model`; failures are reported under `name`.
fn check_model(case: &Case, model: &CausalLm, name: &str, r: &mut Report) {
    let (inp, labels) = case.batch();
    let out = model.forward(&inp, &TapRequest::all(model.num_layers()));
    let logits = out.logits.clone();
    r.close(
        name,
        "logits",
        &vals(logits.clone()),
        &case.f32("logits").1,
        TOL,
    );
    if case.has("loss") && !labels.is_empty() {
        let loss = vals(causal_lm_loss(logits, &labels));
        r.close(name, "loss", &loss, &case.f32("loss").1, LOSS_TOL);
    }
    for key in case.keys("hidden_states.") {
        let i: usize = key["hidden_states.".len()..].parse().expect("index");
        match out.taps.hidden_states.get(i) {
            Some(t) => r.close(name, &key, &vals(t.clone()), &case.f32(&key).1, TOL),
            None => r.fail(format!(
                "{name}: {key}: model returned {} hidden states",
                out.taps.hidden_states.len()
            )),
        }
    }
    if case.keys("hidden_states.").len() != out.taps.hidden_states.len() {
        r.fail(format!(
            "{name}: {} hidden states, expected {}",
            out.taps.hidden_states.len(),
            case.keys("hidden_states.").len()
        ));
    }
    // Raw layer outputs: layer i's is hidden state i+1, the last one is taken before the norm.
    let n = model.num_layers();
    let layer_keys = case.keys("layer_output.");
    if layer_keys.len() != n {
        r.fail(format!(
            "{name}: {} layer_output keys for {n} layers",
            layer_keys.len()
        ));
    }
    for key in layer_keys {
        let i: usize = key["layer_output.".len()..].parse().expect("index");
        let got = if i + 1 < n {
            out.taps.hidden_states.get(i + 1)
        } else {
            out.taps.last_layer.as_ref().filter(|_| i + 1 == n)
        };
        match got {
            Some(t) => r.close(name, &key, &vals(t.clone()), &case.f32(&key).1, TOL),
            None => r.fail(format!("{name}: {key}: the model has {n} layers")),
        }
    }
    match case.has("rope.attention_scaling") {
        true => r.close(
            name,
            "rope.attention_scaling",
            &[model.rope.attention_scaling],
            &case.f32("rope.attention_scaling").1,
            1e-6,
        ),
        false => r.fail(format!("{name}: no rope.attention_scaling")),
    }
    for (prefix, map) in [
        ("input_layernorm.", &out.taps.input_layernorm),
        (
            "post_attention_layernorm.",
            &out.taps.post_attention_layernorm,
        ),
    ] {
        for key in case.keys(prefix) {
            let i: usize = key[prefix.len()..].parse().expect("index");
            match map.get(&i) {
                Some(t) => r.close(name, &key, &vals(t.clone()), &case.f32(&key).1, TOL),
                None => r.fail(format!("{name}: {key}: no such tap")),
            }
        }
    }
    if case.has("rope.inv_freq") {
        let want = case.f32("rope.inv_freq").1;
        r.close_rel(
            name,
            "rope.inv_freq",
            &model.rope.inv_freq,
            &want,
            0.0,
            1e-6,
        );
    }
    if case.has("rope.long_inv_freq") {
        let got = model.rope.long_inv_freq.clone().unwrap_or_default();
        r.close_rel(
            name,
            "rope.long_inv_freq",
            &got,
            &case.f32("rope.long_inv_freq").1,
            0.0,
            1e-6,
        );
    }
    if case.has("long.logits") {
        let (shape, ids) = case.input("long.input_ids").expect("long.input_ids");
        let long = model.forward(&Inputs::new(shape[0], shape[1], ids), &TapRequest::none());
        r.close(
            name,
            "long.logits",
            &vals(long.logits),
            &case.f32("long.logits").1,
            TOL,
        );
    }
    for (key, prompt_key) in [
        ("generate.ids", "generate.prompt_ids"),
        ("generate_long.ids", "generate_long.prompt_ids"),
    ] {
        let (Some((_, want)), Some((_, prompt))) = (case.expected_ids(key), case.input(prompt_key))
        else {
            continue;
        };
        for use_cache in [true, false] {
            let cfg = GenerateConfig {
                max_new_tokens: want.len() - prompt.len(),
                sampling: None,
                eos_token_ids: vec![],
                use_cache,
                bos_scale: None,
            };
            let mut got = prompt.clone();
            got.extend(generate(model, &prompt, &cfg, |_| {}));
            r.equal(name, &format!("{key} (use_cache={use_cache})"), &got, &want);
        }
    }
}

#[test]
fn every_oracle_case_matches_transformers() {
    let mut r = Report::default();
    for dir in cases() {
        check_case(&Case::open(&dir), &mut r);
    }
    r.finish();
}
