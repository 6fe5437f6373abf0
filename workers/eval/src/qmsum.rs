//! QMSum (Zhong et al., NAACL 2021) as evaluation cases: JSON or JSONL,
//! general and specific queries. In the `span` setting a specific query sees
//! only its gold relevant spans; in the `whole` setting a query sees the
//! whole meeting.

use recap_job::{SummaryKind, Utterance};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Setting {
    /// Specific queries over their gold relevant spans.
    Span,
    /// General queries over whole meetings.
    Whole,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Case {
    /// `qmsum-<meeting>-<s|g><query>`: stable, for the results cache.
    pub id: String,
    /// The question asked; empty where the case asks for its `kind` alone.
    pub query: String,
    /// The summary kind asked for (QMSum's queries are asked as overviews).
    pub kind: SummaryKind,
    pub transcript: Vec<Utterance>,
    pub reference: String,
}

impl Case {
    pub fn query(&self) -> Option<&str> {
        (!self.query.trim().is_empty()).then_some(self.query.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QmsumError {
    #[error("QMSum line {line}: {message}")]
    Bad { line: usize, message: String },
}

#[derive(Deserialize)]
struct Meeting {
    meeting_transcripts: Vec<Turn>,
    #[serde(default)]
    general_query_list: Vec<Query>,
    #[serde(default)]
    specific_query_list: Vec<Query>,
}

#[derive(Deserialize)]
struct Turn {
    speaker: String,
    content: String,
}

#[derive(Deserialize)]
struct Query {
    query: String,
    answer: String,
    #[serde(default)]
    relevant_text_span: Vec<Vec<String>>,
}

/// Parses a QMSum file: JSONL (one meeting a line) or one JSON array.
pub fn parse(text: &str, setting: Setting) -> Result<Vec<Case>, QmsumError> {
    let meetings: Vec<(usize, Meeting)> = if text.trim_start().starts_with('[') {
        serde_json::from_str::<Vec<Meeting>>(text)
            .map_err(|e| QmsumError::Bad {
                line: e.line(),
                message: e.to_string(),
            })?
            .into_iter()
            .enumerate()
            .collect()
    } else {
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str::<Meeting>(l)
                    .map(|m| (i, m))
                    .map_err(|e| QmsumError::Bad {
                        line: i + 1,
                        message: e.to_string(),
                    })
            })
            .collect::<Result<_, _>>()?
    };
    let mut cases = Vec::new();
    for (m, meeting) in meetings {
        let turns: Vec<Utterance> = meeting
            .meeting_transcripts
            .iter()
            .map(|t| Utterance {
                speaker: Some(t.speaker.clone()),
                start_s: None,
                end_s: None,
                text: t.content.trim().to_string(),
            })
            .collect();
        match setting {
            Setting::Whole => {
                for (q, query) in meeting.general_query_list.iter().enumerate() {
                    cases.push(Case {
                        id: format!("qmsum-{m}-g{q}"),
                        query: query.query.clone(),
                        kind: SummaryKind::Overview,
                        transcript: turns
                            .iter()
                            .filter(|u| !u.text.is_empty())
                            .cloned()
                            .collect(),
                        reference: query.answer.clone(),
                    });
                }
            }
            Setting::Span => {
                for (q, query) in meeting.specific_query_list.iter().enumerate() {
                    let mut transcript = Vec::new();
                    for span in &query.relevant_text_span {
                        let bound = |i: usize| -> Result<usize, QmsumError> {
                            span.get(i)
                                .and_then(|s| s.trim().parse().ok())
                                .ok_or_else(|| QmsumError::Bad {
                                    line: m + 1,
                                    message: format!("query {q}: bad span {span:?}"),
                                })
                        };
                        // Spans are inclusive utterance indices.
                        let (a, b) = (bound(0)?, bound(1)?);
                        let end = b.min(turns.len().saturating_sub(1));
                        if a <= end {
                            transcript.extend(
                                turns[a..=end]
                                    .iter()
                                    .filter(|u| !u.text.is_empty())
                                    .cloned(),
                            );
                        }
                    }
                    if transcript.is_empty() {
                        continue;
                    }
                    cases.push(Case {
                        id: format!("qmsum-{m}-s{q}"),
                        query: query.query.clone(),
                        kind: SummaryKind::Overview,
                        transcript,
                        reference: query.answer.clone(),
                    });
                }
            }
        }
    }
    Ok(cases)
}

/// A seeded sample of `n` cases (all when `n` is at least their number),
/// kept in the file's order so that runs are comparable.
pub fn sample(cases: Vec<Case>, n: Option<usize>, seed: u64) -> Vec<Case> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let Some(n) = n.filter(|&n| n < cases.len()) else {
        return cases;
    };
    let mut idx: Vec<usize> = (0..cases.len()).collect();
    idx.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed));
    let mut keep: Vec<usize> = idx.into_iter().take(n).collect();
    keep.sort_unstable();
    keep.into_iter().map(|i| cases[i].clone()).collect()
}

/// The extractive Lead-N baseline of query-focused evaluation: the first
/// `n` words of the transcript.
pub fn lead_words(transcript: &[Utterance], n: usize) -> String {
    transcript
        .iter()
        .flat_map(|u| u.text.split_whitespace())
        .take(n)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../../tests/fixtures/qmsum/val-head3.jsonl");

    #[test]
    fn span_cases_take_their_gold_spans() {
        let cases = parse(FIXTURE, Setting::Span).unwrap();
        assert!(cases.len() > 10, "{}", cases.len());
        let c = &cases[0];
        assert_eq!(c.id, "qmsum-0-s0");
        assert_eq!(c.query, "What was agreed upon on sample transcripts?");
        assert!(c.reference.starts_with("To save time, speaker mn005"));
        // Span 459..=530 of the first meeting, empty turns dropped.
        assert!(
            c.transcript.len() <= 72 && c.transcript.len() > 50,
            "{}",
            c.transcript.len()
        );
        assert!(c.transcript.iter().all(|u| u.speaker.is_some()));
    }

    #[test]
    fn whole_cases_are_general_queries() {
        let cases = parse(FIXTURE, Setting::Whole).unwrap();
        assert_eq!(cases.len(), 3);
        assert!(cases[0].transcript.len() > 800);
        assert_eq!(
            cases[0].query,
            "What were the main discussion points of the meeting?"
        );
    }

    #[test]
    fn json_arrays_and_bad_lines() {
        let first = FIXTURE.lines().next().unwrap();
        let arr = format!("[{first}]");
        assert_eq!(parse(&arr, Setting::Whole).unwrap().len(), 1);
        let err = parse(&format!("{first}\nnot json\n"), Setting::Span).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn sampling_is_seeded_and_ordered() {
        let cases = parse(FIXTURE, Setting::Span).unwrap();
        let a = sample(cases.clone(), Some(5), 7);
        let b = sample(cases.clone(), Some(5), 7);
        assert_eq!(a, b);
        assert_eq!(a.len(), 5);
        let pos: Vec<usize> = a
            .iter()
            .map(|c| cases.iter().position(|x| x.id == c.id).unwrap())
            .collect();
        assert!(pos.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(sample(cases.clone(), None, 1).len(), cases.len());
    }

    #[test]
    fn lead_takes_words() {
        let cases = parse(FIXTURE, Setting::Span).unwrap();
        assert_eq!(
            lead_words(&cases[0].transcript, 60)
                .split_whitespace()
                .count(),
            60
        );
    }
}
