//! `recap policy calibrate`: fits the routing score from labelled cases,
//! prints the quality-cost frontier, and writes a new policy version with
//! the score and the threshold for the user's target.
//!
//! Cases come from two places:
//! - references: `recap eval` writes `cases.jsonl`, one line per case with
//!   the compact output's signals and both tiers' ROUGE-L and cost. The
//!   label is whether compact reached `--label-share` of large's ROUGE-L.
//! - shadow pairs from production (`--shadow`): jobs the policy sampled
//!   also ran on large. With no reference, the label is whether the compact
//!   output agrees with large's (ROUGE-L F1 of one against the other) at
//!   least `--agreement` (default: the median agreement of the pairs).

use crate::config::Config;
use crate::{policy, store};
use anyhow::{bail, Context, Result};
use recap_eval::rouge::Rouge;
use recap_eval::stats::{mean, percentile};
use recap_policy::score::{self, Case, FrontierPoint, Outcomes, Signals, Target};
use recap_policy::Tier;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// One labelled case as `recap eval` writes it to `cases.jsonl`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseLine {
    pub id: String,
    pub signals: Signals,
    /// ROUGE-L F1 of each tier's output against the reference.
    pub compact_quality: f64,
    pub large_quality: f64,
    pub compact_cost: f64,
    pub large_cost: f64,
    /// ROUGE-L F1 of the compact output against large's.
    pub agreement: f64,
    /// The compact model that wrote the output.
    #[serde(default)]
    pub compact_model: String,
}

#[derive(Clone, Copy, Debug, PartialEq, clap::ValueEnum)]
pub enum Labels {
    /// Compact reached `--label-share` of large's ROUGE-L on the reference.
    Reference,
    /// Compact agreed with large (shadow-style labels, no reference used).
    Agreement,
}

#[derive(clap::Args, Debug)]
pub struct CalibrateArgs {
    /// `cases.jsonl` from `recap eval` (reference labels).
    #[arg(long, conflicts_with = "shadow")]
    pub cases: Option<PathBuf>,
    /// Shadow pairs from PostgreSQL instead (agreement labels).
    #[arg(long)]
    pub shadow: bool,
    /// Only this tenant's shadow pairs.
    #[arg(long, requires = "shadow")]
    pub tenant: Option<String>,
    /// How `--cases` are labelled.
    #[arg(long, value_enum, default_value = "reference")]
    pub labels: Labels,
    /// Reference labels: compact is enough where its ROUGE-L is at least
    /// this share of large's.
    #[arg(long, default_value_t = 1.0)]
    pub label_share: f64,
    /// Agreement labels: compact is enough where it agrees with large at
    /// least this much (ROUGE-L F1); default the median of the cases.
    #[arg(long)]
    pub agreement: Option<f64>,
    /// The cheapest threshold reaching this share of large-only quality.
    #[arg(long, conflicts_with = "max_cost_share")]
    pub target_quality: Option<f64>,
    /// The best quality at no more than this share of large-only cost.
    #[arg(long)]
    pub max_cost_share: Option<f64>,
    #[command(flatten)]
    pub fit: FitArgs,
    /// The new policy version (default: the current one's, dated).
    #[arg(long)]
    pub version: Option<String>,
    /// Where to write the new policy file.
    #[arg(long)]
    pub out: PathBuf,
}

/// How the score is fitted; shared by `recap policy calibrate` and `recap eval`.
#[derive(clap::Args, Debug, Clone)]
pub struct FitArgs {
    /// Score features, comma-separated (default: all this build knows).
    #[arg(long, value_delimiter = ',')]
    pub features: Vec<String>,
    /// L2 penalty on the score's standardized weights.
    #[arg(long, default_value_t = 1.0)]
    pub l2: f64,
    /// Folds for the held-out result: each case is judged by a score fitted
    /// on the others.
    #[arg(long, default_value_t = 5)]
    pub folds: usize,
}

