//! The JSON of speech recognizers: Whisper's `segments` (openai-whisper's
//! `--output_format json`; WhisperX adds a `speaker` to each), AWS
//! Transcribe's `results` (words in `items`, speakers in `speaker_labels`
//! or on each item), and a generic diarized list of
//! `{speaker, start, end, text}`.

use super::{collapse_whitespace, FormatError, TranscriptFormat, MAX_SPEAKER_BYTES};
use crate::Utterance;
use serde_json::{Map, Value};
use std::collections::HashMap;

fn err(format: TranscriptFormat, path: &str, message: impl Into<String>) -> FormatError {
    FormatError::at_path(format, path, message)
}

/// A time in seconds, as a number or (AWS) a numeric string.
fn seconds(
    obj: &Map<String, Value>,
    key: &str,
    format: TranscriptFormat,
    path: &str,
) -> Result<Option<f64>, FormatError> {
    let t = match obj.get(key) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_f64(),
        Some(Value::String(s)) => s.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match t {
        Some(t) if t.is_finite() && t >= 0.0 => Ok(Some(t)),
        _ => Err(err(
            format,
            &format!("{path}.{key}"),
            "must be a non-negative number of seconds",
        )),
    }
}

/// A speaker named by a string, or numbered (`0` is "Speaker 0").
fn speaker(
    obj: &Map<String, Value>,
    key: &str,
    format: TranscriptFormat,
    path: &str,
) -> Result<Option<String>, FormatError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Value::String(s)) if s.len() <= 256 => Ok(Some(s.trim().to_string())),
        Some(Value::Number(n)) if n.is_u64() => Ok(Some(format!("Speaker {n}"))),
        Some(_) => Err(err(
            format,
            &format!("{path}.{key}"),
            "must be a name of at most 256 bytes, or a speaker number",
        )),
    }
}

/// A timed, spoken segment: `text` (required), `start`, `end` and the
/// speaker key given.
fn segment(
    item: &Value,
    format: TranscriptFormat,
    path: &str,
    speaker_key: &str,
) -> Result<Utterance, FormatError> {
    let Value::Object(obj) = item else {
        return Err(err(format, path, "must be an object"));
    };
    let text = match obj.get("text") {
        // Recognizers write plain words: `<` and `&` are text here.
        Some(Value::String(s)) => collapse_whitespace(s),
        None | Some(Value::Null) => {
            return Err(err(format, &format!("{path}.text"), "is required"))
        }
        Some(_) => return Err(err(format, &format!("{path}.text"), "must be a string")),
    };
    let start_s = seconds(obj, "start", format, path)?;
    let end_s = seconds(obj, "end", format, path)?;
    if let (Some(s), Some(e)) = (start_s, end_s) {
        if e < s {
            return Err(err(
                format,
                &format!("{path}.end"),
                format!("ends ({e} s) before it starts ({s} s)"),
            ));
        }
    }
    Ok(Utterance {
        speaker: speaker(obj, speaker_key, format, path)?,
        start_s,
        end_s,
        text,
    })
}

/// Whisper: `{"text": ..., "segments": [{"start", "end", "text", ...}]}`.
/// Segments of silence (empty text) are dropped, as Whisper writes them.
pub(super) fn parse_whisper(value: &Value) -> Result<Vec<Utterance>, FormatError> {
    const F: TranscriptFormat = TranscriptFormat::Whisper;
    let segments = value
        .get("segments")
        .and_then(Value::as_array)
        .ok_or_else(|| err(F, "segments", "a Whisper transcript has a `segments` list"))?;
    segments
        .iter()
        .enumerate()
        .map(|(i, s)| segment(s, F, &format!("segments[{i}]"), "speaker"))
        .collect()
}

/// A diarized list: `[{"speaker", "start", "end", "text"}]`; other keys
/// (`words`, `confidence`) are ignored.
pub(super) fn parse_diarized(value: &Value) -> Result<Vec<Utterance>, FormatError> {
    const F: TranscriptFormat = TranscriptFormat::Diarized;
    let items = value
        .as_array()
        .ok_or_else(|| err(F, "", "a diarized transcript is a list of segments"))?;
    items
        .iter()
        .enumerate()
        .map(|(i, s)| segment(s, F, &format!("[{i}]"), "speaker"))
        .collect()
}

/// AWS Transcribe: words and punctuation in `results.items`, each word's
/// speaker in its own `speaker_label` or, in older output, in
/// `results.speaker_labels.segments[].items[]` matched by start time.
/// Words of one speaker in a row make one turn; without speaker labels a
/// turn ends with its sentence.
pub(super) fn parse_aws(value: &Value) -> Result<Vec<Utterance>, FormatError> {
    const F: TranscriptFormat = TranscriptFormat::AwsTranscribe;
    let results = value
        .get("results")
        .and_then(Value::as_object)
        .ok_or_else(|| err(F, "results", "an AWS Transcribe transcript has `results`"))?;
    let items = results
        .get("items")
        .and_then(Value::as_array)
        .ok_or_else(|| err(F, "results.items", "is required (a list of words)"))?;
    // A label is copied into every turn it starts: bounded first.
    let label = |s: &str| -> Result<String, FormatError> {
        if s.len() > MAX_SPEAKER_BYTES {
            return Err(err(
                F,
                "results.speaker_labels",
                format!("a speaker label is over {MAX_SPEAKER_BYTES} bytes"),
            ));
        }
        Ok(s.trim().to_string())
    };
    // Older output: the speaker of each word's start time.
    let mut by_start: HashMap<String, String> = HashMap::new();
    if let Some(segments) = results
        .get("speaker_labels")
        .and_then(|l| l.get("segments"))
        .and_then(Value::as_array)
    {
        for seg in segments {
            for w in seg
                .get("items")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let (Some(t), Some(s)) = (
                    w.get("start_time").and_then(Value::as_str),
                    w.get("speaker_label").and_then(Value::as_str),
                ) {
                    by_start.insert(t.to_string(), label(s)?);
                }
            }
        }
    }
    let mut out: Vec<Utterance> = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let path = format!("results.items[{i}]");
        let Some(obj) = item.as_object() else {
            return Err(err(F, &path, "must be an object"));
        };
        let content = obj
            .get("alternatives")
            .and_then(Value::as_array)
            .and_then(|a| a.first())
            .and_then(|a| a.get("content"))
            .and_then(Value::as_str)
            .ok_or_else(|| {
                err(
                    F,
                    &format!("{path}.alternatives"),
                    "needs a first alternative with `content`",
                )
            })?;
        let kind = obj
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("pronunciation");
        if kind == "punctuation" {
            if let Some(last) = out.last_mut() {
                last.text.push_str(content);
            }
            continue;
        }
        let start = seconds(obj, "start_time", F, &path)?;
        let end = seconds(obj, "end_time", F, &path)?;
        let who = match obj.get("speaker_label").and_then(Value::as_str) {
            Some(s) => Some(label(s)?),
            None => obj
                .get("start_time")
                .and_then(Value::as_str)
                .and_then(|t| by_start.get(t).cloned()),
        };
        let sentence_over = |u: &Utterance| u.text.ends_with(['.', '?', '!']);
        match out.last_mut() {
            Some(last) if last.speaker == who && (who.is_some() || !sentence_over(last)) => {
                last.text.push(' ');
                last.text.push_str(content);
                last.end_s = end.or(last.end_s);
            }
            _ => out.push(Utterance {
                speaker: who,
                start_s: start,
                end_s: end,
                text: content.to_string(),
            }),
        }
    }
    Ok(out)
}
