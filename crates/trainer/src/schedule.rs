//! HF's learning-rate schedules (`transformers.get_scheduler`): the factor on the base rate
//! for optimizer step k (0-based), with linear warmup.

use crate::error::TrainError;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: Kind,
    pub warmup: usize,
    pub total: usize,
}

impl Schedule {
    pub fn new(name: &str, warmup: usize, total: usize) -> Result<Self, TrainError> {
        let kind = match name {
            "constant" => Kind::Constant,
            "constant_with_warmup" => Kind::ConstantWithWarmup,
            "linear" => Kind::Linear,
            "cosine" => Kind::Cosine,
            _ => {
                return Err(TrainError::arg(
                    "lr_scheduler_type",
                    name,
                    "constant, constant_with_warmup, linear or cosine",
                ))
            }
        };
        Ok(Schedule {
            kind,
            warmup,
            total,
        })
    }

    /// warmup_steps when set, else ceil(warmup_ratio · total), as HF's `get_warmup_steps`.
    pub fn warmup_steps(warmup_steps: usize, warmup_ratio: f64, total: usize) -> usize {
        if warmup_steps > 0 {
            warmup_steps
        } else {
            (warmup_ratio * total as f64).ceil() as usize
        }
    }

    pub fn factor(&self, step: usize) -> f64 {
        let (s, w, n) = (step as f64, self.warmup as f64, self.total as f64);
        if self.kind != Kind::Constant && step < self.warmup {
            return s / w.max(1.0);
        }
        match self.kind {
            Kind::Constant | Kind::ConstantWithWarmup => 1.0,
            Kind::Linear => ((n - s) / (n - w).max(1.0)).max(0.0),
            Kind::Cosine => {
                let progress = (s - w) / (n - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hf_formulas() {
        let lin = Schedule::new("linear", 5, 25).unwrap();
        assert_eq!(lin.factor(0), 0.0);
        assert_eq!(lin.factor(1), 0.2);
        assert_eq!(lin.factor(5), 1.0);
        assert_eq!(lin.factor(15), 0.5);
        assert_eq!(lin.factor(25), 0.0);
        let cos = Schedule::new("cosine", 0, 10).unwrap();
        assert_eq!(cos.factor(0), 1.0);
        assert!((cos.factor(5) - 0.5).abs() < 1e-12);
        assert!(cos.factor(10).abs() < 1e-12);
        let cw = Schedule::new("constant_with_warmup", 4, 10).unwrap();
        assert_eq!((cw.factor(2), cw.factor(4), cw.factor(9)), (0.5, 1.0, 1.0));
        assert_eq!(Schedule::new("constant", 4, 10).unwrap().factor(0), 1.0);
        assert_eq!(Schedule::warmup_steps(0, 0.05, 30), 2);
        assert_eq!(Schedule::warmup_steps(3, 0.5, 30), 3);
        let e = Schedule::new("cosin", 0, 1).unwrap_err().to_string();
        assert!(e.starts_with("lr_scheduler_type = cosin: expected"), "{e}");
    }
}
