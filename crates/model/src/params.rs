//! Every parameter under its Hugging Face name, in HF layout: what freeze masks select, what
//! adapters attach to, and what export writes. The names come from the module tree itself
//! (field names mirror HF's), so no rename table has to be kept in step with the layers.

use crate::error::ModelError;
use crate::model::CausalLm;
use crate::nn::Linear;
use crate::weights::HostTensor;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::{Device, Tensor, TensorData};
use phi_kernels::packed::PackedWeight;
use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// A base weight; `transposed` when Burn stores it as [in, out] (linear weights).
    Base { transposed: bool },
    /// PEFT's `lora_A.weight` [r, in] (stored [in, r]).
    LoraA,
    /// PEFT's `lora_B.weight` [out, r] (stored [r, out]).
    LoraB,
}

#[derive(Debug, Clone)]
pub struct ParamInfo {
    /// HF name (`model.layers.0.self_attn.q_proj.weight`); a LoRA factor is
    /// `<module>.lora_A.weight` / `<module>.lora_B.weight`, PEFT's key without its prefix.
    pub name: String,
    pub id: ParamId,
    /// In HF layout.
    pub shape: Vec<usize>,
    pub kind: ParamKind,
    pub require_grad: bool,
}

impl ParamInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The HF path of the module being walked; enum variants add no path segment.
struct Tracker {
    path: Vec<String>,
    containers: Vec<String>,
    /// The final norm's HF name (the one field whose name differs by architecture).
    final_norm: &'static str,
}

impl Tracker {
    fn new(model: &CausalLm) -> Self {
        Tracker {
            path: Vec::new(),
            containers: Vec::new(),
            final_norm: model.arch.final_norm(),
        }
    }

    fn enter(&mut self, name: &str, container_type: &str) {
        if !container_type.starts_with("Enum:") {
            let name = match (self.path.as_slice(), name) {
                ([m], "norm") if m == "model" => self.final_norm,
                _ => name,
            };
            self.path.push(name.to_string());
        }
        self.containers.push(container_type.to_string());
    }

    fn exit(&mut self, container_type: &str) {
        if !container_type.starts_with("Enum:") {
            self.path.pop();
        }
        self.containers.pop();
    }

    /// The current parameter's HF name and kind.
    fn current(&self) -> (String, ParamKind) {
        let parent = self.containers.last().map(String::as_str).unwrap_or("");
        let leaf = self.path.last().map(String::as_str).unwrap_or("");
        match (parent, leaf) {
            ("Struct:LowRank", "a") | ("Struct:LowRank", "b") => {
                // path: <module>.lora.{a,b}
                let module = self.path[..self.path.len().saturating_sub(2)].join(".");
                if leaf == "a" {
                    (format!("{module}.lora_A.weight"), ParamKind::LoraA)
                } else {
                    (format!("{module}.lora_B.weight"), ParamKind::LoraB)
                }
            }
            ("Struct:Linear", "weight") => {
                (self.path.join("."), ParamKind::Base { transposed: true })
            }
            _ => (self.path.join("."), ParamKind::Base { transposed: false }),
        }
    }
}

struct Namer<F> {
    at: Tracker,
    /// Linear weights held only in bf16 (`pack_bf16`), by HF name: walked as their unpacked
    /// values, so names, shapes and exports see the weight and not its empty f32 slot.
    dropped: BTreeMap<String, Arc<PackedWeight>>,
    f: F,
}

/// One parameter as the walk sees it: rank-1 tensors come as one row.
struct Seen {
    name: String,
    kind: ParamKind,
    id: ParamId,
    t: Value,
    vector: bool,
    require_grad: bool,
}

/// A parameter's value, or the bf16 weight that stands for it (unpacked only when read).
enum Value {
    F32(Tensor<2>),
    Bf16(Arc<PackedWeight>, Device),
}

impl Value {
    fn dims(&self) -> [usize; 2] {
        match self {
            Value::F32(t) => t.dims(),
            Value::Bf16(w, _) => [w.d_in(), w.d_out()],
        }
    }

    fn tensor(self) -> Tensor<2> {
        match self {
            Value::F32(t) => t,
            Value::Bf16(w, dev) => {
                Tensor::from_data(TensorData::new(w.unpack(), [w.d_in(), w.d_out()]), &dev)
            }
        }
    }
}

impl Seen {
    fn hf_shape(&self) -> Vec<usize> {
        let [r, c] = self.t.dims();
        match self.kind {
            _ if self.vector => vec![c],
            ParamKind::Base { transposed: false } => vec![r, c],
            _ => vec![c, r],
        }
    }
}

impl<F: FnMut(Seen)> ModuleVisitor for Namer<F> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.at.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, container_type: &str) {
        self.at.exit(container_type);
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let (name, kind) = self.at.current();
        if let Some(w) = self.dropped.get(&name) {
            let t = Value::Bf16(w.clone(), param.val().device());
            (self.f)(Seen {
                name,
                kind,
                id: param.id,
                t,
                vector: false,
                require_grad: false,
            });
            return;
        }
        let v = param.val();
        let dims = v.dims();
        let flat: Tensor<2> = if D == 1 {
            v.reshape([1, dims[0]])
        } else {
            v.reshape([dims[0], dims[1..].iter().product::<usize>()])
        };
        (self.f)(Seen {
            name,
            kind,
            id: param.id,
            t: Value::F32(flat),
            vector: D == 1,
            require_grad: param.is_require_grad(),
        });
    }
}

