//! `training_loss.png` (and `training_eval_loss.png`) as LLaMA-Factory's `plot_loss` draws
//! them: the raw curve faint, an EMA-smoothed curve over it. The font is embedded so the
//! plot renders the same on machines without system fonts.

use crate::error::TrainError;
use crate::log::Logger;
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSansMono.ttf");
static REGISTER: Once = Once::new();

/// LF's `smooth`: an EMA whose weight grows with the number of points (a sigmoid).
pub fn smooth(xs: &[f64]) -> Vec<f64> {
    let Some(&first) = xs.first() else {
        return vec![];
    };
    let weight = 1.8 * (1.0 / (1.0 + (-0.05 * xs.len() as f64).exp()) - 0.5);
    let mut last = first;
    xs.iter()
        .map(|&x| {
            last = last * weight + (1.0 - weight) * x;
            last
        })
        .collect()
}

/// `overlay` draws a second named series (eval loss on the training-loss plot) as points
/// joined by a line, unsmoothed: evaluations are few.
pub fn plot(
    path: &Path,
    title: &str,
    points: &[(f64, f64)],
    overlay: Option<(&str, &[(f64, f64)])>,
) -> Result<(), TrainError> {
    REGISTER.call_once(|| {
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
    let err = |e: String| TrainError::file(path, format!("cannot draw the plot: {e}"));
    let tmp = path.with_extension("tmp.png");
    {
        let root = BitMapBackend::new(&tmp, (800, 500)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let ys: Vec<f64> = points.iter().map(|p| p.1).collect();
        let sm = smooth(&ys);
        let extra = overlay.map_or(&[][..], |o| o.1);
        let all = || points.iter().chain(extra);
        let x0 = all().map(|p| p.0).fold(f64::INFINITY, f64::min);
        let x1 = all()
            .map(|p| p.0)
            .fold(f64::NEG_INFINITY, f64::max)
            .max(x0 + 1.0);
        let lo = all().map(|p| p.1).fold(f64::INFINITY, f64::min);
        let hi = all().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
        let pad = ((hi - lo) * 0.05).max(1e-3);
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(56)
            .build_cartesian_2d(x0..x1, (lo - pad)..(hi + pad))
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss")
            .label_style(("sans-serif", 13))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        let faint = RGBColor(31, 119, 180).mix(0.4);
        chart
            .draw_series(LineSeries::new(points.iter().copied(), faint))
            .map_err(|e| err(e.to_string()))?
            .label("original")
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], faint));
        let xs = points.iter().map(|p| p.0);
        chart
            .draw_series(LineSeries::new(
                xs.zip(sm),
                RGBColor(31, 119, 180).stroke_width(2),
            ))
            .map_err(|e| err(e.to_string()))?
            .label("smoothed")
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RGBColor(31, 119, 180)));
        if let Some((name, pts)) = overlay.filter(|o| !o.1.is_empty()) {
            let orange = RGBColor(255, 127, 14);
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), orange.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label(name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], orange));
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 3, orange.filled())))
                .map_err(|e| err(e.to_string()))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| TrainError::file(path, e))?;
    Ok(())
}

/// The loss plot (with eval loss drawn over it when the run evaluated), and LF's separate
/// eval-loss plot.
pub fn plot_losses(out: &Path, log: &Logger) -> Result<(), TrainError> {
    let title = |k: &str| format!("{k} of {}", out.display());
    let loss = log.series("loss");
    let eval = log.series("eval_loss");
    if !loss.is_empty() {
        plot(
            &out.join("training_loss.png"),
            &title("training loss"),
            &loss,
            Some(("eval_loss", &eval)),
        )?;
    }
    if !eval.is_empty() {
        plot(
            &out.join("training_eval_loss.png"),
            &title("eval loss"),
            &eval,
            None,
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn smoothing_follows_lf() {
        // LF: weight = 1.8·(sigmoid(0.05·n) − 0.5); n = 4 → 0.0899.
        let s = super::smooth(&[4.0, 2.0, 2.0, 2.0]);
        let w = 1.8 * (1.0 / (1.0 + (-0.2f64).exp()) - 0.5);
        assert!((s[1] - (4.0 * w + 2.0 * (1.0 - w))).abs() < 1e-12);
        assert_eq!(s[0], 4.0);
        assert!(s[3] < s[2] && s[2] < s[1]);
    }
}
