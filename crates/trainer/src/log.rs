//! What a run reports as it goes: LLaMA-Factory's `trainer_log.jsonl` (one line per logging
//! step, flushed at once so a crash keeps it), HF's `log_history`, and a progress bar on a
//! terminal or plain lines otherwise.

use crate::error::TrainError;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Map, Value};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// LF's `H:MM:SS`.
pub fn hms(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

pub struct Logger {
    path: PathBuf,
    pub history: Vec<Value>,
    bar: Option<ProgressBar>,
    started: Instant,
    /// Steps already done when this process started (a resumed run).
    first_step: usize,
    pub total_steps: usize,
}

impl Logger {
    /// A fresh run starts `trainer_log.jsonl` anew; a resumed one keeps the lines up to its
    /// checkpoint's step and drops those of the interrupted run past it, as LF's log shows
    /// one line per step.
    pub fn new(
        out: &Path,
        total_steps: usize,
        first_step: usize,
        history: Vec<Value>,
    ) -> Result<Self, TrainError> {
        let path = out.join("trainer_log.jsonl");
        let kept: String = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter(|l| {
                first_step > 0
                    && serde_json::from_str::<Value>(l)
                        .ok()
                        .and_then(|v| v.get("current_steps")?.as_u64())
                        .is_some_and(|s| s as usize <= first_step)
            })
            .map(|l| format!("{l}\n"))
            .collect();
        if path.exists() {
            phi_model::io::write_atomic(&path, kept.as_bytes())?;
        }
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(total_steps as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("template"),
            );
            b.set_position(first_step as u64);
            b
        });
        Ok(Logger {
            path,
            history,
            bar,
            started: Instant::now(),
            first_step,
            total_steps,
        })
    }

    pub fn elapsed(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn times(&self, step: usize) -> (f64, f64) {
        let elapsed = self.elapsed();
        let done = step.saturating_sub(self.first_step).max(1) as f64;
        let left = self.total_steps.saturating_sub(step) as f64;
        (elapsed, elapsed / done * left)
    }

    fn append(&self, line: &Value) -> Result<(), TrainError> {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| TrainError::file(&self.path, e))?;
        write_line(&mut f, line).map_err(|e| TrainError::file(&self.path, e))
    }

    /// One logging step: `values` holds loss, lr, and the regularizer parts when present.
    pub fn log(
        &mut self,
        step: usize,
        epoch: f64,
        values: Map<String, Value>,
    ) -> Result<(), TrainError> {
        let (elapsed, remaining) = self.times(step);
        let mut line = Map::new();
        line.insert("current_steps".into(), json!(step));
        line.insert("total_steps".into(), json!(self.total_steps));
        line.extend(values.clone());
        line.insert("epoch".into(), json!(round(epoch, 2)));
        line.insert(
            "percentage".into(),
            json!(round(
                100.0 * step as f64 / self.total_steps.max(1) as f64,
                2
            )),
        );
        line.insert("elapsed_time".into(), json!(hms(elapsed)));
        line.insert("remaining_time".into(), json!(hms(remaining)));
        let line = Value::Object(line);
        self.append(&line)?;
        let mut h = values;
        h.insert("epoch".into(), json!(epoch));
        h.insert("step".into(), json!(step));
        if let Some(lr) = h.remove("lr") {
            h.insert("learning_rate".into(), lr);
        }
        self.history.push(Value::Object(h));
        let text = line
            .as_object()
            .map(|o| {
                ["loss", "eval_loss", "rmsnorm_reg_loss", "lr"]
                    .iter()
                    .filter_map(|k| Some(format!("{k} {}", fmt_num(o.get(*k)?)?)))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        match &self.bar {
            Some(b) => b.println(format!("step {step}/{}: {text}", self.total_steps)),
            None => eprintln!(
                "step {step}/{} ({}%, {} elapsed, {} left): {text}",
                self.total_steps,
                round(100.0 * step as f64 / self.total_steps.max(1) as f64, 1),
                hms(elapsed),
                hms(remaining)
            ),
        }
        Ok(())
    }

    pub fn tick(&self, step: usize, loss: f64) {
        if let Some(b) = &self.bar {
            b.set_position(step as u64);
            b.set_message(format!("loss {loss:.4}"));
        }
    }

    pub fn say(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }

    /// (step, value) pairs of `key` in the history, for the plot.
    pub fn series(&self, key: &str) -> Vec<(f64, f64)> {
        self.history
            .iter()
            .filter_map(|h| Some((h.get("step")?.as_f64()?, h.get(key)?.as_f64()?)))
            .collect()
    }
}

/// The line and its newline in one write: `writeln!` on a file issues a write per formatted
/// piece, so a kill could tear a line and two appenders could interleave theirs.
fn write_line(f: &mut impl Write, line: &Value) -> std::io::Result<()> {
    f.write_all(format!("{line}\n").as_bytes())
}

/// Losses since the last logging step (HF logs their mean).
#[derive(Default)]
pub struct Window {
    n: usize,
    loss: f64,
    base: f64,
    reg: f64,
    grad_norm: f64,
}

impl Window {
    pub fn add(&mut self, loss: f64, base: f64, reg: f64, grad_norm: f64) {
        self.n += 1;
        self.loss += loss;
        self.base += base;
        self.reg += reg;
        self.grad_norm = grad_norm;
    }
    pub fn take(&mut self, with_reg: bool) -> Map<String, Value> {
        let n = self.n.max(1) as f64;
        let mut m = Map::new();
        m.insert("loss".into(), json!(self.loss / n));
        if with_reg {
            m.insert("base_loss".into(), json!(self.base / n));
            m.insert("rmsnorm_reg_loss".into(), json!(self.reg / n));
            m.insert("total_loss".into(), json!(self.loss / n));
        }
        m.insert("grad_norm".into(), json!(self.grad_norm));
        *self = Window::default();
        m
    }
}

fn fmt_num(v: &Value) -> Option<String> {
    let x = v.as_f64()?;
    Some(if x != 0.0 && x.abs() < 1e-3 {
        format!("{x:.3e}")
    } else {
        format!("{x:.4}")
    })
}

pub fn round(x: f64, digits: i32) -> f64 {
    let m = 10f64.powi(digits);
    (x * m).round() / m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the writes it is given.
    struct Writes(Vec<Vec<u8>>);
    impl Write for Writes {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_log_line_is_one_write() {
        let line = json!({"current_steps": 3, "loss": 1.25, "lr": 1e-4, "epoch": 0.5});
        let mut w = Writes(vec![]);
        write_line(&mut w, &line).unwrap();
        assert_eq!(w.0.len(), 1);
        assert_eq!(w.0[0], format!("{line}\n").into_bytes());
    }
}
