//! AdamW with PyTorch's semantics (decoupled decay, bias correction as `torch.optim.AdamW`),
//! plain SGD, and global-norm clipping, on whatever device the model lives on.
//!
//! Burn's own AdamW defaults and update order differ from PyTorch's, and its state is keyed by
//! run-local parameter ids; this one keys state by HF parameter name, so checkpoints resume
//! bit-identically and read like PyTorch's `optimizer.pt`.

use crate::args::Optim;
use crate::error::TrainError;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Gradients, Tensor, TensorData};
use phi_kernels::adam8::{self, Adam8, Moments};
use phi_kernels::{self as fused, kernels::AdamW};
use phi_model::CausalLm;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Flattened gradients of the trainable parameters, on the inner (non-autodiff) device.
pub type Grads = HashMap<ParamId, Tensor<1>>;

/// Reads every gradient `grads` holds for a parameter of `model`.
pub fn collect(model: &CausalLm, grads: &Gradients) -> Grads {
    struct V<'a> {
        grads: &'a Gradients,
        out: Grads,
    }
    impl ModuleVisitor for V<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = param.val().grad(self.grads) {
                let n = g.shape().num_elements();
                self.out.insert(param.id, g.reshape([n]));
            }
        }
    }
    let mut v = V {
        grads,
        out: HashMap::new(),
    };
    model.visit(&mut v);
    v.out
}

/// Adds `more` into `acc` (gradient accumulation).
pub fn accumulate(acc: &mut Grads, more: Grads) {
    for (id, g) in more {
        match acc.remove(&id) {
            Some(a) => acc.insert(id, a + g),
            None => acc.insert(id, g),
        };
    }
}

/// Divides every gradient by `scale` (fp16 loss scaling's unscale).
pub fn unscale(grads: &mut Grads, scale: f64) {
    for g in grads.values_mut() {
        *g = g.clone() / scale;
    }
}

/// torch's `GradScaler` defaults: start at 2¹⁶, halve on an overflow (the step is skipped),
/// double after 2000 steps in a row without one.
#[derive(Debug, Clone)]
pub struct LossScaler {
    pub scale: f64,
    good: u32,
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler {
            scale: 65536.0,
            good: 0,
        }
    }
}

impl LossScaler {
    /// Records whether this step's gradients were finite; returns whether to apply it.
    pub fn update(&mut self, finite: bool) -> bool {
        if !finite {
            self.scale *= 0.5;
            self.good = 0;
            return false;
        }
        self.good += 1;
        if self.good == 2000 {
            self.scale *= 2.0;
            self.good = 0;
        }
        true
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    AdamW {
        beta1: f64,
        beta2: f64,
        eps: f64,
    },
    /// bitsandbytes' AdamW8bit: the moments as 8-bit codes (`phi_kernels::adam8`).
    AdamW8 {
        beta1: f64,
        beta2: f64,
        eps: f64,
    },
    Sgd,
}

impl Kind {
    /// The `optim` setting with AdamW's hyperparameters (unused by SGD).
    pub fn new(optim: Optim, beta1: f64, beta2: f64, eps: f64) -> Kind {
        match optim {
            Optim::AdamwTorch => Kind::AdamW { beta1, beta2, eps },
            Optim::Adamw8bit => Kind::AdamW8 { beta1, beta2, eps },
            Optim::Sgd => Kind::Sgd,
        }
    }
}

/// HF's `get_decay_parameter_names`: biases and norm weights are not decayed.
pub fn decays(name: &str) -> bool {
    let module = name.rsplit_once('.').map_or("", |(m, _)| m);
    let leaf = module.rsplit('.').next().unwrap_or("");
    !(name.ends_with(".bias") || leaf.ends_with("norm"))
}

pub struct Optimizer {
    pub kind: Kind,
    pub weight_decay: f64,
    /// Optimizer steps taken.
    pub step: u64,
    names: HashMap<ParamId, String>,
    /// Trainable ids in module order: sums over parameters run in this order, so a run
    /// repeats bit for bit (HashMap order changes from process to process).
    order: Vec<ParamId>,
    /// exp_avg and exp_avg_sq by HF name, flattened in Burn's layout.
    state: BTreeMap<String, (Tensor<1>, Tensor<1>)>,
    /// The 8-bit AdamW's moments by HF name.
    state8: BTreeMap<String, Moments>,
    /// The first parameter the last step left with a NaN or infinity, if any: the trainer
    /// stops before saving such weights.
    pub non_finite: Option<String>,
    /// Set by `clip` for the next `step`.
    clip_coef: Option<f64>,
}

impl Optimizer {
    /// Tracks the parameters of `model` whose gradients are on.
    pub fn new(model: &CausalLm, kind: Kind, weight_decay: f64) -> Self {
        let trainable: Vec<_> = model
            .params()
            .into_iter()
            .filter(|p| p.require_grad)
            .collect();
        Optimizer {
            kind,
            weight_decay,
            step: 0,
            order: trainable.iter().map(|p| p.id).collect(),
            names: trainable.into_iter().map(|p| (p.id, p.name)).collect(),
            state: BTreeMap::new(),
            state8: BTreeMap::new(),
            non_finite: None,
            clip_coef: None,
        }
    }

