//! Training examples and where they come from: QMSum's train split, a
//! company's own JSONL of summaries, or (built by the `recap` binary) the
//! large tier's shadow outputs. Pure parsing, no IO.
//!
//! The JSONL format, one example a line:
//!
//! ```json
//! {"transcript": "Alice: ...\nBob: ...", "kind": "overview", "target": "..."}
//! {"transcript": [{"speaker": "Alice", "text": "..."}], "query": "What did Bob decide?", "target": "..."}
//! ```
//!
//! `transcript` is `Name: text` lines or a list of utterances (recap's job
//! format); `kind` is one of overview, action_items, decisions, short
//! (default overview); `query` makes it a query-focused example (the answer
//! to the query); `language` (optional) is the job's language code.

use recap_job::{SummaryKind, Utterance};
use serde::Deserialize;

/// One example: what the worker would be asked, and the summary it should
/// write.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub id: String,
    pub transcript: Vec<Utterance>,
    pub kind: SummaryKind,
    pub query: Option<String>,
    pub language: Option<String>,
    pub target: String,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DataError {
    #[error("{source_name} line {line}: {message}")]
    Line {
        source_name: String,
        line: usize,
        message: String,
    },
    #[error("{0}: no examples")]
    Empty(String),
}

fn line_err(source_name: &str, line: usize, message: impl std::fmt::Display) -> DataError {
    DataError::Line {
        source_name: source_name.to_string(),
        line,
        message: message.to_string(),
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum TranscriptField {
    Text(String),
    Utterances(Vec<Utterance>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonlLine {
    transcript: TranscriptField,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    query: Option<String>,
    #[serde(default)]
    language: Option<String>,
    target: String,
    #[serde(default)]
    id: Option<String>,
}

/// Parses the JSONL format above; `source_name` names the file in errors.
pub fn parse_jsonl(text: &str, source_name: &str) -> Result<Vec<Example>, DataError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.trim().is_empty() {
            continue;
        }
        let l: JsonlLine = serde_json::from_str(line).map_err(|e| line_err(source_name, n, e))?;
        let transcript = match l.transcript {
            TranscriptField::Text(t) => recap_job::utterances_from_text(&t),
            TranscriptField::Utterances(u) => u,
        };
        if transcript.iter().all(|u| u.text.trim().is_empty()) {
            return Err(line_err(source_name, n, "empty transcript"));
        }
        if l.target.trim().is_empty() {
            return Err(line_err(source_name, n, "empty target"));
        }
        let kind = match l.kind.as_deref() {
            None => SummaryKind::Overview,
            Some(k) => SummaryKind::parse(k).ok_or_else(|| {
                line_err(
                    source_name,
                    n,
                    format!("kind `{k}` is not one of overview, action_items, decisions, short"),
                )
            })?,
        };
        let query = l.query.filter(|q| !q.trim().is_empty());
        out.push(Example {
            id: l.id.unwrap_or_else(|| format!("{source_name}:{n}")),
            transcript,
            kind,
            query,
            language: l.language,
            target: l.target.trim().to_string(),
        });
    }
    if out.is_empty() {
        return Err(DataError::Empty(source_name.to_string()));
    }
    Ok(out)
}

/// QMSum's train split as examples: each specific query over its gold
/// spans, answered as a query (the worker's query-focused prompt); each
/// general query over the whole meeting (`recap eval`'s parser, so that
/// training and evaluation read the dataset alike), "Summarize the whole meeting" as
/// the `overview` kind and the others as queries.
pub fn parse_qmsum(text: &str, source_name: &str) -> Result<Vec<Example>, DataError> {
    use recap_eval::qmsum::{parse, QmsumError, Setting};
    let mut out = Vec::new();
    for setting in [Setting::Span, Setting::Whole] {
        let cases = parse(text, setting).map_err(|e| match e {
            QmsumError::Bad { line, message } => line_err(source_name, line, message),
        })?;
        for c in cases {
            let whole_summary = setting == Setting::Whole
                && c.query
                    .trim()
                    .trim_end_matches('.')
                    .eq_ignore_ascii_case("summarize the whole meeting");
            out.push(Example {
                id: c.id,
                transcript: c.transcript,
                kind: SummaryKind::Overview,
                query: (!whole_summary).then_some(c.query),
                language: None,
                target: c.reference.trim().to_string(),
            });
        }
    }
    if out.is_empty() {
        return Err(DataError::Empty(source_name.to_string()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jsonl_takes_text_or_utterances_and_names_bad_lines() {
        let text = concat!(
            "{\"transcript\": \"Alice: we ship friday\\nBob: ok\", \"kind\": \"decisions\", \"target\": \"- Ship on Friday.\"}\n",
            "\n",
            "{\"transcript\": [{\"speaker\": \"Ann\", \"text\": \"hello\"}], \"query\": \"Who spoke?\", \"target\": \"Ann.\"}\n",
        );
        let ex = parse_jsonl(text, "mine.jsonl").unwrap();
        assert_eq!(ex.len(), 2);
        assert_eq!(ex[0].kind, SummaryKind::Decisions);
        assert_eq!(ex[0].transcript.len(), 2);
        assert_eq!(ex[0].transcript[0].speaker.as_deref(), Some("Alice"));
        assert_eq!(ex[0].id, "mine.jsonl:1");
        assert_eq!(ex[1].query.as_deref(), Some("Who spoke?"));
        assert_eq!(ex[1].kind, SummaryKind::Overview);

        let bad = |t: &str| parse_jsonl(t, "f.jsonl").unwrap_err().to_string();
        let e = bad("{\"transcript\": \"A: x\", \"target\": \"y\"}\nnot json\n");
        assert!(e.starts_with("f.jsonl line 2:"), "{e}");
        let e = bad("{\"transcript\": \"A: x\"}\n");
        assert!(e.contains("line 1") && e.contains("target"), "{e}");
        let e = bad("{\"transcript\": \"A: x\", \"target\": \"y\", \"kind\": \"poem\"}");
        assert!(e.contains("poem"), "{e}");
        let e = bad("{\"transcript\": \"\", \"target\": \"y\"}");
        assert!(e.contains("empty transcript"), "{e}");
        let e = bad("{\"transcript\": \"A: x\", \"target\": \" \"}");
        assert!(e.contains("empty target"), "{e}");
        let e = bad("{\"transcript\": \"A: x\", \"target\": \"y\", \"colour\": 1}");
        assert!(e.contains("colour"), "{e}");
        assert_eq!(
            parse_jsonl("\n\n", "f.jsonl").unwrap_err(),
            DataError::Empty("f.jsonl".into())
        );
    }

    #[test]
    fn qmsum_gives_span_queries_and_the_whole_meeting_overview() {
        let meeting = serde_json::json!({
            "meeting_transcripts": [
                {"speaker": "A", "content": "one"},
                {"speaker": "B", "content": "two"},
                {"speaker": "C", "content": "three"}
            ],
            "general_query_list": [
                {"query": "Summarize the whole meeting.", "answer": "All of it."},
                {"query": "What did the group discuss?", "answer": "Numbers."}
            ],
            "specific_query_list": [
                {"query": "What did B say?", "answer": "Two.", "relevant_text_span": [["1", "1"]]}
            ]
        });
        let ex = parse_qmsum(&meeting.to_string(), "train.jsonl").unwrap();
        assert_eq!(ex.len(), 3);
        let span = &ex[0];
        assert_eq!(span.query.as_deref(), Some("What did B say?"));
        assert_eq!(span.transcript.len(), 1);
        assert_eq!(span.target, "Two.");
        assert!(
            ex[1].query.is_none(),
            "the whole-meeting summary is the overview kind"
        );
        assert_eq!(ex[1].transcript.len(), 3);
        assert_eq!(ex[2].query.as_deref(), Some("What did the group discuss?"));
        let e = parse_qmsum("{\"meeting_transcripts\": 3}", "t.jsonl")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.jsonl line 1"), "{e}");
        assert!(parse_qmsum("", "t.jsonl").is_err());
    }
}