impl FitArgs {
    /// The named features, or by default every feature this build knows
    /// that jobs have: not `query_words`, which only an eval's query cases
    /// carry (jobs have no query, so a weight on it would shift every job).
    pub fn features(&self) -> Vec<String> {
        if self.features.is_empty() {
            score::FEATURES
                .iter()
                .map(|(n, _)| n.to_string())
                .filter(|n| n != "query_words")
                .collect()
        } else {
            self.features.clone()
        }
    }
}

impl CalibrateArgs {
    pub fn target(&self) -> Result<Target> {
        match (self.target_quality, self.max_cost_share) {
            (Some(q), None) if q > 0.0 && q.is_finite() => Ok(Target::Quality(q)),
            (None, Some(c)) if c > 0.0 && c.is_finite() => Ok(Target::Cost(c)),
            (None, None) => bail!("say what to calibrate for: --target-quality 0.95 (share of large-only quality) or --max-cost-share 0.4"),
            _ => bail!("--target-quality and --max-cost-share must be positive numbers"),
        }
    }
}

/// Writes `cases.jsonl`, one case a line, as `read_cases` reads it.
pub fn write_lines(path: &Path, lines: &[CaseLine]) -> Result<()> {
    let mut jsonl = String::new();
    for l in lines {
        jsonl.push_str(&serde_json::to_string(l)?);
        jsonl.push('\n');
    }
    std::fs::write(path, jsonl).with_context(|| format!("writing {}", path.display()))
}

/// Reads `cases.jsonl`, naming the line that does not parse.
pub fn read_cases(path: &Path) -> Result<Vec<CaseLine>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).with_context(|| {
                format!("{} line {}: not a calibration case", path.display(), i + 1)
            })
        })
        .collect()
}

/// Labelled cases from eval lines. Reference labels keep the ROUGE-L
/// outcomes; agreement labels use agreement as compact's quality and 1.0
/// as large's, as a shadow calibration must (it has no reference).
pub fn label(
    lines: &[CaseLine],
    labels: Labels,
    label_share: f64,
    agreement: Option<f64>,
) -> (Vec<Case>, Option<f64>) {
    match labels {
        Labels::Reference => (
            lines
                .iter()
                .map(|l| Case {
                    signals: l.signals.clone(),
                    enough: l.compact_quality >= label_share * l.large_quality,
                    outcomes: Outcomes {
                        compact_quality: l.compact_quality,
                        large_quality: l.large_quality,
                        compact_cost: l.compact_cost,
                        large_cost: l.large_cost,
                    },
                })
                .collect(),
            None,
        ),
        Labels::Agreement => {
            // The median agreement (0 for no cases).
            let tau = agreement.unwrap_or_else(|| {
                let all: Vec<f64> = lines.iter().map(|l| l.agreement).collect();
                percentile(&all, 50.0)
            });
            (
                lines
                    .iter()
                    .map(|l| Case {
                        signals: l.signals.clone(),
                        enough: l.agreement >= tau,
                        outcomes: Outcomes {
                            compact_quality: l.agreement,
                            large_quality: 1.0,
                            compact_cost: l.compact_cost,
                            large_cost: l.large_cost,
                        },
                    })
                    .collect(),
                Some(tau),
            )
        }
    }
}