    /// `torch.nn.utils.clip_grad_norm_`: returns the total norm before clipping; the next
    /// `step` scales the gradients by max_norm / (norm + 1e-6) when that is below 1 (inside
    /// the AdamW kernel: no pass of its own over them). `max_norm <= 0` only measures.
    pub fn clip(&mut self, grads: &Grads, max_norm: f64) -> f64 {
        let sq = self
            .order
            .iter()
            .filter_map(|id| grads.get(id))
            .map(fused::sum_squares);
        let total = sq.sum::<f64>().sqrt();
        self.clip_coef = None;
        if max_norm > 0.0 {
            let coef = max_norm / (total + 1e-6);
            if coef < 1.0 {
                self.clip_coef = Some(coef);
            }
        }
        total
    }

    /// One update of every parameter with a gradient, at learning rate `lr`.
    pub fn step(&mut self, model: CausalLm, grads: Grads, lr: f64) -> CausalLm {
        self.step += 1;
        self.non_finite = None;
        let mut m = Mapper {
            opt: self,
            grads,
            lr,
        };
        let model = model.map(&mut m);
        self.clip_coef = None;
        model
    }

    /// The updated parameter and, where the fused kernel ran, whether it is all finite.
    fn update(
        &mut self,
        name: &str,
        p: Tensor<1>,
        g: Tensor<1>,
        lr: f64,
    ) -> (Tensor<1>, Option<bool>) {
        let wd = if decays(name) { self.weight_decay } else { 0.0 };
        let clipped = |g: Tensor<1>| match self.clip_coef {
            Some(c) => g * c,
            None => g,
        };
        let p = match self.kind {
            Kind::AdamW8 { beta1, beta2, eps } => {
                let device = p.device();
                let mut pv = p.try_into_vec_as::<f32>().unwrap_or_default();
                let gv = clipped(g).try_into_vec_as::<f32>().unwrap_or_default();
                let moments = self.state8.entry(name.to_string());
                let moments = moments.or_insert_with(|| Moments::zeros(pv.len()));
                let h = Adam8 {
                    lr,
                    weight_decay: wd,
                    beta1,
                    beta2,
                    eps,
                    t: self.step as i32,
                };
                let finite = adam8::step(&mut pv, &gv, moments, h);
                let n = pv.len();
                let p = Tensor::<1>::from_data(TensorData::new(pv, [n]), &device);
                return (p, Some(finite));
            }
            Kind::Sgd => {
                let g = clipped(g);
                let g = if wd > 0.0 { g + p.clone() * wd } else { g };
                p - g * lr
            }
            Kind::AdamW { beta1, beta2, eps } => {
                let (m, v) = match self.state.remove(name) {
                    Some(s) => s,
                    None => (g.zeros_like(), g.zeros_like()),
                };
                let t = self.step as i32;
                let mut h = AdamW::new(lr, wd, beta1, beta2, eps, t);
                if fused::adamw_fusable([&p, &g, &m, &v]) {
                    h.g_scale = self.clip_coef.map_or(1.0, |c| c as f32);
                    let (p, m, v, finite) = fused::adamw(p, g, m, v, h);
                    self.state.insert(name.to_string(), (m, v));
                    return (p, Some(finite));
                }
                let g = clipped(g);
                let p = if wd > 0.0 { p * (1.0 - lr * wd) } else { p };
                // torch: exp_avg.lerp_(grad, 1-β1); exp_avg_sq.mul_(β2).addcmul_(g, g, 1-β2)
                let m = m.clone() + (g.clone() - m) * (1.0 - beta1);
                let v = v * beta2 + g.clone() * g * (1.0 - beta2);
                let bc1 = 1.0 - beta1.powi(t);
                let bc2_sqrt = (1.0 - beta2.powi(t)).sqrt();
                let denom = v.clone().sqrt() / bc2_sqrt + eps;
                let p = p - m.clone() / denom * (lr / bc1);
                self.state.insert(name.to_string(), (m, v));
                p
            }
        };
        (p, None)
    }

    /// `optimizer.safetensors`: `<name>.exp_avg` / `<name>.exp_avg_sq`, plus the step in
    /// the metadata.
    pub fn save(&self, path: &Path) -> Result<(), TrainError> {
        let mut tensors = BTreeMap::new();
        for (name, (m, v)) in &self.state {
            for (suffix, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                let data = t.clone().try_into_vec_as::<f32>().unwrap_or_default();
                tensors.insert(format!("{name}.{suffix}"), (vec![data.len()], data));
            }
        }
        // 8-bit moments as their codes (exact in f32) and absmaxes, so a resume is exact.
        for (name, mo) in &self.state8 {
            let codes = |c: &[u8]| c.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            let parts: Vec<(&str, Vec<f32>)> = match mo {
                Moments::Q8 {
                    m,
                    v,
                    absmax_m,
                    absmax_v,
                } => vec![
                    ("state1", codes(m)),
                    ("state2", codes(v)),
                    ("absmax1", absmax_m.clone()),
                    ("absmax2", absmax_v.clone()),
                ],
                Moments::F32 { m, v } => vec![("exp_avg", m.clone()), ("exp_avg_sq", v.clone())],
            };
            for (suffix, data) in parts {
                tensors.insert(format!("{name}.{suffix}"), (vec![data.len()], data));
            }
        }
        let meta = HashMap::from([("step".to_string(), self.step.to_string())]);
        phi_model::io::write_safetensors(path, &tensors, Some(meta))?;
        Ok(())
    }

