//! ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum as Google's `rouge-score`
//! computes them, through the `rougers` crate (it reproduces every case of
//! tests/fixtures/rouge-vectors.json; see the test below).

use rougers::{RougeScorer, RougeType};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Prf {
    pub precision: f64,
    pub recall: f64,
    pub fmeasure: f64,
}

/// The JSON shape `recap rouge --json` prints.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct RougeScores {
    pub rouge1: Prf,
    pub rouge2: Prf,
    #[serde(rename = "rougeL")]
    pub rouge_l: Prf,
    #[serde(rename = "rougeLsum")]
    pub rouge_lsum: Prf,
}

pub struct Rouge {
    scorer: RougeScorer,
}

impl Rouge {
    pub fn new(use_stemmer: bool) -> Rouge {
        // The four variant names are valid by construction.
        let scorer = RougeScorer::new(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer)
            .unwrap_or_else(|e| unreachable!("fixed ROUGE variants: {e}"));
        Rouge { scorer }
    }

    /// Scores `candidate` against `reference` (rouge-score's argument order:
    /// target first). ROUGE-Lsum splits on newlines, as rouge-score does.
    pub fn score(&self, reference: &str, candidate: &str) -> RougeScores {
        let s = self.scorer.score(reference, candidate);
        let get = |t: RougeType| {
            s.get(t)
                .map(|x| Prf {
                    precision: x.precision,
                    recall: x.recall,
                    fmeasure: x.fmeasure,
                })
                .unwrap_or_default()
        };
        RougeScores {
            rouge1: get(RougeType::N(1)),
            rouge2: get(RougeType::N(2)),
            rouge_l: get(RougeType::L),
            rouge_lsum: get(RougeType::LSum),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproduces_google_rouge_score_on_every_shared_vector() {
        let v: serde_json::Value =
            serde_json::from_str(include_str!("../../../tests/fixtures/rouge-vectors.json"))
                .unwrap();
        let (plain, stemmed) = (Rouge::new(false), Rouge::new(true));
        let mut worst = 0f64;
        let cases = v["cases"].as_array().unwrap();
        assert!(cases.len() >= 169);
        for c in cases {
            let r = if c["use_stemmer"].as_bool().unwrap() {
                &stemmed
            } else {
                &plain
            };
            let got = serde_json::to_value(r.score(
                c["reference"].as_str().unwrap(),
                c["candidate"].as_str().unwrap(),
            ))
            .unwrap();
            for t in ["rouge1", "rouge2", "rougeL", "rougeLsum"] {
                for m in ["precision", "recall", "fmeasure"] {
                    let want = c["scores"][t][m].as_f64().unwrap();
                    let have = got[t][m].as_f64().unwrap();
                    worst = worst.max((want - have).abs());
                    assert!(
                        (want - have).abs() <= 1e-6,
                        "{} {t} {m}: want {want}, got {have}",
                        c["id"]
                    );
                }
            }
        }
        assert!(worst <= 1e-6, "worst difference {worst}");
    }
}