/// Shadow pairs from the store as calibration lines (no reference: the
/// quality fields hold the agreement and 1.0).
async fn shadow_lines(config: &Config, tenant: Option<&str>) -> Result<Vec<CaseLine>> {
    let pool = store::connect(config).await?;
    let mut pairs = store::shadow_pairs(&pool, tenant).await?;
    // Only the compact model the tier runs now: a score speaks for one model.
    if let Some(compact) = config.tier_model(Tier::Compact) {
        pairs.retain(|p| p.compact_model == compact);
    }
    let prices = policy::load(config)?;
    let rouge = Rouge::new(true);
    Ok(pairs
        .iter()
        .map(|p| {
            let mut job = recap_job::Job::from_text("shadow", "x", vec![]);
            job.transcript = p.transcript.0.clone();
            job.language = p.language.clone();
            let said = policy::Said {
                kind: &p.kind,
                text: &p.compact_text,
                input_tokens: p.compact_input_tokens.max(0) as u32,
                output_tokens: p.compact_output_tokens.max(0) as u32,
                mean_logprob: p.mean_logprob,
                mean_entropy: p.mean_entropy,
            };
            let cost = |model: &str, i: i32, o: i32| {
                prices.price(model).cost(i.max(0) as u64, o.max(0) as u64)
            };
            let agreement = rouge.score(&p.large_text, &p.compact_text).rouge_l.fmeasure;
            CaseLine {
                id: format!("{}:{}", p.job_id, p.kind),
                signals: policy::JobView::of(&job).signals(said, None),
                compact_quality: agreement,
                large_quality: 1.0,
                compact_cost: cost(
                    &p.compact_model,
                    p.compact_input_tokens,
                    p.compact_output_tokens,
                ),
                large_cost: cost(&p.large_model, p.large_input_tokens, p.large_output_tokens),
                agreement,
                compact_model: p.compact_model.clone(),
            }
        })
        .collect())
}

/// The policy text with `version`, the `score` and `cascade` rules, and a
/// `[score]` table replacing any there was; everything else, comments
/// included, stays as written (toml_edit keeps the document's layout).
pub fn policy_with_score(base: &str, version: &str, s: &score::Score) -> Result<String> {
    let mut doc: toml_edit::DocumentMut = base.parse().context("reading the current policy")?;
    doc["version"] = toml_edit::value(version);
    let rules = doc
        .entry("rules")
        .or_insert_with(|| toml_edit::value(toml_edit::Array::new()))
        .as_array_mut()
        .context("the policy's `rules` is not an array")?;
    for r in ["cascade", "score"] {
        if !rules.iter().any(|v| v.as_str() == Some(r)) {
            rules.push(r);
        }
    }
    #[derive(Serialize)]
    struct Wrapper<'a> {
        score: &'a score::Score,
    }
    const COMMENT: &str = "# The routing score, fitted by `recap policy calibrate`: compact output whose\n\
                           # P(compact is enough) is under `threshold` goes once to the large tier.\n";
    // Comments above an old score table (other than ours) stay above the new one.
    let (kept, position) = match doc.get("score").and_then(|i| i.as_table()) {
        Some(old) => (
            old.decor()
                .prefix()
                .and_then(|p| p.as_str())
                .unwrap_or("")
                .replace(COMMENT, ""),
            old.position(),
        ),
        None => ("\n".to_string(), None),
    };
    let fresh: toml_edit::DocumentMut = toml::to_string(&Wrapper { score: s })?.parse()?;
    let mut table = fresh["score"].clone();
    if let Some(t) = table.as_table_mut() {
        t.decor_mut().set_prefix(format!("{kept}{COMMENT}"));
        // In the old table's place, or after every other table.
        t.set_position(position.or(Some(isize::MAX)));
    }
    doc["score"] = table;
    Ok(doc.to_string())
}

fn frontier_table(points: &[FrontierPoint], chosen: &FrontierPoint) -> String {
    let mut s =
        String::from("| threshold | escalated | quality share | cost share |\n|---|---|---|---|\n");
    // About a dozen rows, and the chosen one.
    let step = (points.len() / 12).max(1);
    for (i, p) in points.iter().enumerate() {
        let mark = p == chosen;
        if i % step == 0 || mark || i + 1 == points.len() {
            s.push_str(&format!(
                "| {:.3} | {} | {:.3} | {:.3} |{}\n",
                p.threshold,
                p.escalated,
                p.quality_share,
                p.cost_share,
                if mark { " chosen" } else { "" }
            ));
        }
    }
    s
}

