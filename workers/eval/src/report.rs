//! The evaluation's outputs: a Markdown table and a quality-versus-cost
//! scatter plot in SVG. The plot is written by hand rather than with
//! plotters: plotters lays out text through system font libraries, which
//! these machines do not have; a labelled scatter is a few dozen lines.

use crate::stats::Interval;
use serde::{Deserialize, Serialize};

/// One row of the results: a model, a baseline or a policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub name: String,
    pub cases: usize,
    pub rouge1: Interval,
    pub rouge2: Interval,
    pub rouge_l: Interval,
    pub mean_input_tokens: f64,
    pub mean_output_tokens: f64,
    pub p50_latency_s: f64,
    pub p95_latency_s: f64,
    pub total_cost_usd: f64,
    /// e.g. "compact 15 / large 5"; empty for single models.
    pub route_split: String,
    /// Mean share of output sentences copied from the transcript
    /// (`recap_policy::copying::copy_rate`).
    #[serde(default)]
    pub copy_rate: f64,
}

fn ci(i: &Interval) -> String {
    format!("{:.3} [{:.3}, {:.3}]", i.mean, i.low, i.high)
}

pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| system | cases | ROUGE-1 F1 [95% CI] | ROUGE-2 F1 [95% CI] | ROUGE-L F1 [95% CI] | copied | in tok | out tok | p50 s | p95 s | cost USD | route split |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.0}% | {:.0} | {:.0} | {:.2} | {:.2} | {:.6} | {} |\n",
            r.name,
            r.cases,
            ci(&r.rouge1),
            ci(&r.rouge2),
            ci(&r.rouge_l),
            100.0 * r.copy_rate,
            r.mean_input_tokens,
            r.mean_output_tokens,
            r.p50_latency_s,
            r.p95_latency_s,
            r.total_cost_usd,
            if r.route_split.is_empty() {
                "-"
            } else {
                &r.route_split
            }
        ));
    }
    s
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A router's quality-cost curve: (total cost, mean ROUGE-L) points.
#[derive(Debug, Clone, PartialEq)]
pub struct Curve {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const CURVE_COLOURS: [&str; 4] = ["#d62728", "#2ca02c", "#9467bd", "#ff7f0e"];

/// ROUGE-L F1 against total cost, one labelled point per row, and each
/// curve as a line with its name in the legend.
pub fn svg_plot(rows: &[Row], curves: &[Curve], title: &str) -> String {
    let (w, h, m) = (720.0, 480.0, 70.0);
    let curve_points = || curves.iter().flat_map(|c| c.points.iter());
    let max_cost = rows
        .iter()
        .map(|r| r.total_cost_usd)
        .chain(curve_points().map(|p| p.0))
        .fold(0.0, f64::max)
        .max(1e-9)
        * 1.1;
    let max_q = rows
        .iter()
        .map(|r| r.rouge_l.high.max(r.rouge_l.mean))
        .chain(curve_points().map(|p| p.1))
        .fold(0.0, f64::max)
        .max(0.05)
        * 1.15;
    let x = |c: f64| m + (c / max_cost) * (w - 2.0 * m);
    let y = |q: f64| h - m - (q / max_q) * (h - 2.0 * m);
    let mut s = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="24" text-anchor="middle" font-size="15">{}</text>
<line x1="{m}" y1="{}" x2="{}" y2="{}" stroke="black"/>
<line x1="{m}" y1="{m}" x2="{m}" y2="{}" stroke="black"/>
<text x="{}" y="{}" text-anchor="middle">total cost (USD)</text>
<text x="18" y="{}" text-anchor="middle" transform="rotate(-90 18 {})">ROUGE-L F1</text>
"#,
        w / 2.0,
        escape(title),
        h - m,
        w - m,
        h - m,
        h - m,
        w / 2.0,
        h - 20.0,
        h / 2.0,
        h / 2.0
    );
    for i in 0..=4 {
        let c = max_cost * i as f64 / 4.0;
        let q = max_q * i as f64 / 4.0;
        s.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{:.2e}</text>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.3}</text>\n",
            x(c),
            h - m + 18.0,
            c,
            m - 6.0,
            y(q) + 4.0,
            q
        ));
    }
    for r in rows {
        let (px, py) = (x(r.total_cost_usd), y(r.rouge_l.mean));
        s.push_str(&format!(
            "<line x1=\"{px:.1}\" y1=\"{:.1}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#888\"/>\n<circle cx=\"{px:.1}\" cy=\"{py:.1}\" r=\"5\" fill=\"#1f77b4\"/>\n<text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            y(r.rouge_l.low),
            y(r.rouge_l.high),
            px + 8.0,
            py - 6.0,
            escape(&r.name)
        ));
    }
    for (i, c) in curves.iter().enumerate() {
        let colour = CURVE_COLOURS[i % CURVE_COLOURS.len()];
        let pts: Vec<String> = c
            .points
            .iter()
            .map(|&(cost, q)| format!("{:.1},{:.1}", x(cost), y(q)))
            .collect();
        let ly = m + 16.0 * i as f64;
        s.push_str(&format!(
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\"/>\n<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{colour}\" stroke-width=\"2\"/>\n<text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            pts.join(" "),
            w - m - 210.0,
            w - m - 190.0,
            w - m - 184.0,
            ly + 4.0,
            escape(&c.name)
        ));
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(name: &str, q: f64, c: f64) -> Row {
        let i = Interval {
            mean: q,
            low: q - 0.01,
            high: q + 0.01,
        };
        Row {
            name: name.into(),
            cases: 3,
            rouge1: i,
            rouge2: i,
            rouge_l: i,
            mean_input_tokens: 100.0,
            mean_output_tokens: 20.0,
            p50_latency_s: 1.0,
            p95_latency_s: 2.0,
            total_cost_usd: c,
            route_split: String::new(),
            copy_rate: 0.25,
        }
    }

    #[test]
    fn table_and_plot() {
        let rows = [row("lead-60", 0.15, 0.0), row("a <b>", 0.2, 0.001)];
        let md = markdown(&rows);
        assert_eq!(md.lines().count(), 4);
        assert!(md.contains("| lead-60 | 3 | 0.150 [0.140, 0.160]"));
        assert!(md.contains("| 25% |"), "{md}");
        let curve = Curve {
            name: "score".into(),
            points: vec![(0.0005, 0.18), (0.002, 0.21)],
        };
        let svg = svg_plot(&rows, &[curve], "QMSum");
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<circle").count(), 2);
        assert_eq!(svg.matches("<polyline").count(), 1);
        assert!(svg.contains("a &lt;b&gt;") && svg.contains(">score</text>"));
    }
}
