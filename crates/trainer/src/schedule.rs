//! HF's learning-rate schedules (`transformers.get_scheduler`): the factor on the base rate
//! for optimizer step k (0-based), with linear warmup.

use crate::args::LrSchedulerType as Kind;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: Kind,
    pub warmup: usize,
    pub total: usize,
}

impl Schedule {
    pub fn new(kind: Kind, warmup: usize, total: usize) -> Self {
        Schedule {
            kind,
            warmup,
            total,
        }
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
        let lin = Schedule::new(Kind::Linear, 5, 25);
        assert_eq!(lin.factor(0), 0.0);
        assert_eq!(lin.factor(1), 0.2);
        assert_eq!(lin.factor(5), 1.0);
        assert_eq!(lin.factor(15), 0.5);
        assert_eq!(lin.factor(25), 0.0);
        let cos = Schedule::new(Kind::Cosine, 0, 10);
        assert_eq!(cos.factor(0), 1.0);
        assert!((cos.factor(5) - 0.5).abs() < 1e-12);
        assert!(cos.factor(10).abs() < 1e-12);
        let cw = Schedule::new(Kind::ConstantWithWarmup, 4, 10);
        assert_eq!((cw.factor(2), cw.factor(4), cw.factor(9)), (0.5, 1.0, 1.0));
        assert_eq!(Schedule::new(Kind::Constant, 4, 10).factor(0), 1.0);
        assert_eq!(Schedule::warmup_steps(0, 0.05, 30), 2);
        assert_eq!(Schedule::warmup_steps(3, 0.5, 30), 3);
    }
}