pub async fn run(config: &Config, args: CalibrateArgs) -> Result<()> {
    let target = args.target()?;
    let features = args.fit.features();
    let (lines, labels, source) = labelled_lines(config, &args).await?;
    let mut models: Vec<&str> = lines.iter().map(|l| l.compact_model.as_str()).collect();
    models.sort();
    models.dedup();
    if models.len() > 1 {
        bail!(
            "{source} mixes outputs of compact models {}: calibrate one model's at a time",
            models.join(", ")
        );
    }
    let (cases, tau) = label(&lines, labels, args.label_share, args.agreement);
    let cal = score::calibrate(&features, &cases, target, args.fit.l2)
        .with_context(|| format!("calibrating on {source}"))?;
    if let Target::Quality(share) = target {
        if cal.chosen.quality_share + 1e-12 < share {
            println!(
                "note: no threshold reaches {share} of large-only quality on these cases; the best one ({:.3}) is chosen",
                cal.chosen.quality_share
            );
        }
    }
    let enough = cases.iter().filter(|c| c.enough).count();
    println!(
        "{} cases from {source}: compact enough on {enough}, not on {}{}",
        cases.len(),
        cases.len() - enough,
        tau.map(|t| format!(" (agreement threshold {t:.3})"))
            .unwrap_or_default()
    );
    println!(
        "\nFrontier of the fitted score on these cases (share of large-only quality and cost):\n\n{}",
        frontier_table(&cal.frontier, &cal.chosen)
    );
    print_held_out(&args, &features, &cases, target);
    let current = policy::load(config)?;
    let base = match &config.policy.file {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => policy::DEFAULT_POLICY.to_string(),
    };
    let version = args.version.clone().unwrap_or_else(|| {
        format!(
            "{}-calibrated-{}",
            current.version,
            chrono::Utc::now().format("%Y%m%d%H%M")
        )
    });
    let mut fitted = cal.score.clone();
    fitted.model = models.first().map(|m| m.to_string()).unwrap_or_default();
    fitted.fitted = format!(
        "{} cases from {source}, {:?} labels, target {target:?}; chosen: {} escalated, quality share {:.3}, cost share {:.3}",
        cases.len(),
        labels,
        cal.chosen.escalated,
        cal.chosen.quality_share,
        cal.chosen.cost_share
    );
    let text = policy_with_score(&base, &version, &fitted)?;
    // The file must load as the routers will load it, or nothing is written.
    recap_policy::load_policy(
        &text,
        &policy::tiers(config),
        &policy::catalog_prices(config)?,
    )
    .context("the calibrated policy does not load")?;
    recap_engine::models::adapter::write_atomic(&args.out, &text)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "\nwrote {} (version {version}, threshold {:.3}); install it as policy.file and send SIGHUP to the routers and workers",
        args.out.display(),
        fitted.threshold
    );
    Ok(())
}

/// The cases to calibrate on, their labels and where they come from: an
/// eval's `cases.jsonl` (`--cases`) or the shadow pairs (`--shadow`).
async fn labelled_lines(
    config: &Config,
    args: &CalibrateArgs,
) -> Result<(Vec<CaseLine>, Labels, String)> {
    Ok(match (&args.cases, args.shadow) {
        (Some(path), false) => (read_cases(path)?, args.labels, path.display().to_string()),
        (None, true) => (
            shadow_lines(config, args.tenant.as_deref()).await?,
            Labels::Agreement,
            format!(
                "shadow pairs{}",
                args.tenant
                    .as_deref()
                    .map(|t| format!(" of tenant {t}"))
                    .unwrap_or_default()
            ),
        ),
        _ => bail!(
            "say where the labelled cases come from: --cases out/eval/cases.jsonl, or --shadow"
        ),
    })
}