    pub fn load(&mut self, path: &Path, device: &burn::tensor::Device) -> Result<(), TrainError> {
        use phi_model::weights::{SafetensorsSource, TensorSource};
        let src = SafetensorsSource::open_files(&[path.to_path_buf()])?;
        let bytes = std::fs::read(path).map_err(|e| TrainError::file(path, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| TrainError::file(path, format!("{e:?}")))?;
        self.step = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get("step"))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| TrainError::file(path, "metadata: missing step"))?;
        let known: Vec<String> = self.names.values().cloned().collect();
        self.state.clear();
        self.state8.clear();
        if matches!(self.kind, Kind::AdamW8 { .. }) {
            for name in known {
                let mo = load_moments8(&src, &name).ok_or_else(|| {
                    TrainError::file(path, format!("{name}: no 8-bit AdamW state"))
                })?;
                self.state8.insert(name, mo);
            }
            return Ok(());
        }
        for name in known {
            let (Ok(m), Ok(v)) = (
                src.load(&format!("{name}.exp_avg")),
                src.load(&format!("{name}.exp_avg_sq")),
            ) else {
                if self.kind == Kind::Sgd {
                    continue;
                }
                return Err(TrainError::file(
                    path,
                    format!("{name}: no optimizer state"),
                ));
            };
            let t = |d: Vec<f32>| {
                let n = d.len();
                Tensor::<1>::from_data(TensorData::new(d, [n]), device)
            };
            self.state.insert(name, (t(m.data), t(v.data)));
        }
        Ok(())
    }
}

/// A parameter's 8-bit AdamW moments as `save` wrote them.
fn load_moments8(src: &phi_model::weights::SafetensorsSource, name: &str) -> Option<Moments> {
    use phi_model::weights::TensorSource;
    let get = |s: &str| src.load(&format!("{name}.{s}")).ok().map(|t| t.data);
    if let (Some(m), Some(v)) = (get("exp_avg"), get("exp_avg_sq")) {
        return Some(Moments::F32 { m, v });
    }
    let codes = |c: Vec<f32>| c.into_iter().map(|x| x as u8).collect();
    Some(Moments::Q8 {
        m: codes(get("state1")?),
        v: codes(get("state2")?),
        absmax_m: get("absmax1")?,
        absmax_v: get("absmax2")?,
    })
}

struct Mapper<'a> {
    opt: &'a mut Optimizer,
    grads: Grads,
    lr: f64,
}

impl ModuleMapper for Mapper<'_> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(g) = self.grads.remove(&param.id) else {
            return param;
        };
        let Some(name) = self.opt.names.get(&param.id).cloned() else {
            return param;
        };
        let (id, t, mapper) = param.consume();
        let dims = t.dims();
        let (autodiff, require_grad) = (t.is_autodiff(), t.is_require_grad());
        let strategy = t.gradient_checkpointing_strategy();
        let n = t.shape().num_elements();
        let (updated, finite) = self.opt.update(&name, t.inner().reshape([n]), g, self.lr);
        let finite = || finite.unwrap_or_else(|| fused::all_finite(&updated));
        if self.opt.non_finite.is_none() && !finite() {
            self.opt.non_finite = Some(name);
        }
        let mut t: Tensor<D> = updated.reshape(dims);
        if autodiff {
            t = t.autodiff();
            if let Some(s) = strategy {
                t = t.with_gradient_checkpointing_strategy(s);
            }
            if require_grad {
                t = t.require_grad();
            }
        }
        Param::from_mapped_value(id, t, mapper)
    }
}

#[cfg(test)]
mod tests {
    use super::LossScaler;

    #[test]
    fn loss_scaler_backs_off_on_overflow_and_grows_after_2000_good_steps() {
        let mut s = LossScaler::default();
        assert_eq!(s.scale, 65536.0);
        assert!(!s.update(false));
        assert_eq!(s.scale, 32768.0);
        for _ in 0..1999 {
            assert!(s.update(true));
        }
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true));
        assert_eq!(s.scale, 65536.0);
        // An overflow restarts the count.
        for _ in 0..1000 {
            s.update(true);
        }
        s.update(false);
        for _ in 0..1999 {
            s.update(true);
        }
        assert_eq!(s.scale, 32768.0);
    }
}
