//! The loss curve of a run as an SVG: per-step loss, its moving average,
//! and each epoch's validation ROUGE-L on a second axis. Pure.

use crate::trainer::TrainReport;
use std::fmt::Write;

const W: f64 = 720.0;
const H: f64 = 360.0;
const PAD: f64 = 48.0;

fn polyline(points: &[(f64, f64)], colour: &str, width: f64) -> String {
    let pts: Vec<String> = points
        .iter()
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect();
    format!(
        "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"{width}\" points=\"{}\"/>\n",
        pts.join(" ")
    )
}

pub fn loss_svg(report: &TrainReport) -> String {
    let losses: Vec<f64> = report.steps.iter().map(|s| s.loss).collect();
    let n = losses.len().max(2) as f64;
    let max = losses.iter().cloned().fold(f64::MIN, f64::max).max(1e-9);
    let min = losses
        .iter()
        .cloned()
        .fold(f64::MAX, f64::min)
        .min(max - 1e-9);
    let x = |i: f64| PAD + (W - 2.0 * PAD) * i / (n - 1.0);
    let y = |v: f64| H - PAD - (H - 2.0 * PAD) * (v - min) / (max - min);
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    let _ = writeln!(
        s,
        "<text x=\"{PAD}\" y=\"20\">{}: training loss per step (grey), moving average of 16 (blue); val ROUGE-L per epoch (orange)</text>",
        report.config.base_model
    );
    let _ = writeln!(
        s,
        "<line x1=\"{PAD}\" y1=\"{b}\" x2=\"{r}\" y2=\"{b}\" stroke=\"black\"/><line x1=\"{PAD}\" y1=\"{PAD}\" x2=\"{PAD}\" y2=\"{b}\" stroke=\"black\"/>",
        b = H - PAD,
        r = W - PAD
    );
    let _ = writeln!(
        s,
        "<text x=\"4\" y=\"{:.0}\">{max:.2}</text><text x=\"4\" y=\"{:.0}\">{min:.2}</text>",
        PAD + 4.0,
        H - PAD
    );
    let _ = writeln!(
        s,
        "<text x=\"{:.0}\" y=\"{:.0}\">step {}</text>",
        W - PAD - 60.0,
        H - PAD + 20.0,
        losses.len()
    );
    let raw: Vec<(f64, f64)> = losses
        .iter()
        .enumerate()
        .map(|(i, &v)| (x(i as f64), y(v)))
        .collect();
    s.push_str(&polyline(&raw, "#bbbbbb", 1.0));
    let avg: Vec<(f64, f64)> = (0..losses.len())
        .map(|i| {
            let from = i.saturating_sub(15);
            let w = &losses[from..=i];
            (x(i as f64), y(w.iter().sum::<f64>() / w.len() as f64))
        })
        .collect();
    s.push_str(&polyline(&avg, "#1f77b4", 2.0));
    if !report.val.is_empty() {
        let per_epoch = report.steps_total as f64 / report.config.epochs.max(1) as f64;
        let vy = |v: f64| H - PAD - (H - 2.0 * PAD) * v / 0.5;
        let pts: Vec<(f64, f64)> = report
            .val
            .iter()
            .map(|v| (x(v.epoch as f64 * per_epoch - 1.0), vy(v.rouge_l)))
            .collect();
        s.push_str(&polyline(&pts, "#ff7f0e", 2.0));
        for ((px, py), v) in pts.iter().zip(&report.val) {
            let _ = writeln!(s, "<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"3\" fill=\"#ff7f0e\"/><text x=\"{:.1}\" y=\"{:.1}\">{:.3}</text>", px - 40.0, py - 6.0, v.rouge_l);
        }
    }
    s.push_str("</svg>\n");
    s
}