/// The held-out result, a report only: a fold too small to fit does not
/// stop the calibration the whole set allowed.
fn print_held_out(
    args: &CalibrateArgs,
    features: &[String],
    cases: &[score::Case],
    target: Target,
) {
    match score::cross_validate(features, cases, args.fit.folds, target, args.fit.l2) {
        Ok(held_out) => {
            let outcomes: Vec<Outcomes> = cases.iter().map(|c| c.outcomes).collect();
            let (q, c) = score::cascade_outcome(&outcomes, &held_out);
            let large_q = mean(&outcomes.iter().map(|o| o.large_quality).collect::<Vec<_>>());
            let large_c: f64 = outcomes.iter().map(|o| o.large_cost).sum();
            println!(
                "Held out ({}-fold, each case judged by a score fitted without it): quality share {:.3}, cost share {:.3}, {} of {} escalated",
                args.fit.folds.max(2),
                q / large_q.max(1e-12),
                c / large_c.max(1e-12),
                held_out.iter().filter(|&&e| e).count(),
                cases.len()
            );
        }
        Err(e) => println!("Held out: not computed ({e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_written_policy_keeps_comments_and_loads() {
        let s = score::Score {
            features: vec!["mean_logprob".into()],
            mean: vec![-1.0],
            scale: vec![0.5],
            weights: vec![1.5],
            bias: 0.2,
            threshold: 0.3,
            kinds: vec![],
            model: String::new(),
            fitted: "test".into(),
        };
        let once = policy_with_score(policy::DEFAULT_POLICY, "v-cal", &s).unwrap();
        assert!(once.contains("# recap's cost policy"));
        let tiers = recap_policy::Tiers {
            compact: Some("smollm2-135m-qmsum-lora".into()),
            large: Some("qwen2.5-coder-0.5b-instruct-q4_k_m".into()),
        };
        let p = recap_policy::load_policy(
            &once,
            &tiers,
            &policy::catalog_prices(&Config::default()).unwrap(),
        )
        .unwrap();
        assert_eq!(p.version, "v-cal");
        assert!(p.rules.score && p.rules.cascade);
        assert_eq!(p.score.as_ref().unwrap().threshold, 0.3);
        // A rules array over several lines and a quoted key are edited too.
        let spread = "\"version\" = \"old\"\nrules = [\n  \"quality\", # why\n]\n";
        let edited = policy_with_score(spread, "new", &s).unwrap();
        let t: toml::Table = toml::from_str(&edited).unwrap();
        assert_eq!(t["version"].as_str(), Some("new"));
        assert_eq!(t["rules"].as_array().unwrap().len(), 3, "{edited}");
        assert!(edited.contains("# why"));
        // Calibrating again replaces the score; it is not duplicated.
        let twice = policy_with_score(&once, "v-cal-2", &s).unwrap();
        assert_eq!(twice.matches("[score]").count(), 1);
        assert_eq!(twice.matches("# The routing score").count(), 1);
        assert_eq!(twice.len(), once.len() + 2, "only the version grew");
        assert_eq!(twice.matches("\"score\"").count(), 1);
    }

    #[test]
    fn labels_from_references_and_from_agreement() {
        let line = |cq: f64, lq: f64, a: f64| CaseLine {
            compact_model: "m".into(),
            id: "x".into(),
            signals: Signals::default(),
            compact_quality: cq,
            large_quality: lq,
            compact_cost: 1.0,
            large_cost: 5.0,
            agreement: a,
        };
        let lines = [
            line(0.3, 0.2, 0.1),
            line(0.1, 0.2, 0.5),
            line(0.2, 0.2, 0.9),
        ];
        let (r, tau) = label(&lines, Labels::Reference, 1.0, None);
        assert_eq!(
            r.iter().map(|c| c.enough).collect::<Vec<_>>(),
            [true, false, true]
        );
        assert_eq!(tau, None);
        let (a, tau) = label(&lines, Labels::Agreement, 1.0, None);
        assert_eq!(tau, Some(0.5));
        assert_eq!(
            a.iter().map(|c| c.enough).collect::<Vec<_>>(),
            [false, true, true]
        );
        assert_eq!(a[0].outcomes.large_quality, 1.0);
        assert_eq!(a[0].outcomes.compact_quality, 0.1);
    }
}