/// Replaces parameter values by HF name (HF layout in, Burn layout stored), keeping ids and
/// gradient settings.
struct Setter {
    at: Tracker,
    values: BTreeMap<String, HostTensor>,
    errors: Vec<String>,
}

impl ModuleMapper for Setter {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.at.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, container_type: &str) {
        self.at.exit(container_type);
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (name, kind) = self.at.current();
        let Some(host) = self.values.remove(&name) else {
            return param;
        };
        let dims = param.val().dims();
        let transposed = D == 2 && kind != (ParamKind::Base { transposed: false });
        let want: Vec<usize> = if transposed {
            vec![dims[1], dims[0]]
        } else {
            dims.to_vec()
        };
        if host.shape != want {
            self.errors.push(format!(
                "tensor {name}: expected shape {want:?}, found {:?}",
                host.shape
            ));
            return param;
        }
        let host = if transposed {
            crate::nn::transpose_host(&host)
        } else {
            host
        };
        param.map(|old| {
            let device = old.device();
            let shape: [usize; D] = dims;
            Tensor::from_data(TensorData::new(host.data, shape), &device)
        })
    }
}

fn walk(model: &CausalLm, f: impl FnMut(Seen)) {
    let dropped = model
        .linears()
        .into_iter()
        .filter(|(_, l)| l.f32_dropped())
        .filter_map(|(p, l)| Some((format!("{p}.weight"), l.packed.clone()?)))
        .collect();
    let mut namer = Namer {
        at: Tracker::new(model),
        dropped,
        f,
    };
    model.visit(&mut namer);
}

impl CausalLm {
    /// Every float parameter, in module order.
    pub fn params(&self) -> Vec<ParamInfo> {
        let mut out = Vec::new();
        walk(self, |s| {
            out.push(ParamInfo {
                shape: s.hf_shape(),
                name: s.name,
                id: s.id,
                kind: s.kind,
                require_grad: s.require_grad,
            })
        });
        out
    }

    /// Base weights as HF stores them (name → [out, in] etc.), LoRA factors excluded.
    pub fn hf_tensors(&self) -> Vec<(String, HostTensor)> {
        self.tensors_where(|k, _| matches!(k, ParamKind::Base { .. }))
    }

    /// The base weights `keep` takes by HF name, the others left unread.
    pub fn hf_tensors_named(&self, keep: impl Fn(&str) -> bool) -> Vec<(String, HostTensor)> {
        self.tensors_where(|k, name| matches!(k, ParamKind::Base { .. }) && keep(name))
    }

    /// LoRA factors in PEFT layout, names as in `ParamInfo::name`.
    pub fn lora_tensors(&self) -> Vec<(String, HostTensor)> {
        self.tensors_where(|k, _| !matches!(k, ParamKind::Base { .. }))
    }

    fn tensors_where(&self, keep: impl Fn(ParamKind, &str) -> bool) -> Vec<(String, HostTensor)> {
        let mut out = Vec::new();
        walk(self, |s| {
            if !keep(s.kind, &s.name) {
                return;
            }
            let shape = s.hf_shape();
            let t = if s.kind == (ParamKind::Base { transposed: false }) || s.vector {
                s.t.tensor()
            } else {
                s.t.tensor().transpose()
            };
            let data = t.try_into_vec_as::<f32>().unwrap_or_default();
            out.push((s.name, HostTensor { shape, data }));
        });
        out
    }

    /// Sets parameters from HF-layout tensors keyed by HF name; `what` names the source in
    /// errors. Every key must name a parameter of this model, with its HF shape.
    pub fn set_hf_tensors(
        self,
        what: &str,
        values: BTreeMap<String, HostTensor>,
    ) -> Result<Self, ModelError> {
        let mut setter = Setter {
            at: Tracker::new(&self),
            values,
            errors: Vec::new(),
        };
        let model = self.map(&mut setter);
        if let Some(e) = setter.errors.first() {
            return Err(ModelError::Other(format!("{what}: {e}")));
        }
        if let Some(k) = setter.values.keys().next() {
            return Err(ModelError::tensor(
                what,
                k.clone(),
                "names no parameter of this model",
            ));
        }
        Ok(model)
    }

    /// Every linear layer under its HF module path (`model.layers.0.mlp.down_proj`),
    /// `lm_head` last when the head is not tied.
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, layer) in self.model.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let named = layer.block().linears();
            out.extend(named.into_iter().map(|(n, l)| (format!("{p}.{n}"), l)));
        }
        if let Some(h) = &self.lm_head {
            out.push(("lm_head".to_string(), h));
        }
        out
    }

    /// The linear layer at an HF module path.
    pub fn linear_mut(&mut self, path: &str) -> Option<&mut Linear> {
        if path == "lm_head" {
            return self.lm_head.as_mut();
        }
        let rest = path.strip_prefix("model.layers.")?;
        let (idx, name) = rest.split_once('.')?;
        let layer = self.model.layers.get_mut(idx.parse::<usize>().ok()?)?;
        let found = layer
            .block_mut()
            .linears_mut()
            .into_iter()
            .find(|(n, _)| *n == name);
        found.map(|(_, l)| l)
    }
}
